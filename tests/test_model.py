"""Model-based test of the public async API: a hypothesis state machine that drives one
`KvCache` (device, host and disk tiers) from an event loop running in a thread (asyncio or
trio, through an anyio portal), with calls that wait, cancellations at every point, swaps held
in flight on the copy worker, gc, reset and disk faults.

Prompts may be allocated in chunks (`num_new_tokens`, then `extend(num_new_tokens=...)`),
resumed after preemption (`preempted=True`), and sequences truncated (speculative tokens
rejected) and extended again.

The oracle is the one a serving engine relies on: the K/V at position p of any sequence is a
function of (salt, tokens 0..p). Every call that hands out a sequence is "computed" at once by
writing that function's value at its new positions, so any wrong prefix hit, lost write,
block served to two owners or bytes copied from another tenant shows up as wrong bytes when
every live sequence is read back after every step. Besides the bytes: the engine's invariant
check, first come first served admission, no call refused or accepted against the lifecycle
of its sequence, and nothing left on any tier at the end.

`FERRUMKV_MODEL_EXAMPLES` scales the run (the soak in BENCHMARKS.md uses it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import ferrumkv
from ferrumkv import CopyError, InvalidStateError, OutOfBlocksError
from helpers import make_config

BS, DEVICE, HOST, DISK, LAYERS = 4, 10, 6, 12, 2
EXAMPLES = int(os.environ.get("FERRUMKV_MODEL_EXAMPLES", "1100"))
STEPS = 50
RULES_RUN = [0]  # every rule run, over all examples (printed with FERRUMKV_MODEL_REPORT=1)
SALTS = [None, "tenant-b"]
# Prompts share whole blocks ([1,2,3,4] / [1,2,3,5] agree on 3 tokens: partial reuse).
CHUNKS = [[1, 2, 3, 4], [1, 2, 3, 5], [6, 6, 6, 6]]
prompts = st.builds(
    lambda chunks, tail: [t for c in chunks for t in CHUNKS[c]] + tail,
    st.lists(st.integers(0, len(CHUNKS) - 1), max_size=3),
    st.lists(st.integers(0, 9), min_size=1, max_size=3),
)
picks = st.integers(0, 1000)


def digest0(salt: str | None) -> bytes:
    return hashlib.blake2b(repr(salt).encode(), digest_size=16).digest()


def step_digest(prev: bytes, token: int) -> bytes:
    return hashlib.blake2b(prev + token.to_bytes(8, "little"), digest_size=16).digest()


def kv_at(d: bytes, layer: int) -> tuple[bytes, bytes]:
    """The K and V bytes (2 heads x 4 dims x f16 = 16 bytes each) a model computes at a
    position whose prefix digest is `d`."""
    h = hashlib.blake2b(d, digest_size=32, person=b"layer%d" % layer).digest()
    return h[:16], h[16:]


def kv_arrays(digests: list[bytes], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The K and V arrays ([n, 2 heads, 4 dims] f16) of consecutive positions."""
    kv = [kv_at(d, layer) for d in digests]
    k = np.frombuffer(b"".join(x[0] for x in kv), np.float16).reshape(len(kv), 2, 4)
    v = np.frombuffer(b"".join(x[1] for x in kv), np.float16).reshape(len(kv), 2, 4)
    return k, v


@dataclass
class Seq:
    salt: str | None
    tokens: list[int]  # the tokens with slots
    digests: list[bytes] = field(default_factory=list)
    tier: str = "device"
    moving: bool = False
    num_prompt: int = 0
    # The whole prompt while some of its tokens have no slots (chunked prefill), else None.
    prompt: list[int] | None = None

    def grow(self, tokens: list[int]) -> None:
        prev = self.digests[-1] if self.digests else digest0(self.salt)
        for t in tokens:
            prev = step_digest(prev, t)
            self.digests.append(prev)
            self.tokens.append(t)


@dataclass
class Waiter:
    kind: str  # "alloc", "extend", "chunk" (of the prompt), "swap_out", "swap_in"
    rid: str
    order: int
    tokens: list[int] = field(default_factory=list)
    salt: str | None = None
    chunk: int | None = None  # an allocation's num_new_tokens
    state: str = "running"  # "ok", "error", "cancelled"
    error: BaseException | None = None
    scope: Any = None


class CacheMachine(RuleBasedStateMachine):
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal(self.backend)
        self.portal = self._portal_cm.__enter__()
        self._tmp = tempfile.TemporaryDirectory()
        config = make_config(
            num_blocks=DEVICE,
            host_blocks=HOST,
            disk_blocks=DISK,
            disk_path=os.path.join(self._tmp.name, "kv.bin"),
        )
        self.cache: ferrumkv.KvCache = self.portal.call(self._make, config)
        self.cache._core.set_inline_copy_bytes(0)  # every swap copies on the worker
        self.seqs: dict[str, Seq] = {}
        self.waiters: list[Waiter] = []
        self.counter = 0
        self.order = 0
        self.paused = False
        self.task_errors: list[BaseException] = []

    async def _make(self, config: ferrumkv.CacheConfig) -> ferrumkv.KvCache:
        return ferrumkv.KvCache(config)

    # ----- helpers ------------------------------------------------------------------------

    def next_order(self) -> int:
        self.order += 1
        return self.order

    def new_rid(self) -> str:
        self.counter += 1
        return f"r{self.counter}"

    def pick(self, i: int, *, settled: bool = True) -> str | None:
        """A live sequence; `settled`: none of its calls is in flight."""
        busy = {w.rid for w in self.running()} | {r for r, s in self.seqs.items() if s.moving}
        rids = sorted(r for r in self.seqs if not (settled and r in busy))
        return rids[i % len(rids)] if rids else None

    def running(self, *kinds: str) -> list[Waiter]:
        return [w for w in self.waiters if w.state == "running" and (not kinds or w.kind in kinds)]

    def compute(self, rid: str, h: Any, start: int) -> None:
        """Writes the model's K/V at positions start.. of `rid` (what a forward pass does)."""
        s = self.seqs[rid]
        assert h.num_tokens == len(s.tokens), (rid, h.num_tokens, len(s.tokens))
        n = len(s.tokens) - start
        if n <= 0:
            return
        for layer in range(LAYERS):
            self.cache.write_kv(rid, layer, start, *kv_arrays(s.digests[start:], layer))

    def admitted(
        self, rid: str, salt: str | None, tokens: list[int], h: Any, chunk: int | None = None
    ) -> None:
        """A new sequence was handed out: its cached prefix must hold its own K/V; the rest
        of the tokens it got slots for (all, or the cached ones plus one chunk) is computed
        now."""
        want = len(tokens) if chunk is None else min(len(tokens), h.num_cached_tokens + chunk)
        assert (h.num_tokens, h.num_prompt_tokens) == (want, len(tokens)), (rid, chunk, h)
        s = Seq(salt, [], num_prompt=len(tokens))
        s.grow(tokens[: h.num_tokens])
        if h.num_tokens < len(tokens):
            s.prompt = list(tokens)
        self.seqs[rid] = s
        self.check_cached(rid, h)
        self.compute(rid, h, h.num_cached_tokens)

    def extended(self, rid: str, tokens: list[int], h: Any) -> None:
        """A sequence grew by `tokens` (generated, or its prompt's next chunk): they are
        computed now."""
        s = self.seqs[rid]
        start = len(s.tokens)
        s.grow(tokens)
        if s.prompt is not None and len(s.tokens) == len(s.prompt):
            s.prompt = None  # every prompt token has a slot
        self.compute(rid, h, start)

    def check_cached(self, rid: str, h: Any) -> None:
        """The cached positions of a new sequence hold exactly its own prefix's K/V."""
        s = self.seqs[rid]
        assert 0 <= h.num_cached_tokens <= len(s.tokens) - 1
        self.check_bytes(rid, h.num_cached_tokens)

    def check_bytes(self, rid: str, n: int) -> None:
        s = self.seqs[rid]
        if n == 0:
            return
        for layer in range(LAYERS):
            k, v = self.cache.read_kv(rid, layer, 0, n)
            for p in range(n):
                want_k, want_v = kv_at(s.digests[p], layer)
                assert k[p].tobytes() == want_k, (rid, layer, p, "K: another prefix's bytes")
                assert v[p].tobytes() == want_v, (rid, layer, p, "V: another prefix's bytes")

    async def settle(self) -> None:
        """Lets the loop run until every call the engine finished has woken its waiter (the
        engine's waiting calls are exactly the model's running ones)."""
        for i in range(1000):
            await anyio.sleep(0)
            waiting = len(self.running("alloc", "extend", "chunk"))
            if i >= 3 and waiting == self.cache.stats().num_waiting:
                return
        raise AssertionError("a finished call never woke its waiter")

    def run(self, fn: Any, *args: Any) -> Any:
        """Runs an async step on the loop, then lets woken waiters run."""

        async def go() -> Any:
            try:
                return await fn(*args)
            finally:
                await self.settle()

        return self.portal.call(go)

    # ----- waiters --------------------------------------------------------------------------

    async def _wait(self, w: Waiter, timeout: float | None, *, task_status: Any) -> None:
        with anyio.CancelScope() as scope:
            w.scope = scope
            task_status.started()
            try:
                if w.kind == "alloc":
                    h = await self.cache.allocate(
                        w.rid, w.tokens, salt=w.salt, timeout=timeout, num_new_tokens=w.chunk
                    )
                elif w.kind == "chunk":
                    n = len(w.tokens)
                    h = await self.cache.extend(w.rid, num_new_tokens=n, timeout=timeout)
                elif w.kind == "extend":
                    h = await self.cache.extend(w.rid, w.tokens, timeout=timeout)
                elif w.kind == "swap_out":
                    h = await self.cache.swap_out(w.rid)
                else:
                    h = await self.cache.swap_in(w.rid)
            except (OutOfBlocksError, InvalidStateError, CopyError) as e:
                self.guarded(self.finish_error, w, e)
                return
            self.guarded(self.finish_ok, w, h)  # no await between the grant and the compute
        if scope.cancelled_caught:
            self.finish_cancelled(w)

    def guarded(self, fn: Any, *args: Any) -> None:
        """Runs a waiter's model update; a failure there is kept for the next check (a task's
        exception would otherwise be lost)."""
        try:
            fn(*args)
        except Exception as e:
            self.task_errors.append(e)

    def start(self, w: Waiter, timeout: float | None = None) -> None:
        """Starts a call as its own task: its engine call is made before this returns."""
        self.waiters.append(w)
        self.portal.start_task(self._wait, w, timeout)
        self.portal.call(self.settle)

    def finish_ok(self, w: Waiter, h: Any) -> None:
        w.state = "ok"
        if w.kind == "alloc":
            self.admitted(w.rid, w.salt, w.tokens, h, w.chunk)
        elif w.kind in ("extend", "chunk"):
            self.extended(w.rid, w.tokens, h)
        else:
            s = self.seqs[w.rid]
            s.moving = False
            s.tier = "host" if w.kind == "swap_out" else "device"
            assert h.tier == s.tier

    def finish_error(self, w: Waiter, e: BaseException) -> None:
        w.state, w.error = "error", e
        if w.kind in ("swap_out", "swap_in"):
            # no room in the target tier, or a failed copy (the swap was undone)
            assert isinstance(e, OutOfBlocksError | CopyError), e
            self.seqs[w.rid].moving = False
        elif isinstance(e, InvalidStateError):
            assert "deallocated while waiting" in str(e), e

    def finish_cancelled(self, w: Waiter) -> None:
        # A cancelled swap's copy finishes anyway: `finish_swaps` learns where it ended.
        w.state = "cancelled"

    # ----- rules ----------------------------------------------------------------------------

    @rule(
        tokens=prompts,
        salt=st.sampled_from(SALTS),
        mode=st.sampled_from(["now", "wait", "wait", "timeout"]),
        chunk=st.one_of(st.none(), st.none(), st.integers(1, 6)),
        preempted=st.booleans(),
    )
    def allocate(
        self, tokens: list[int], salt: str | None, mode: str, chunk: int | None, preempted: bool
    ) -> None:
        rid = self.new_rid()
        if mode != "now":
            timeout = 0.005 if mode == "timeout" else None
            self.start(Waiter("alloc", rid, self.next_order(), tokens, salt, chunk=chunk), timeout)
            return
        seen: dict[str, Any] = {}

        async def now() -> Any:
            # read on the loop's thread, right before the call: nothing on the loop runs in
            # between. A model waiter still "running" that the engine no longer counts was
            # granted by a worker thread and is not woken yet: it is not ahead any more.
            seen["before"] = self.cache.stats()
            waiting = self.running("alloc")
            pending = seen["before"].num_waiting > 0
            seen["ahead"] = self.running("alloc", "extend") if pending else []
            try:
                h = await self.cache.allocate(
                    rid, tokens, salt=salt, timeout=0, num_new_tokens=chunk, preempted=preempted
                )
                # Read at once, on the loop's thread, with the waiting allocations (never
                # `preempted` here) that took their grants while this call ran (its fill may
                # suspend it): they count in the same readings.
                seen["after"] = self.cache.stats()
                seen["taken"] = sum(len(w.tokens) for w in waiting if w.state == "ok")
                return h
            except OutOfBlocksError:
                # Read at once, on the loop's thread: a waiter timing out on this loop right
                # after would serve others and change the tier legitimately.
                seen["after"] = self.cache.stats()
                raise

        try:
            h = self.run(now)
        except OutOfBlocksError:
            assert seen["after"].device == seen["before"].device
            return
        assert not seen["ahead"], "a new prompt overtook a waiting call"
        # A resumed request's lookup counts apart from the hit rates, and only there.
        taken, s, was = seen["taken"], seen["after"], seen["before"]
        assert (
            s.preempted_requests - was.preempted_requests,
            s.prompt_tokens - was.prompt_tokens,
        ) == ((1, taken) if preempted else (0, len(tokens) + taken))
        self.admitted(rid, salt, tokens, h, chunk)

    @rule(i=picks, tokens=st.lists(st.integers(0, 9), min_size=1, max_size=6), wait=st.booleans())
    def extend(self, i: int, tokens: list[int], wait: bool) -> None:
        rid = self.pick(i)
        if rid is None or self.seqs[rid].tier != "device":
            return
        if self.seqs[rid].prompt is not None:
            self.refused_before_the_prompt(rid, tokens)
            return
        if wait:
            self.start(Waiter("extend", rid, self.next_order(), tokens))
            return
        self.extend_now(rid, tokens, tokens)

    @rule(i=picks, n=st.integers(1, 5))
    def extend_by_count(self, i: int, n: int) -> None:
        """Tokens whose ids are unknown: the model gives them ids nobody else uses."""
        rid = self.pick(i)
        if rid is None or self.seqs[rid].tier != "device":
            return
        if self.seqs[rid].prompt is not None:
            self.refused_before_the_prompt(rid, n)
            return
        self.counter += 1
        self.extend_now(rid, n, [1_000_000 + self.counter * 16 + j for j in range(n)])

    def refused(self, call: Any, exc: type[Exception]) -> None:
        """`call()` raises `exc` and leaves the device tier as it was. Both readings are taken
        on the loop's thread around the call: a waiter timing out on the loop just after may
        serve others and change the tier legitimately."""
        seen: dict[str, Any] = {}

        async def go() -> None:
            seen["before"] = self.cache.stats()
            try:
                await call()
            except exc:
                seen["after"] = self.cache.stats()
                raise

        with pytest.raises(exc):
            self.run(go)
        assert seen["after"].device == seen["before"].device

    def refused_before_the_prompt(self, rid: str, arg: list[int] | int) -> None:
        """Generated tokens while prompt tokens have no slots: refused, nothing changed."""
        self.refused(lambda: self.cache.extend(rid, arg, timeout=0), InvalidStateError)

    @rule(i=picks, n=st.integers(1, 6), mode=st.sampled_from(["now", "wait", "past_end"]))
    def chunk(self, i: int, n: int, mode: str) -> None:
        """The next chunk of a prompt allocated in chunks (or refused past its end)."""
        rid = self.pick(i)
        if rid is None or self.seqs[rid].tier != "device":
            return
        s = self.seqs[rid]
        left = [] if s.prompt is None else s.prompt[len(s.tokens) :]
        if mode == "past_end" or not left:
            extend = lambda: self.cache.extend(rid, num_new_tokens=len(left) + n, timeout=0)  # noqa: E731
            self.refused(extend, ValueError)
            return
        tokens = left[:n]
        if mode == "wait":
            self.start(Waiter("chunk", rid, self.next_order(), tokens))
            return

        async def now() -> Any:
            return await self.cache.extend(rid, num_new_tokens=len(tokens), timeout=0)

        try:
            h = self.run(now)
        except OutOfBlocksError:
            return
        self.extended(rid, tokens, h)

    @rule(i=picks, back=st.integers(0, 6))
    def truncate(self, i: int, back: int) -> None:
        """Drops the last `back` tokens (rejected speculative tokens); 0: one past the end,
        refused."""
        rid = self.pick(i)
        if rid is None or self.seqs[rid].tier != "device":
            return
        s = self.seqs[rid]
        if back == 0:
            self.refused(lambda: self.cache.truncate(rid, len(s.tokens) + 1), ValueError)
            return
        n = max(1, len(s.tokens) - back)
        h = self.run(self.cache.truncate, rid, n)
        del s.tokens[n:], s.digests[n:]
        assert (h.num_tokens, len(h.block_ids)) == (n, -(-n // BS))

    def extend_now(self, rid: str, arg: list[int] | int, tokens: list[int]) -> None:
        """`extend(rid, arg)` that never waits; the model appends `tokens` if it succeeds."""

        async def now() -> Any:
            return await self.cache.extend(rid, arg, timeout=0)

        try:
            h = self.run(now)
        except OutOfBlocksError:
            return
        self.extended(rid, tokens, h)

    @rule(i=picks)
    def deallocate(self, i: int) -> None:
        rid = self.pick(i, settled=False)
        waiting = [w for w in self.running("alloc")]
        if rid is None and not waiting:
            return
        if rid is None:
            rid = waiting[i % len(waiting)].rid
        if rid in self.seqs and self.seqs[rid].moving:
            if self.paused:
                with pytest.raises(InvalidStateError):
                    self.run(self.cache.deallocate, rid)
            return
        self.run(self.cache.deallocate, rid)
        self.seqs.pop(rid, None)
        self.waiters = [w for w in self.waiters if w.state == "running" or w.kind == "alloc"]
        for w in self.running():
            assert w.rid != rid or w.kind in ("swap_out", "swap_in"), "a waiter of it is left"

    @rule(i=picks)
    def fork(self, i: int) -> None:
        rid = self.pick(i)
        if rid is None or self.seqs[rid].tier != "device":
            return
        child = self.new_rid()
        self.run(self.cache.fork, rid, child)
        p = self.seqs[rid]
        prompt = None if p.prompt is None else list(p.prompt)
        self.seqs[child] = Seq(
            p.salt, list(p.tokens), list(p.digests), num_prompt=p.num_prompt, prompt=prompt
        )

    @rule(i=picks, layer=st.integers(0, LAYERS - 1), at=picks, n=st.integers(1, 9))
    def rewrite(self, i: int, layer: int, at: int, n: int) -> None:
        """Writes a sequence's own K/V again (copy-on-write of shared blocks)."""
        rid = self.pick(i)
        if rid is None or self.seqs[rid].tier != "device":
            return
        s = self.seqs[rid]
        start = at % len(s.tokens)
        n = min(n, len(s.tokens) - start)
        k, v = kv_arrays(s.digests[start : start + n], layer)
        with contextlib.suppress(OutOfBlocksError):  # no block for the copy-on-write
            self.cache.write_kv(rid, layer, start, k, v)

    @rule(i=picks)
    def touch_a_moving_sequence(self, i: int) -> None:
        """While a swap holds a sequence, every call on it is refused."""
        moving = sorted(r for r, s in self.seqs.items() if s.moving)
        if not moving or not self.paused:
            return
        rid = moving[i % len(moving)]
        one = np.zeros((1, 2, 4), np.float16)
        for call in (
            lambda: self.cache.write_kv(rid, 0, 0, one, one),
            lambda: self.cache.read_kv(rid, 0, 0, 1),
            lambda: self.run(self.cache.extend, rid, [1]),
            lambda: self.run(self.cache.truncate, rid, 1),
            lambda: self.run(self.cache.fork, rid, self.new_rid()),
        ):
            with pytest.raises(InvalidStateError):
                call()

    @rule(i=picks, out=st.booleans())
    def swap(self, i: int, out: bool) -> None:
        rid = self.pick(i)
        if rid is None:
            return
        s = self.seqs[rid]
        if (s.tier == "device") != out:
            return
        s.moving = True
        self.start(Waiter("swap_out" if out else "swap_in", rid, self.next_order()))

    @rule(on=st.booleans())
    def pause_copies(self, on: bool) -> None:
        self.paused = on
        self.cache._core.pause_copies(on)
        if not on:
            self.finish_swaps()

    @rule()
    def fail_next_copy(self) -> None:
        self.cache._core.inject_copy_faults(1)

    @rule(i=picks)
    def cancel(self, i: int) -> None:
        live = self.running()
        if not live:
            return
        w = live[i % len(live)]
        self.portal.call(w.scope.cancel)
        self.portal.call(self.settle)

    @rule(i=picks, j=picks)
    def free_then_cancel(self, i: int, j: int) -> None:
        """Blocks come back and a waiter is cancelled before it runs: a granted, untaken
        ticket is withdrawn."""
        rid = self.pick(i)
        live = self.running("alloc", "extend", "chunk")
        if rid is None or not live:
            return
        w = live[j % len(live)]
        if w.rid == rid:
            return

        async def go() -> None:
            await self.cache.deallocate(rid)
            w.scope.cancel()

        self.run(go)
        del self.seqs[rid]

    @rule(i=picks, j=picks, act=st.sampled_from(["reuse", "extend_again"]))
    def free_act_then_cancel(self, i: int, j: int, act: str) -> None:
        """Blocks come back (a waiter is granted, not yet taken), then, before the waiter runs:
        a prompt that would reuse what the grant filled, or a second extend of the waiter's
        request; then the waiter is cancelled."""
        rid = self.pick(i)
        live = self.running("alloc", "extend", "chunk")
        if rid is None or not live:
            return
        w = live[j % len(live)]
        if w.rid == rid:
            return
        if w.kind in ("extend", "chunk"):
            base = self.seqs[w.rid]
            salt, tokens = base.salt, [*base.tokens, *w.tokens, 0]
        else:
            salt, tokens = w.salt, [*w.tokens, 0]
        new = self.new_rid()

        async def go() -> None:
            await self.cache.deallocate(rid)
            if act == "reuse":
                try:
                    h = await self.cache.allocate(new, tokens, salt=salt, timeout=0)
                except OutOfBlocksError:
                    pass
                else:
                    self.admitted(new, salt, tokens, h)
            elif w.kind in ("extend", "chunk"):
                with pytest.raises(InvalidStateError):
                    await self.cache.extend(w.rid, [1], timeout=0)
            w.scope.cancel()

        del self.seqs[rid]
        self.run(go)

    @rule(ratio=st.sampled_from([0.0, 0.5, 1.0]))
    def gc(self, ratio: float) -> None:
        self.run(lambda: self.cache.gc(target_free_ratio=ratio))

    @rule()
    def reset(self) -> None:
        idle = not self.seqs and not self.running()
        assert self.cache.reset_prefix_cache() == idle

    @rule(kind=st.sampled_from(["fail_next_write", "short_next_read", "flip"]), slot=picks)
    def disk_fault(self, kind: str, slot: int) -> None:
        self.cache._core.inject_disk_fault(kind, slot % DISK, 0)

    # ----- checks ---------------------------------------------------------------------------

    def finish_swaps(self) -> None:
        """Waits until every swap copy has finished (the copier is not paused) and its waiter
        ran; learns where the swaps whose waiters were cancelled ended."""
        self.cache._core.wait_copies_idle()
        self.portal.call(self.settle)
        assert not self.running("swap_out", "swap_in"), "a finished swap's waiter never woke"
        for rid, s in self.seqs.items():
            if s.moving:  # its waiter was cancelled: the swap happened anyway (or failed)
                s.moving = False
                s.tier = self.cache.get(rid).tier

    @invariant()
    def bytes_and_bookkeeping(self) -> None:
        RULES_RUN[0] += 1
        assert not self.task_errors, self.task_errors
        if not self.paused:
            self.finish_swaps()
        self.portal.call(self._check_bytes_and_bookkeeping)

    def _check_bytes_and_bookkeeping(self) -> None:
        """On the loop's thread: no waiter runs while it checks."""
        self.cache._core.check_invariants()
        for rid, s in self.seqs.items():
            h = self.cache.get(rid)
            assert h is not None, rid
            if s.moving:
                continue
            assert h.tier == s.tier, (rid, h.tier, s.tier)
            busy = any(w.rid == rid and w.kind in ("extend", "chunk") for w in self.running())
            assert h.num_tokens == len(s.tokens) or busy, (rid, h.num_tokens, len(s.tokens))
            assert h.num_prompt_tokens == s.num_prompt, (rid, h.num_prompt_tokens, s.num_prompt)
            if s.tier == "device":
                self.check_bytes(rid, len(s.tokens))
        assert len(self.cache) == len(self.seqs)

    @invariant()
    def first_come_first_served(self) -> None:
        self.portal.call(self._check_first_come_first_served)
        # Finished calls older than every waiting one can never break the check again.
        oldest = min((w.order for w in self.running()), default=None)
        self.waiters = [
            w
            for w in self.waiters
            if w.state == "running" or (oldest is not None and w.order > oldest)
        ]

    async def _check_first_come_first_served(self) -> None:
        """On the loop's thread, once woken waiters ran. A swap finishing on the worker may
        grant a waiter at any moment (it only ever removes waiting calls), so: `can_allocate`
        answering True while the engine still has a call waiting afterwards is a bug; the order
        check runs only when the engine's waiting calls are exactly the model's."""
        await self.settle()
        pending = self.running("alloc", "extend", "chunk")
        if pending:
            free_to_admit = self.cache.can_allocate(1)
            assert not (free_to_admit and self.cache.stats().num_waiting > 0), (
                "can_allocate while a call waits"
            )
        if len(pending) != self.cache.stats().num_waiting:
            return  # a worker granted a waiter that has not run yet
        first_alloc = min((w.order for w in pending if w.kind == "alloc"), default=None)
        first_extend = min((w.order for w in pending if w.kind != "alloc"), default=None)
        for w in self.waiters:
            if w.kind == "alloc" and w.state == "ok":
                for first in (first_alloc, first_extend):
                    assert first is None or w.order < first, "a prompt overtook a waiting call"

    def teardown(self) -> None:
        try:
            if self.paused:
                self.cache._core.pause_copies(False)
                self.paused = False
            self.finish_swaps()
            for w in self.running():
                self.portal.call(w.scope.cancel)
            self.portal.call(self.settle)
            for rid in list(self.seqs):
                self.run(self.cache.deallocate, rid)
            assert not self.task_errors, self.task_errors
            s = self.cache.stats()
            assert s.device.used_blocks == 0 and s.host.used_blocks == 0, s
            assert s.num_sequences == 0 and s.num_waiting == 0
            self.cache._core.check_invariants()
        finally:
            self.cache.close()
            self._portal_cm.__exit__(None, None, None)
            self._tmp.cleanup()
            if os.environ.get("FERRUMKV_MODEL_REPORT"):
                with open("/proc/self/status") as f:
                    rss = next(line.split()[1] for line in f if line.startswith("VmRSS"))
                print(f"[model] {self.backend}: {RULES_RUN[0]} rules, RSS {rss} kB", flush=True)


class AsyncioMachine(CacheMachine):
    backend = "asyncio"


class TrioMachine(CacheMachine):
    backend = "trio"


_settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAsyncioModel = AsyncioMachine.TestCase
TestAsyncioModel.settings = _settings
TestTrioModel = TrioMachine.TestCase
TestTrioModel.settings = _settings
