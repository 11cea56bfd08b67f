"""The griffe extension of the API reference (mkdocs.yml, `make docs`).

griffe reads the package statically. Two things it cannot get that way, this adds:

- The docstrings of `ferrumkv._core`. Its typed contract, `python/ferrumkv/_core.pyi`, has the
  signatures but not the docstrings: those live once, in the Rust code (`///` comments, which
  pyo3 turns into `__doc__`). Each one is copied from the built module onto the object the stub
  declares, so the reference shows the stub's types with the Rust docstrings and nothing is
  written twice. A docstring the stub has itself (a module attribute's) is kept.
- A pyclass is made by `__new__` (the stub declares no `__init__`), while the reference takes
  a class's signature from `__init__`: a class with only `__new__` gets an `__init__` with the
  same parameters, less `cls`, so `CacheConfig(*, num_layers, ...)` heads its section.

And it drops what `filters: public` would show as noise: the special members of a class that
have no docstring of their own (`__repr__`, `__slots__`, the DLPack protocol); `__init__` stays,
the class's signature.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import griffe

_CORE = "ferrumkv._core"


def _runtime_doc(value: Any) -> str | None:
    doc = getattr(value, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    if not inspect.isclass(value) and doc == getattr(type(value), "__doc__", None):
        return None  # a str's or a tuple's own docstring, not this value's
    return inspect.cleandoc(doc)


def _fill(obj: griffe.Object, runtime: Any) -> None:
    if obj.docstring is None and (doc := _runtime_doc(runtime)) is not None:
        obj.docstring = griffe.Docstring(doc, parent=obj)
    if not isinstance(obj, griffe.Class):
        return
    new = obj.members.get("__new__")
    if isinstance(new, griffe.Function) and "__init__" not in obj.members:
        init = griffe.Function(
            "__init__",
            lineno=new.lineno,
            endlineno=new.endlineno,
            parameters=griffe.Parameters(*list(new.parameters)[1:]),
            returns="None",
        )
        obj.set_member("__init__", init)
    for name, member in obj.members.items():
        if member.is_alias or name.startswith("__"):
            continue  # dunders: Python's generic docstrings (`Return repr(self).`)
        value = inspect.getattr_static(runtime, name, None)
        if value is not None:
            _fill(member, value)  # type: ignore[arg-type]


def _drop_undocumented_specials(obj: griffe.Object) -> None:
    # Dropped, not marked `public = False`: the reference reaches most classes through the
    # aliases `ferrumkv` re-exports them as, and an alias's members do not see that mark.
    for name, member in list(obj.members.items()):
        if member.is_alias:
            continue
        if isinstance(member, griffe.Class | griffe.Module):
            _drop_undocumented_specials(member)
        special = name.startswith("__") and name.endswith("__") and name != "__init__"
        if obj.is_class and special and not member.docstring:
            del obj.members[name]


class ReferenceDocs(griffe.Extension):
    """Docstrings from the built `ferrumkv._core`; undocumented special methods left out."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "ferrumkv":
            return
        stub = pkg["_core"]
        if stub.filepath is None or Path(str(stub.filepath)).suffix != ".pyi":
            msg = f"{_CORE} was loaded from {stub.filepath}, not its stub: allow_inspection: false"
            raise RuntimeError(msg)
        core = importlib.import_module(_CORE)
        for name, member in stub.members.items():
            if not member.is_alias and hasattr(core, name):
                _fill(member, getattr(core, name))
        _drop_undocumented_specials(pkg)
