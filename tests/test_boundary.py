"""What crosses from the extension is typed: KV events, pressure events and eviction events
arrive as `ferrumkv.types` objects made in Rust (no positional tuples), and a call that must
wait returns a `Ticket`, which nothing else is taken for."""

from __future__ import annotations

import pytest

import ferrumkv
from ferrumkv import _core
from ferrumkv.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EvictionEvent,
    PressureEvent,
    PressureLevel,
)
from helpers import make_config


def test_kv_events_cross_as_their_classes() -> None:
    core = _core.Engine(make_config(num_blocks=4))
    core.allocate("a", list(range(9)))  # two full blocks of 4, one token over
    core.deallocate("a")
    core.allocate("b", list(range(100, 116)))  # 4 blocks: evicts a's two cached blocks
    events = core.drain_events()
    stored = [e for e in events if type(e) is BlockStored]
    assert [s.token_ids for s in stored][:1] == [tuple(range(8))]
    first = stored[0]
    assert first.parent_block_hash is None
    assert first.block_size == 4 and first.tier == "device"
    assert isinstance(first.block_hashes, tuple) and len(first.block_hashes) == 2
    removed = [e for e in events if type(e) is BlockRemoved]
    assert removed and set(removed[0].block_hashes) <= set(first.block_hashes)
    assert all(type(e) in (BlockStored, BlockRemoved, AllBlocksCleared) for e in events)
    assert core.drain_events() == []


def test_pressure_events_carry_the_level_members() -> None:
    core = _core.Engine(make_config(num_blocks=10))
    core.set_subscribed(True)
    core.allocate("a", list(range(4 * 8)))  # 2 of 10 blocks free: under low_watermark 0.3
    (event,) = core.drain_pressure()
    assert type(event) is PressureEvent
    assert event.level is PressureLevel.HIGH and event.previous is PressureLevel.LOW
    assert (event.free_blocks, event.total_blocks) == (2, 10)
    assert core.drain_pressure() == []


def test_eviction_events_are_eviction_event_objects() -> None:
    core = _core.Engine(make_config(num_blocks=4, residency_sample_rate=1.0))
    core.allocate("a", list(range(8)))
    core.deallocate("a")
    core.allocate("b", list(range(100, 116)))  # evicts a's two sampled blocks
    events = core.drain_eviction_events()
    assert len(events) == 2
    assert all(type(e) is EvictionEvent for e in events)
    assert all(isinstance(e.reuse_gaps_seconds, tuple) for e in events)


def test_a_waiting_call_returns_a_ticket_that_only_redeems_as_itself() -> None:
    core = _core.Engine(make_config(num_blocks=4))
    core.allocate("a", list(range(16)))
    ticket = core.allocate("b", list(range(100, 104)))
    assert isinstance(ticket, _core.Ticket)
    assert repr(ticket) == f"Ticket({ticket.id})"
    with pytest.raises(TypeError):
        core.take_ticket(ticket.id)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        core.cancel_ticket(ticket.id)  # type: ignore[arg-type]
    assert core.num_tickets() == 1  # the failed calls changed nothing
    core.deallocate("a")
    finished, _ = core.drain_notifications()
    assert finished == [ticket] and hash(finished[0]) == hash(ticket)
    assert finished[0] is not ticket  # a new object, equal by its number
    handle = core.take_ticket(finished[0])
    assert handle.request_id == "b"
    assert core.num_tickets() == 0


def test_the_cache_hands_out_the_typed_events() -> None:
    with ferrumkv.KvCache(make_config(num_blocks=4)) as cache:
        cache.try_allocate("a", list(range(8)))
        (event,) = cache.drain_events()
        assert type(event) is BlockStored and event.token_ids == tuple(range(8))
