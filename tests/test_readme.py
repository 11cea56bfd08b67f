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


def test_the_scheduler_step_prints_what_the_readme_says(capsys) -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = re.search(
        r"## A scheduler step, end to end\n.*?```python\n(.*?)```\n\n```console\n(.*?)```",
        text,
        re.S,
    )
    assert section, "the README has the scheduler step and its output"
    code, expected = section.groups()
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out == expected
