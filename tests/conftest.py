"""pytest configuration of the engine tests: the CUDA deselection and the fixtures.

- `anyio_backend`: every `@pytest.mark.anyio` test runs under asyncio and under trio.
- `small_config`: `helpers.make_config`, as a fixture.
Shared helpers live in `helpers.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import ferrumkv
from ferrumkv import _core
from helpers import make_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda` tests need an NVIDIA driver: without one they are deselected (the default run
    is CPU-only); with one they run like every other test."""
    if _core.cuda_driver_present:
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def small_config() -> Callable[..., ferrumkv.CacheConfig]:
    return make_config
