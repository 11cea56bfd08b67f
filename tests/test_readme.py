"""The README's quickstart runs as written."""

import re
from pathlib import Path


def test_quickstart_runs(capsys) -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert block, "the README has a quickstart block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 20
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert "tokens in use" in capsys.readouterr().out
