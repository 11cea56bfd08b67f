"""``ferrumkv._console``: the tables (replay, bench, replicas) and the progress bar, through
``rich`` and through the plain fallback, with exact text where the output is pinned."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import sys
from typing import Any

import pytest

from ferrumkv import CacheConfig, KvCache
from ferrumkv import _console as console
from ferrumkv.bench import bench_table
from ferrumkv.bench import format_table as format_bench
from ferrumkv.replay import ReplayOptions, format_table, replay, summarize, summary_table
from ferrumkv.replicas import fleet_table, format_fleet
from ferrumkv.workload import DEFAULT_VOCAB_SIZE, infinite_cache_hits, synthetic_workload


@pytest.fixture(params=["rich", "plain"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with ``rich`` (where installed) and with ``rich`` unimportable."""
    if request.param == "rich":
        pytest.importorskip("rich")
    else:
        monkeypatch.setitem(sys.modules, "rich", None)
    return str(request.param)


class Terminal(io.StringIO):
    """A buffer that says it is a terminal."""

    def isatty(self) -> bool:
        return True


SMALL = console.Table(
    (console.Column("name"), console.Column("count", "right")),
    (("alpha", "1"), ("b [bold]x[/bold]", "1,234")),
    footer=("total", "1,235"),
    title="a title",
    caption="a caption",
)

SMALL_TEXT = """\
a title
name               count
------------------------
alpha                  1
b [bold]x[/bold]   1,234
------------------------
total              1,235
a caption
"""
"""`SMALL` for a file: the same text through rich and through the fallback (markup in a cell
is text, never styling)."""


def test_rich_is_hidden_by_a_none_module(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    assert console.rich_available()
    monkeypatch.setitem(sys.modules, "rich", None)
    assert not console.rich_available()


def test_a_table_for_a_file_is_pinned(mode: str) -> None:
    assert console.render_table(SMALL) == SMALL_TEXT
    out = io.StringIO()
    console.print_table(SMALL, out)
    assert out.getvalue() == SMALL_TEXT


def test_a_table_without_header_footer_or_title(mode: str) -> None:
    table = console.Table(
        (console.Column("label"), console.Column("value")),
        (("workload", "chats"), ("peak usage", "90.6% (232 of 256 blocks)")),
        show_header=False,
    )
    expected = "workload     chats\npeak usage   90.6% (232 of 256 blocks)\n"
    assert console.render_table(table) == expected


def test_a_terminal_gets_rich_styling_and_the_fallback_stays_plain(mode: str) -> None:
    out = Terminal()
    console.print_table(SMALL, out)
    text = out.getvalue()
    for cell in ("name", "count", "alpha", "1,234", "total", "a title", "a caption"):
        assert cell in text
    assert ("\x1b[" in text) == (mode == "rich")
    if mode == "plain":
        assert text == SMALL_TEXT


# ---------------------------------------------------------------------- the replay table


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    """The summary of a small real replay, every I/O and rejection figure set to a value of
    its own so the table shows where each one goes."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, num_blocks=64)
    workload = synthetic_workload(6, seed=0, vocab_size=DEFAULT_VOCAB_SIZE)
    options = ReplayOptions(max_concurrency=4)
    result = asyncio.run(replay(KvCache(cfg), cfg, workload, options))
    admitted = dataclasses.replace(workload, requests=result.admitted)
    figures = summarize(result, workload, infinite_cache_hits(admitted, cfg.block_size))
    return figures | {
        "requests": 9,
        "requests_rejected": 3,
        "requests_rejected_too_large": 2,
        "requests_rejected_no_room": 1,
        "disk_blocks_written": 11,
        "disk_blocks_read": 12,
        "disk_errors": 13,
        "disk_checksum_failures": 14,
        "dropped_events": 15,
        "remote_hit_blocks": 16,
        "remote_read_bytes": 2048,
        "remote_miss_blocks": 17,
        "remote_write_blocks": 18,
        "remote_write_bytes": 3 * 2**20,
        "remote_dropped_writes": 19,
        "remote_errors": 20,
    }


def test_the_replay_table_shows_every_figure(mode: str, summary: dict[str, Any]) -> None:
    text = format_table(summary)
    rows = dict(map(_split_row, text.splitlines()))
    assert list(rows) == [
        "workload", "requests", "prompt tokens", "generated tokens", "block hit rate",
        "token hit rate", "peak usage", "CRITICAL episodes", "preemptions",
        "recomputed prompts", "offloaded", "onboarded", "disk I/O", "KV events dropped",
        "remote store", "engine ops", "wall time",
    ]  # fmt: skip
    s = summary
    assert rows["workload"] == "synthetic chats (seed 0)"
    assert rows["requests"] == (
        f"9 ({s['requests_done']} done, 3 rejected: 2 larger than the device tier, "
        "1 no room on an otherwise empty device)"
    )
    assert rows["disk I/O"] == (
        "11 blocks written, 12 read (13 errors, 14 checksum failures)"
    )  # fmt: skip
    assert rows["KV events dropped"] == "15 (undrained past the 64 MiB cap)"
    assert rows["remote store"] == (
        "16 blocks hit (2.0 KiB), 17 missed; 18 written (3.0 MiB), 19 dropped, 20 errors"
    )
    assert rows["block hit rate"] == (
        f"{s['block_hit_rate']:.1%} (infinite cache {s['infinite_block_hit_rate']:.1%})"
    )
    assert rows["generated tokens"] == f"{s['generated_tokens']:,}"
    assert rows["wall time"] == f"{s['wall_s']:.2f} s"


def _split_row(line: str) -> tuple[str, str]:
    """A replay table line as (label, value): the columns are at least three spaces apart."""
    label, value = line.split("   ", 1)
    return label, value.strip()


def test_no_rejection_has_no_reasons(summary: dict[str, Any]) -> None:
    figures = summary | {
        "requests_rejected": 0,
        "requests_rejected_too_large": 0,
        "requests_rejected_no_room": 0,
    }
    requests = dict(map(_split_row, format_table(figures).splitlines()))["requests"]
    assert requests == f"{figures['requests']} ({figures['requests_done']} done, 0 rejected)"


def test_the_replay_table_is_one_table_value(summary: dict[str, Any]) -> None:
    table = summary_table(summary)
    assert not table.show_header and len(table.columns) == 2
    assert all(len(row) == 2 for row in table.rows)
    assert format_table(summary) == console.render_table(table)


# ---------------------------------------------------------------------- bench and replicas


BENCH_ROWS = [
    ("allocate+deallocate 512 tok, sync", 2.0, 5.0, "us/req"),
    ("  same, tokens as a Python list", 4.0, 5.0, "us/req"),
    ("swap out+in 1000 x 64 KiB, 1 seq (vs copyto)", 9.0, 10.0, "GB/s"),
]

BENCH_TEXT = """\
case                                           ferrumkv   baseline   speedup   unit
-------------------------------------------------------------------------------------
allocate+deallocate 512 tok, sync                  2.00       5.00     2.50x   us/req
  same, tokens as a Python list                    4.00       5.00     1.25x   us/req
swap out+in 1000 x 64 KiB, 1 seq (vs copyto)       9.00      10.00     0.90x   GB/s
"""
"""The bench table of `BENCH_ROWS`: speedup is baseline / ferrumkv for times, ferrumkv /
baseline for rates; the case names keep their leading spaces (a case under the one above)."""


def test_the_bench_table_is_pinned(mode: str) -> None:
    assert format_bench(BENCH_ROWS) == BENCH_TEXT
    assert [c.header for c in bench_table(BENCH_ROWS).columns] == [
        "case", "ferrumkv", "baseline", "speedup", "unit",
    ]  # fmt: skip


def _replica(i: int, **over: Any) -> dict[str, Any]:
    base = {
        "replica": i, "requests": 5, "done": 4, "rejected": 1, "block_hit_rate": 0.5,
        "token_hit_rate": 0.25, "preemptions": 2, "remote_hit_blocks": 3,
        "remote_read_bytes": 2**20, "remote_write_bytes": 0,
    }  # fmt: skip
    return base | over


FLEET = {
    "workload": "synthetic chats (seed 0)", "replicas": 2, "router": "prefix-aware",
    "prefix_routed": 3, "requests_done": 7, "requests_rejected": 3, "block_hit_rate": 0.5,
    "token_hit_rate": 0.25, "preemptions": 4, "remote_hit_blocks": 6,
    "remote_read_bytes": 2**21, "remote_write_bytes": 0, "wall_s": 1.5,
    "per_replica": [_replica(0), _replica(1, done=3, rejected=2, requests=1234)],
}  # fmt: skip

FLEET_TEXT = """\
2 replicas, router prefix-aware (3 requests routed to a held prefix)
replica   requests   done   rejected   block hit   token hit   preempt   remote hit   remote in   remote out
------------------------------------------------------------------------------------------------------------
      0          5      4          1       50.0%       25.0%         2            3     1.0 MiB      0.0 MiB
      1      1,234      3          2       50.0%       25.0%         2            3     1.0 MiB      0.0 MiB
------------------------------------------------------------------------------------------------------------
  total      1,239      7          3       50.0%       25.0%         4            6     2.0 MiB      0.0 MiB
wall time 1.50 s
"""  # noqa: E501


def test_the_fleet_table_is_pinned(mode: str) -> None:
    assert format_fleet(FLEET) == FLEET_TEXT
    round_robin = fleet_table(FLEET | {"router": "round-robin"})
    assert round_robin.title == "2 replicas, router round-robin"


# ---------------------------------------------------------------------- progress


def test_the_progress_bar_draws_either_way(mode: str) -> None:
    out = io.StringIO()  # not a terminal: the bar draws anyway (the caller asked for it)
    with console.progress_bar(4, "requests", out) as bar:
        bar.update(1, "running 3")
        bar.update(4, "running 0")
    text = out.getvalue()
    assert "4/4" in text and "requests" in text and "running 0" in text
    assert _ends_its_line(text)
    if mode == "plain":
        assert text.startswith("\r[" + "#" * 8 + "-" * 22 + "] 1/4 requests  running 3")
        assert "\r[" + "#" * 30 + "] 4/4 requests  running 0" in text
        assert "\x1b" not in text
    else:
        assert "\x1b[" in text  # drawn live, with rich's cursor and colour codes


def test_the_progress_bar_ends_its_line_on_an_error(mode: str) -> None:
    out = io.StringIO()
    with pytest.raises(KeyError), console.progress_bar(2, "requests", out) as bar:
        bar.update(1, "")
        raise KeyError
    assert _ends_its_line(out.getvalue())


def _ends_its_line(text: str) -> bool:
    """Whether a progress bar's output ends with a newline (before rich shows the cursor)."""
    return text.removesuffix("\x1b[?25h").endswith("\n")
