"""What the command line draws: tables and a progress bar, through ``rich`` when it is installed
(the ``ferrumkv[cli]`` extra), else as plain text.

This module is the one place that decides. Callers describe a table as a :class:`Table` value
(formatted cells, no styling) and get it back as text from :func:`render_table`, or written
by :func:`print_table`; a progress bar is the context manager :func:`progress_bar`. ``rich``
is imported only inside the functions that draw, so ``import ferrumkv`` never needs it.

NOTE: output that is not a terminal (a pipe, a file, a test's buffer) is rendered the same
way every time: no colour or cursor codes, ASCII rules, :data:`PLAIN_WIDTH` columns, trailing
spaces stripped. A terminal gets ``rich``'s styling at the terminal's width.

NOTE: a closed pipe is an ordinary ``BrokenPipeError`` for the caller (the command line ends
quietly with 141), never ``rich``'s own handling (it exits with status 1): a table is captured
as text and written here, and the progress bar's console raises instead of exiting.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

if TYPE_CHECKING:
    import rich.box
    import rich.progress
    import rich.table

__all__ = [
    "PLAIN_WIDTH",
    "Column",
    "Progress",
    "Table",
    "print_table",
    "progress_bar",
    "render_table",
    "rich_available",
]

PLAIN_WIDTH = 160
"""Width of a table rendered for anything but a terminal (wide enough that no cell wraps)."""

PLAIN_BAR_WIDTH = 30
"""Characters of the plain progress bar."""

_GAP = "   "
"""Between two columns of a plain table (as wide as rich's padding and divider)."""


def rich_available() -> bool:
    """Whether ``rich`` can be imported (``sys.modules['rich'] = None`` hides it)."""
    try:
        return importlib.util.find_spec("rich") is not None
    except ValueError:  # a module whose __spec__ is None
        return False


# ---------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    """One column: its header and how its cells line up."""

    header: str
    justify: Literal["left", "right"] = "left"


@dataclass(frozen=True)
class Table:
    """A table as data: formatted cells, one tuple per row, as many cells as ``columns``.

    ``footer``: a last row (a total) set apart by a rule. ``title`` goes above the table,
    ``caption`` below it. ``show_header=False`` for a list of label / value pairs.
    """

    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]
    footer: tuple[str, ...] | None = None
    title: str | None = None
    caption: str | None = None
    show_header: bool = True


def render_table(table: Table, file: TextIO | None = None) -> str:
    """`table` as text ending in a newline: styled for `file` when it is a terminal, else
    plain (see the module's note); through ``rich`` when it is installed."""
    if rich_available():
        return _rich_render(table, file if file is not None and _isatty(file) else None)
    return _plain_render(table)


def print_table(table: Table, file: TextIO) -> None:
    """Write `table` to `file` (styled when `file` is a terminal)."""
    file.write(render_table(table, file))
    file.flush()


def _isatty(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def _plain_render(table: Table) -> str:
    """The fallback: columns padded to their widest cell, a dash rule under the header and
    above the footer, title and caption as lines of their own."""
    head = tuple(c.header for c in table.columns)
    body = [*table.rows, *([table.footer] if table.footer is not None else [])]
    sized = [head, *body] if table.show_header else body
    widths = [max((len(row[i]) for row in sized), default=0) for i in range(len(head))]
    rule = "-" * (sum(widths) + len(_GAP) * (len(widths) - 1))

    def line(cells: tuple[str, ...]) -> str:
        padded = (
            cell.ljust(w) if c.justify == "left" else cell.rjust(w)
            for cell, w, c in zip(cells, widths, table.columns, strict=True)
        )
        return _GAP.join(padded).rstrip()

    lines = [table.title] if table.title is not None else []
    if table.show_header:
        lines += [line(head), rule]
    lines += [line(row) for row in table.rows]
    if table.footer is not None:
        lines += [rule, line(table.footer)]
    if table.caption is not None:
        lines.append(table.caption)
    return "".join(f"{text}\n" for text in lines)


def _rich_render(table: Table, terminal: TextIO | None) -> str:
    """Through ``rich``: for `terminal` with its styling and width, else plainly."""
    from rich.console import Console

    if terminal is not None:
        console = Console(file=terminal, highlight=False)
    else:
        console = Console(
            width=PLAIN_WIDTH, force_terminal=False, no_color=True, highlight=False, emoji=False
        )
    with console.capture() as captured:
        console.print(_rich_table(table, plain=terminal is None))
    text = captured.get()
    if terminal is None:
        text = "".join(f"{line.rstrip()}\n" for line in text.splitlines())
    return text


def _rich_table(table: Table, *, plain: bool) -> rich.table.Table:
    """The ``rich.table.Table`` of `table`; cells are ``Text``, never parsed as markup."""
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    def text(value: str | None) -> Text | None:
        return None if value is None else Text(value)

    footer = table.footer or ("",) * len(table.columns)
    out = RichTable(
        title=text(table.title),
        caption=text(table.caption),
        title_justify="left",
        caption_justify="left",
        show_header=table.show_header,
        show_footer=table.footer is not None,
        box=_ascii_rules() if plain else box.SIMPLE,
        show_edge=False,
        pad_edge=not plain,
    )
    for i, (column, total) in enumerate(zip(table.columns, footer, strict=True)):
        style = "bold" if i == 0 else None
        out.add_column(column.header, Text(total), justify=column.justify, style=style)
    for row in table.rows:
        out.add_row(*map(Text, row))
    return out


def _ascii_rules() -> rich.box.Box:
    """``rich.box.SIMPLE`` drawn with ``-``: a rule under the header and above the footer."""
    from rich.box import Box

    return Box("    \n    \n -- \n    \n    \n -- \n    \n    \n", ascii=True)


# ---------------------------------------------------------------------- progress


class Progress(Protocol):
    """A progress bar being drawn: `update` redraws it."""

    def update(self, completed: int, status: str) -> None:
        """Show `completed` of the total, with `status` (a short line) beside the bar."""


@contextmanager
def progress_bar(total: int, unit: str, stream: TextIO) -> Iterator[Progress]:
    """A progress bar of `total` `unit` on `stream`, drawn live even when `stream` is not a
    terminal (the caller decides whether to draw one), left on screen when the block ends."""
    if rich_available():
        with _rich_progress(total, unit, stream) as bar:
            yield bar
    else:
        bar = _PlainProgress(total, unit, stream)
        try:
            yield bar
        finally:
            bar.close()


@contextmanager
def _rich_progress(total: int, unit: str, stream: TextIO) -> Iterator[Progress]:
    """``rich.progress`` on `stream`, redrawn by `update` (no refresh thread)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    console = PipeConsole(file=stream, force_terminal=True, highlight=False)
    columns = (
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit, markup=False),
        TextColumn("{task.fields[status]}", markup=False),
        TimeElapsedColumn(),
    )
    progress = RichProgress(*columns, console=console, auto_refresh=False)
    task = progress.add_task(unit, total=total, status="")
    with progress:
        yield _RichBar(progress, task)


class _RichBar:
    """A task of a ``rich.progress.Progress``, redrawn on every `update`."""

    def __init__(self, progress: rich.progress.Progress, task: rich.progress.TaskID) -> None:
        self._progress = progress
        self._task = task

    def update(self, completed: int, status: str) -> None:
        """Set the figures and redraw."""
        self._progress.update(self._task, completed=completed, status=status)
        self._progress.refresh()


class _PlainProgress:
    """The fallback: one line redrawn in place with ``\\r``, ended by a newline."""

    def __init__(self, total: int, unit: str, stream: TextIO) -> None:
        self._total = total
        self._unit = unit
        self._stream = stream
        self._start = time.perf_counter()
        self._drawn = 0

    def update(self, completed: int, status: str) -> None:
        """Redraw the line for `completed` of the total."""
        filled = round(PLAIN_BAR_WIDTH * completed / self._total) if self._total else 0
        bar = "#" * filled + "-" * (PLAIN_BAR_WIDTH - filled)
        elapsed_s = time.perf_counter() - self._start
        line = f"[{bar}] {completed}/{self._total} {self._unit}  {status}  {elapsed_s:6.1f}s"
        self._stream.write("\r" + line.ljust(self._drawn))
        self._stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        """End the line."""
        self._stream.write("\n")
        self._stream.flush()
