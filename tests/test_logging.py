"""What the engine logs through `logging.getLogger("ferrumkv")`: the failures it gets over
by itself (a disk block that fails its checksum, KV events nobody drained), rate-limited per
kind, and a cache dropped without `close()`. A healthy call logs nothing."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

import ferrumkv
from helpers import make_config
from tiers_helpers import alloc_from_disk, disk_cache, spill_chain


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ferrumkv"]


def test_a_disk_checksum_failure_is_logged_once_per_kind_and_window(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferrumkv")
    with disk_cache(tmp_path) as cache:
        prompt, _ = spill_chain(cache, np.random.default_rng(3))
        assert warnings_of(caplog) == [], "a healthy run logs nothing"
        cache._core.inject_disk_fault("flip", 1, 1)
        alloc_from_disk(cache, "a", prompt)
        cache.stats()
        logged = warnings_of(caplog)
        assert len(logged) == 1 and "slot 1 failed its checksum" in logged[0]
        assert cache.stats().disk_checksum_failures == 1
        # A second failure of the same kind within the window is held back, and counted in
        # the next record of its kind.
        log = cache._dispatcher.incidents
        log.log(_FakeCore([("disk_checksum_failure", "again")]))
        assert len(warnings_of(caplog)) == 1
        log._last["disk_checksum_failure"] -= 60
        log.log(_FakeCore([("disk_checksum_failure", "later")]))
        assert warnings_of(caplog)[-1].endswith("later (1 more of this kind since the last report)")


class _FakeCore:
    def __init__(self, incidents: list[tuple[str, str]]) -> None:
        self._incidents = incidents

    def drain_incidents(self) -> tuple[list[tuple[str, str]], int]:
        return self._incidents, 0


def test_dropped_kv_events_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ferrumkv")
    with ferrumkv.KvCache(make_config(num_blocks=4096)) as cache:
        i = 0
        while cache.stats().dropped_events == 0:  # nobody drains: the queue fills
            cache.try_allocate(f"r{i}", list(range(i * 64, i * 64 + 63)))
            cache._core.deallocate(f"r{i}")
            i += 1
        logged = [m for m in warnings_of(caplog) if "KV events dropped" in m]
        assert len(logged) == 1 and "drain_events()" in logged[0]


def test_a_cache_dropped_without_close_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    import gc

    caplog.set_level(logging.WARNING, logger="ferrumkv")
    cache = ferrumkv.KvCache(make_config())
    del cache  # (its ResourceWarning is filtered in pyproject.toml; test_lifecycle checks it)
    gc.collect()
    assert any("garbage-collected without close()" in m for m in warnings_of(caplog))
