"""Every public name has documentation at runtime (`help()` shows it): each class of
`ferrumkv.__all__`, each public method and property, and each field of the frozen value
types (named in its class's docstring). The counters of `CacheStats` / `IterationStats` are
documented once, in the README's "Stats" section, which this checks too."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import ferrumkv
from ferrumkv.types import COUNTER_FIELDS

ROOT = Path(__file__).parent.parent


def _undocumented() -> list[str]:
    missing = []
    for name in ferrumkv.__all__:
        obj = getattr(ferrumkv, name)
        if not inspect.isclass(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            missing.append(name)
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            if dataclasses.is_dataclass(obj) and attr in {f.name for f in dataclasses.fields(obj)}:
                continue  # fields: checked below
            kind = type(value).__name__
            if kind == "member_descriptor":  # a field: its own doc, or named in the class doc
                if not (value.__doc__ or "").strip() and f"`{attr}`" not in doc:
                    missing.append(f"{name}.{attr}")
                continue
            if callable(value) or isinstance(value, property) or "descriptor" in kind:
                d = getattr(value, "__doc__", None) or ""
                if not d.strip() or d.startswith(kind):
                    missing.append(f"{name}.{attr}")
        if dataclasses.is_dataclass(obj) and name not in ("CacheStats", "IterationStats"):
            for f in dataclasses.fields(obj):
                if f"`{f.name}`" not in doc and f.name not in COUNTER_FIELDS:
                    missing.append(f"{name}.{f.name} (field)")
    return missing


def test_every_public_class_method_and_field_is_documented() -> None:
    assert _undocumented() == []


def test_the_readme_documents_every_counter() -> None:
    text = (ROOT / "README.md").read_text()
    stats = re.search(r"\n## Stats\n(.*?)\n## ", text, re.S)
    assert stats, "the README has a Stats section"
    missing = [c for c in COUNTER_FIELDS if f"`{c}`" not in text]
    assert missing == []
