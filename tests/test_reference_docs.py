"""The API reference (`make docs`, mkdocs.yml) covers the public API, and the docstrings it is
made from name only things that exist.

`mkdocs build --strict` (in `make test`) fails on a `:::` object, a cross-reference or a
relative link that does not resolve. These checks need no build: every name of
`ferrumkv.__all__` is on a reference page, and every backticked dotted name in a public
docstring (`ferrumkv.metrics.register`, or `KvCache.kv_view` for a name of `ferrumkv.__all__`)
imports or is an attribute of what comes before it; so does every one in the sources (the
attribute docstrings that exist only there) and the pages.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import ferrumkv

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"

# The submodules people import (README), each on its own reference page, whole (its `__all__`:
# the reference renders `filters: public`).
PUBLIC_MODULES = (
    "ferrumkv.types",
    "ferrumkv.errors",
    "ferrumkv.metrics",
    "ferrumkv.kv_events",
    "ferrumkv.remote",
    "ferrumkv.torch",
)

_DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.M)
# A backticked dotted name: its start, up to the first character that is not part of a name
# (`ferrumkv.KvCache.allocate(...)` names `ferrumkv.KvCache.allocate`).
_DOTTED = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")


def _directives() -> dict[str, Path]:
    found = {}
    for page in sorted(DOCS.rglob("*.md")):
        for path in _DIRECTIVE.findall(page.read_text()):
            found[path] = page.relative_to(ROOT)
    return found


def _resolve(path: str) -> bool:
    """Whether `path` (`ferrumkv.X.y`) names something: each part an attribute of the one
    before, a submodule, or a field of a class (a dataclass field, an annotated attribute)."""
    head, *rest = path.split(".")
    obj: Any = importlib.import_module(head)
    for i, part in enumerate(rest):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.ismodule(obj):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except ModuleNotFoundError:
                return False
        elif inspect.isclass(obj) and (
            (dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)})
            or part in inspect.get_annotations(obj)
        ):
            return i == len(rest) - 1  # a field: nothing after it to check
        else:
            return False
    return True


def _public_modules() -> list[ModuleType]:
    return [ferrumkv, *(importlib.import_module(m) for m in PUBLIC_MODULES)]


def _docstrings() -> Iterator[tuple[str, str]]:
    """(where, docstring) of each public module, each name of its `__all__`, and each public
    member (method, property, field descriptor) of those that are classes."""
    seen: set[int] = set()
    for module in _public_modules():
        yield module.__name__, inspect.getdoc(module) or ""
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)) or id(obj) in seen:
                continue  # a constant's __doc__ is its type's
            seen.add(id(obj))
            where = f"{module.__name__}.{name}"
            yield where, inspect.getdoc(obj) or ""
            if not inspect.isclass(obj):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                doc = getattr(value, "__doc__", None)
                if isinstance(value, property):
                    doc = value.__doc__ or (value.fget and value.fget.__doc__)
                if isinstance(doc, str) and doc != type(value).__doc__:
                    yield f"{where}.{attr}", inspect.cleandoc(doc)


def _sources() -> list[Path]:
    """The text the reference is made from beyond the runtime docstrings: the Python sources and
    the stub (attribute docstrings exist only there), the bindings' Rust (their `//!` module
    headers), and the pages."""
    sources = [*(ROOT / "python" / "ferrumkv").rglob("*.py"), ROOT / "python/ferrumkv/_core.pyi"]
    sources += [*(ROOT / "rust" / "py" / "src").rglob("*.rs"), *DOCS.rglob("*.md")]
    return sorted(sources)


def _dotted_references(text: str) -> Iterator[str]:
    """The references a docstring makes: `ferrumkv.X...`, and `X.y...` for `X` in
    `ferrumkv.__all__` (`KvCache.kv_view`, `CacheConfig.dtype`), as `ferrumkv.X.y`."""
    for ref in _DOTTED.findall(text):
        head = ref.split(".", 1)[0]
        if head == "ferrumkv":
            yield ref
        elif head in ferrumkv.__all__:
            yield f"ferrumkv.{ref}"


def test_every_directive_resolves() -> None:
    """What `mkdocs build --strict` would fail on first, found without building."""
    broken = [f"{page}: ::: {path}" for path, page in _directives().items() if not _resolve(path)]
    assert broken == []


def test_every_public_name_is_on_a_reference_page() -> None:
    directives = _directives()
    missing_modules = [m for m in PUBLIC_MODULES if m not in directives]
    assert missing_modules == [], "each public module has a `::: module` directive"
    missing = []
    for name in ferrumkv.__all__:
        if f"ferrumkv.{name}" in directives:
            continue
        owner = getattr(getattr(ferrumkv, name), "__module__", None)
        module = importlib.import_module(owner) if isinstance(owner, str) else None
        if owner in directives and name in getattr(module, "__all__", ()):
            continue  # on its module's page
        missing.append(name)
    assert missing == []


def test_public_modules_export_what_they_name() -> None:
    """The module pages render each module's `__all__`: a name there must exist."""
    broken = [
        f"{module.__name__}.{name}"
        for module in _public_modules()
        for name in module.__all__
        if not hasattr(module, name)
    ]
    assert broken == []


def test_docstring_references_resolve() -> None:
    checked = set()
    broken = []
    for where, doc in _docstrings():
        for ref in _dotted_references(doc):
            checked.add(ref)
            if not _resolve(ref):
                broken.append(f"{where}: `{ref}`")
    for path in _sources():
        for ref in _dotted_references(path.read_text()):
            checked.add(ref)
            if not _resolve(ref):
                broken.append(f"{path.relative_to(ROOT)}: `{ref}`")
    assert checked, "the docstrings make references (the scan finds them)"
    assert broken == []


def test_the_resolver_rejects_what_does_not_exist() -> None:
    assert _resolve("ferrumkv.KvCache.allocate")
    assert _resolve("ferrumkv.metrics.register")
    assert _resolve("ferrumkv.CacheStats.device")  # a dataclass field without a default
    assert not _resolve("ferrumkv.KvCache.alocate")
    assert not _resolve("ferrumkv.nonexistent")
    assert not _resolve("ferrumkv.CacheStats.device.nonexistent")
    assert list(_dotted_references("`KvCache.kv_view(layer)`, ``ferrumkv.torch``, `cache.x`")) == [
        "ferrumkv.KvCache.kv_view",
        "ferrumkv.torch",
    ]
