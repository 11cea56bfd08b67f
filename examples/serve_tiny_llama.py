"""Continuous batching of a tiny Llama whose K/V live only in ferrumkv.

    python examples/serve_tiny_llama.py [--device cuda:0] [--quiet]

(after `make build`; it needs torch and transformers). Clients are asyncio tasks that arrive
over the first steps and await their outputs; one loop serves them, one batched forward of
the model per step (`tiny_llama.PagedLlama`: transformers' modules, attention through the
cache's block table), the way vLLM's scheduler does:

1. **Swap-in**: requests preempted by swap come back, oldest first, when the device tier has
   room for them and a block of growth for each running request.
2. **Running requests**, oldest first: a decode step appends its last sampled token (`extend`);
   a request whose prompt is still being prefilled in chunks reserves its next chunk; every
   third request makes speculative steps (prompt-lookup
   drafts, verified in the same forward, the rejected ones truncated away). When blocks are
   short the newest request not yet scheduled this step is preempted, by swap to the host
   tier and by recompute (deallocate; re-admitted later with its prompt and generated tokens,
   whose full blocks are then prefix hits) in turn.
3. **Admission**, first come first served within a token budget: `allocate` reuses the longest
   cached prefix (full blocks shared, a partly matching block copied, blocks offloaded to the
   host tier onboarded back), so only the uncached tail is computed; a long prompt is split in
   chunks (`num_new_tokens`).
4. **One forward** of every scheduled token, prefill and decode together; greedy sampling; a
   request with `n=2` forks after its first token (the child takes the second-best token).

Ordering rule the loop keeps (README, Guarantees): blocks allocated in a step are computed in
that step's forward, after the step's allocations. A full prefix hit on such a block is fine
(the forward writes each layer's K/V before any attention reads it), but a partial hit copies
the block at allocation, so a prompt whose lookup is partial is admitted only before anything
else was allocated in the step.

Each step prints `cache.iteration_stats()` (what the engine did since the previous step). At
the end every output is checked against transformers' full-context forward: same greedy
tokens, logits within 1e-4.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ferrumkv
from tiny_llama import PagedLlama, build_model, cache_config, reference_logits

ATOL = 1e-4


@dataclass(eq=False)
class Request:
    rid: str
    tokens: list[int]  # prompt + generated; the last token has no K/V until the next step
    num_prompt: int
    max_new_tokens: int
    arrival: tuple[int, int]  # priority: (arrival order, 0 for a parent / 1 for its child)
    n: int = 1
    speculative: bool = False
    computed: int = 0  # leading tokens whose K/V are in the cache
    num_alloc: int = 0  # tokens given to its (last) allocate: the prompt it prefills
    state: str = "waiting"  # waiting | running | swapped | finished
    preempted: bool = False  # waiting again after a preemption by recompute
    forked: bool = False
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> row
    forced: set[int] = field(default_factory=set)  # positions not chosen by argmax
    drafts: list[int] = field(default_factory=list)  # this step's speculative tokens

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new_tokens


@dataclass
class Report:
    num_requests: int = 0
    num_finished: int = 0
    num_steps: int = 0
    num_forks: int = 0
    num_swapped: int = 0
    num_recomputed: int = 0
    num_chunked: int = 0
    num_spec_steps: int = 0
    num_spec_accepted: int = 0
    mismatches: int = 0
    max_abs_logit_diff: float = 0.0
    wall_s: float = 0.0
    stats: Any = None
    outputs: dict[str, list[int]] = field(default_factory=dict)


class Server:
    def __init__(
        self,
        model: Any,
        cache: ferrumkv.KvCache,
        *,
        max_batch_tokens: int = 24,
        chunk_tokens: int = 8,
        spec_tokens: int = 2,
        verify: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.cache = model, cache
        self.paged = PagedLlama(model, cache)
        self.max_batch_tokens, self.chunk_tokens, self.spec_tokens = (
            max_batch_tokens,
            chunk_tokens,
            spec_tokens,
        )
        self.verify, self.log = verify, log
        self.bs = cache.config.block_size
        self.requests: list[Request] = []
        self.groups: list[tuple[list[Request], asyncio.Future[list[list[int]]]]] = []
        self.step_no = 0
        self._tick = asyncio.Event()
        self.report = Report()

    # ----- the clients' side -----------------------------------------------------------------

    async def until_step(self, k: int) -> None:
        while self.step_no < k:
            await self._tick.wait()

    async def generate(
        self, prompt: list[int], max_new_tokens: int, *, n: int = 1, speculative: bool = False
    ) -> list[list[int]]:
        """Serves one request; returns its `n` generated sequences."""
        i = len(self.groups)
        req = Request(f"r{i}", list(prompt), len(prompt), max_new_tokens, (i, 0), n, speculative)
        self.requests.append(req)
        done: asyncio.Future[list[list[int]]] = asyncio.get_running_loop().create_future()
        self.groups.append(([req], done))
        self.report.num_requests += 1
        return await done

    # ----- the loop ------------------------------------------------------------------------

    async def run(self, num_clients: int) -> Report:
        t0 = time.perf_counter()
        self.cache.iteration_stats()
        await asyncio.sleep(0)  # the clients that arrive at step 0 submit first
        while self.report.num_finished < num_clients:
            await self.step()
            self.step_no += 1
            self._tick.set()
            self._tick = asyncio.Event()
            await asyncio.sleep(0)  # clients that arrive at this step submit now
        self.report.num_steps = self.step_no
        self.report.wall_s = time.perf_counter() - t0
        self.report.stats = self.cache.stats()
        return self.report

    def _by_priority(self, state: str) -> list[Request]:
        return sorted((r for r in self.requests if r.state == state), key=lambda r: r.arrival)

    def _num_tokens(self, r: Request) -> int:
        return self.cache.get(r.rid).num_tokens

    async def step(self) -> None:
        batch: list[Request] = []
        budget = self.max_batch_tokens
        allocated = False  # anything allocated (or many slots reserved) in this step yet

        # 1. swap-in, when there is room for it and for every running request's growth
        for r in self._by_priority("swapped"):
            free = self.cache.stats().device.free_blocks
            need = len(self.cache.get(r.rid).block_ids) + len(self._by_priority("running")) + 1
            if free < need:
                break
            try:
                await self.cache.swap_in(r.rid)
            except ferrumkv.OutOfBlocksError:
                break
            r.state = "running"

        # 2. running requests: their next chunk or decode step
        for r in self._by_priority("running"):
            if r.state != "running" or budget <= 0:
                continue
            n = await self._reserve_running(r, batch, budget)
            if n:
                allocated |= n > 1
                batch.append(r)
                budget -= n

        # 3. admissions, first come first served
        for r in self._by_priority("waiting"):
            if budget <= 0:
                break
            n = await self._admit(r, budget, allocated, bool(batch))
            if not n:
                break
            allocated = True
            batch.append(r)
            budget -= n

        if batch:
            await self._forward(batch)
        self._print_step(batch)

    async def _reserve_running(self, r: Request, batch: list[Request], budget: int) -> int:
        """Reserves r's slots of this step (preempting others if blocks are short); returns
        how many tokens r computes in it (0: r itself was preempted)."""
        slots = self._num_tokens(r)
        while True:
            try:
                if slots < r.num_alloc:  # a prompt in chunks
                    n = min(self.chunk_tokens, r.num_alloc - slots, budget)
                    await self.cache.extend(r.rid, num_new_tokens=n, timeout=0)
                    self.report.num_chunked += 1
                    return n
                r.drafts = self._drafts(r, budget) if r.speculative else []
                await self.cache.extend(r.rid, [r.tokens[-1], *r.drafts], timeout=0)
                r.tokens += r.drafts
                return 1 + len(r.drafts)
            except ferrumkv.OutOfBlocksError:
                if not await self._preempt(r, batch):
                    return 0

    def _drafts(self, r: Request, budget: int) -> list[int]:
        """Prompt-lookup drafts: the tokens that followed the last earlier occurrence of the
        last two tokens (none if it never occurred)."""
        k = min(self.spec_tokens, r.max_new_tokens - len(r.generated) - 1, budget - 1)
        if k <= 0 or len(r.tokens) < 3:
            return []
        tail = r.tokens[-2:]
        for i in range(len(r.tokens) - 3, 0, -1):
            if r.tokens[i - 1 : i + 1] == tail:
                return r.tokens[i + 1 : i + 1 + k]
        return []

    async def _preempt(self, current: Request, batch: list[Request]) -> bool:
        """Preempts the newest running request that is not in this step's batch (`current`
        itself as the last resort); False if that was `current`."""
        victims = [r for r in self._by_priority("running") if r not in batch]
        victim = victims[-1]
        by_swap = (self.report.num_swapped + self.report.num_recomputed) % 2 == 0
        if by_swap:
            try:
                await self.cache.swap_out(victim.rid)
                victim.state = "swapped"
                self.report.num_swapped += 1
                self.log(f"  preempt {victim.rid} by swap ({victim.computed} tokens to host)")
                return victim is not current
            except ferrumkv.OutOfBlocksError:
                pass  # the host tier is full: recompute instead
        await self.cache.deallocate(victim.rid)
        victim.state, victim.preempted, victim.computed = "waiting", True, 0
        self.report.num_recomputed += 1
        self.log(f"  preempt {victim.rid} by recompute ({len(victim.tokens)} tokens)")
        return victim is not current

    async def _admit(self, r: Request, budget: int, allocated: bool, busy: bool) -> int:
        """Allocates r's prompt (or, resumed, its prompt and generated tokens); returns how
        many tokens it computes this step (0: not admitted now)."""
        cached = self.cache.lookup_prefix(r.tokens).num_cached_tokens
        if allocated and cached % self.bs:
            return 0  # a partial copy must not read a block this step has yet to compute
        need = len(r.tokens) - cached
        chunk = None
        if need > min(budget, self.chunk_tokens):
            chunk = min(budget, self.chunk_tokens)  # the first chunk
            self.report.num_chunked += 1
        try:
            h = await self.cache.allocate(
                r.rid, r.tokens, timeout=0, num_new_tokens=chunk, preempted=r.preempted
            )
        except ferrumkv.OutOfBlocksError:
            return 0
        r.state, r.preempted = "running", False
        r.num_alloc, r.computed = len(r.tokens), h.num_cached_tokens
        return h.num_tokens - h.num_cached_tokens

    # ----- the forward and sampling --------------------------------------------------------

    async def _forward(self, batch: list[Request]) -> None:
        ends = [self._num_tokens(r) for r in batch]
        news = [r.tokens[r.computed : e] for r, e in zip(batch, ends, strict=True)]
        out = self.paged.forward([r.rid for r in batch], news)
        for r, e, rows in zip(batch, ends, out, strict=True):
            for p, row in zip(range(r.computed, e), rows, strict=True):
                r.logits[p] = row
            r.computed = e
            if e < len(r.tokens):
                continue  # mid-prompt chunk
            if r.drafts:
                await self._verify_drafts(r)
            r.tokens.append(int(r.logits[r.computed - 1].argmax()))
            if r.n == 2 and not r.forked:
                await self._fork(r)
        for r in self._by_priority("running"):
            if r.done:
                await self._finish(r)

    async def _verify_drafts(self, r: Request) -> None:
        """Keeps the drafts the model agrees with; truncates the rest away."""
        first = len(r.tokens) - len(r.drafts)  # position of the first draft
        accepted = 0
        for i, t in enumerate(r.drafts):
            if int(r.logits[first - 1 + i].argmax()) != t:
                break
            accepted += 1
        keep = first + accepted
        self.report.num_spec_steps += 1
        self.report.num_spec_accepted += accepted
        if keep < len(r.tokens):
            await self.cache.truncate(r.rid, keep)
            for p in range(keep, len(r.tokens)):
                r.logits.pop(p, None)
            del r.tokens[keep:]
            r.computed = keep
        r.drafts = []

    async def _fork(self, parent: Request) -> None:
        r = parent
        r.forked = True
        child = Request(
            f"{r.rid}/1",
            [*r.tokens[:-1], int(r.logits[r.computed - 1].topk(2).indices[1])],
            r.num_prompt,
            r.max_new_tokens,
            (r.arrival[0], 1),
            computed=r.computed,
            state="running",
            forked=True,
            logits=dict(r.logits),
            forced={len(r.tokens) - 1},
        )
        await self.cache.fork(r.rid, child.rid)
        self.requests.append(child)
        next(g for g, _ in self.groups if g[0] is r).append(child)
        self.report.num_forks += 1

    async def _finish(self, r: Request) -> None:
        await self.cache.deallocate(r.rid)
        r.state = "finished"
        del r.tokens[r.num_prompt + r.max_new_tokens :]
        self.report.outputs[r.rid] = r.generated
        if self.verify:
            self._check(r)
        for group, done in self.groups:
            if all(x.state == "finished" for x in group) and not done.done():
                if len(group) < group[0].n:
                    continue
                done.set_result([x.generated for x in group])
                self.report.num_finished += 1

    def _check(self, r: Request) -> None:
        ref = reference_logits(self.model, r.tokens)
        for p in range(r.num_prompt, len(r.tokens)):
            if p not in r.forced and r.tokens[p] != int(ref[p - 1].argmax()):
                self.report.mismatches += 1
        worst = max(float((row - ref[p]).abs().max()) for p, row in r.logits.items())
        self.report.max_abs_logit_diff = max(self.report.max_abs_logit_diff, worst)

    def _print_step(self, batch: list[Request]) -> None:
        it = self.cache.iteration_stats()
        self.log(
            f"step {self.step_no:3d} | batch {len(batch):2d} | running "
            f"{len(self._by_priority('running')):2d} waiting {len(self._by_priority('waiting')):2d}"
            f" swapped {len(self._by_priority('swapped')):2d} | device free "
            f"{it.primary_free_num_blocks:2d}/{it.primary_max_num_blocks} host used "
            f"{it.secondary_used_num_blocks:2d} | new {it.alloc_new_blocks:2d} reused "
            f"{it.full_reused_blocks}+{it.partial_reused_blocks} hit {it.cache_hit_rate:4.0%} "
            f"gen {it.gen_alloc_blocks} | offload {it.offload_blocks} onboard "
            f"{it.onboard_blocks} d2h {it.d2h_blocks_copied} h2d {it.h2d_blocks_copied} "
            f"cow {it.intra_device_copy_blocks}"
        )


# ----- the demo workload ---------------------------------------------------------------------


def workload(seed: int = 0) -> list[dict[str, Any]]:
    """12 chats on 3 system prompts (10, 9 and 13 tokens: full blocks and a partial one to
    share), arriving over the first 12 steps; two ask for n=2."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(3, 128, size=n).tolist() for n in (10, 9, 13)]
    out = []
    for i in range(12):
        user = rng.integers(3, 128, size=int(rng.integers(2, 7))).tolist()
        out.append(
            dict(
                prompt=systems[i % 3] + user,
                max_new_tokens=int(rng.integers(8, 15)),
                n=2 if i in (2, 7) else 1,
                speculative=i % 3 == 1,
                arrival_step=i,
            )
        )
    return out


def run_demo(
    model: Any = None,
    *,
    device: str = "cpu",
    num_blocks: int = 20,
    host_blocks: int = 24,
    verify: bool = True,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Serves `workload()` on a device tier of `num_blocks` blocks of 4 tokens (small enough
    to preempt) with a host tier of `host_blocks`."""
    if model is None:
        model = build_model("cuda" if device.startswith("cuda") else "cpu")
    cfg = cache_config(model, device=device, num_blocks=num_blocks, host_blocks=host_blocks)

    async def main() -> Report:
        async with ferrumkv.KvCache(cfg) as cache:
            server = Server(model, cache, verify=verify, log=log or (lambda _: None))
            specs = workload()

            async def client(spec: dict[str, Any]) -> list[list[int]]:
                await server.until_step(spec["arrival_step"])
                return await server.generate(
                    spec["prompt"],
                    spec["max_new_tokens"],
                    n=spec["n"],
                    speculative=spec["speculative"],
                )

            tasks = [asyncio.create_task(client(s)) for s in specs]
            report = await server.run(len(specs))
            await asyncio.gather(*tasks)
            cache._core.check_invariants()
            return report

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (the cache and the model)")
    ap.add_argument("--num-blocks", type=int, default=20, help="device tier blocks (4 tokens)")
    ap.add_argument("--host-blocks", type=int, default=24, help="host tier blocks")
    ap.add_argument("--quiet", action="store_true", help="no per-step lines")
    ap.add_argument("--no-verify", action="store_true", help="skip the check vs transformers")
    a = ap.parse_args()
    r = run_demo(
        device=a.device,
        num_blocks=a.num_blocks,
        host_blocks=a.host_blocks,
        verify=not a.no_verify,
        log=None if a.quiet else print,
    )
    s = r.stats
    print(
        f"{r.num_finished} requests in {r.num_steps} steps ({r.wall_s:.2f} s): "
        f"{r.num_forks} forks, {r.num_swapped} swapped and {r.num_recomputed} recomputed "
        f"preemptions, {r.num_chunked} prefill chunks, {r.num_spec_steps} speculative steps "
        f"({r.num_spec_accepted} drafts accepted)"
    )
    print(
        f"prefix cache: {s.full_reused_blocks} full + {s.partial_reused_blocks} partial blocks "
        f"reused, token hit rate {s.token_hit_rate:.0%}; host tier: {s.offload_blocks} "
        f"offloaded, {s.onboard_blocks} onboarded; copies device->host {s.d2h_blocks_copied}, "
        f"host->device {s.h2d_blocks_copied} blocks (swaps, offloads, onboards)"
    )
    if not a.no_verify:
        ok = r.mismatches == 0 and r.max_abs_logit_diff < ATOL
        verdict = "outputs identical to transformers" if ok else "MISMATCH with transformers"
        print(
            f"{verdict}: {len(r.outputs)} sequences, {r.mismatches} token mismatches, "
            f"max |logit diff| {r.max_abs_logit_diff:.2e}"
        )
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
