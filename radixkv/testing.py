"""`PoolDriver`: run a `ModelRunner` without a scheduler (tests, benchmarks, examples).

It does the scheduler's pool bookkeeping in the simplest way: one `ReqToTokenPool` row per request,
fresh slots for every computed token, an optional shared prefix borrowed from another request's row
(a prefix hit), and frees everything when a request is released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from radixkv.model.forward_batch import ForwardBatch
from radixkv.model.model_runner import ModelRunner
from radixkv.model.sampler import make_generator
from radixkv.model.stop_checker import StopChecker
from radixkv.protocol import SamplingParams


@dataclass(slots=True)
class DriverRequest:
    """One sequence: its tokens (prompt + output), row, and how many have K/V in the pool."""

    tokens: list[int]
    row: int
    params: SamplingParams
    generator: torch.Generator | None
    prompt_len: int
    kv_len: int = 0  # tokens [0, kv_len) have K/V in the pool
    owned_slots: list[torch.Tensor] = field(default_factory=list)
    finished: bool = False

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class PoolDriver:
    """Allocates rows and slots, builds batches, runs steps and samples."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.stop = StopChecker.for_model(runner.config.eos_token_ids)

    def add(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        prefix_from: DriverRequest | None = None,
        prefix_len: int = 0,
    ) -> DriverRequest:
        """A new request; with `prefix_from`, its first `prefix_len` tokens reuse that request's
        K/V (a prefix hit; the tokens must be the same)."""
        params = params or SamplingParams()
        row = self.runner.req_pool.alloc()
        gen = None if params.is_greedy else make_generator(params, self.runner.device)
        req = DriverRequest(list(prompt), row, params, gen, len(prompt))
        if prefix_from is not None and prefix_len:
            if prefix_len >= len(prompt) or prefix_len > prefix_from.kv_len:
                raise ValueError("a prefix hit must leave one prompt token to compute")
            if prefix_from.tokens[:prefix_len] != req.tokens[:prefix_len]:
                raise ValueError("the shared prefix differs from the prompt")
            slots = self.runner.req_pool.read(prefix_from.row, 0, prefix_len)
            self.runner.req_pool.write(row, 0, slots)
            req.kv_len = prefix_len
        return req

    def _alloc(self, n: int) -> torch.Tensor:
        slots = self.runner.token_pool.alloc(n)
        if slots is None:
            raise RuntimeError(f"KV pool out of slots ({n} wanted); release requests first")
        return slots

    def build_extend(self, reqs: Sequence[DriverRequest]) -> ForwardBatch:
        """Allocate slots for every request's uncomputed tokens and write them into the rows."""
        new = [r.tokens[r.kv_len :] for r in reqs]
        slots = self._alloc(sum(len(n) for n in new))
        offset = 0
        for r, ids in zip(reqs, new, strict=True):
            own = slots[offset : offset + len(ids)]
            self.runner.req_pool.write(r.row, r.kv_len, own)
            r.owned_slots.append(own)
            offset += len(ids)
        rows = [r.row for r in reqs]
        batch = ForwardBatch.extend(new, [r.kv_len for r in reqs], rows, slots, self.runner.device)
        for r in reqs:
            r.kv_len = len(r.tokens)
        return batch

    def build_decode(self, reqs: Sequence[DriverRequest]) -> ForwardBatch:
        """One new slot per request for its last token (which has no K/V yet)."""
        if any(r.kv_len != len(r.tokens) - 1 for r in reqs):
            raise ValueError("decode needs exactly one uncomputed token per request")
        slots = self._alloc(len(reqs))
        for i, r in enumerate(reqs):
            self.runner.req_pool.write(r.row, r.kv_len, slots[i : i + 1])
            r.owned_slots.append(slots[i : i + 1])
            r.kv_len += 1
        seq_lens = [len(r.tokens) for r in reqs]
        return ForwardBatch.decode(
            [r.tokens[-1] for r in reqs], seq_lens, [r.row for r in reqs], slots, self.runner.device
        )

    def step(self, reqs: Sequence[DriverRequest], decode: bool | None = None) -> torch.Tensor:
        """Run one forward over `reqs` (decode batch if all have one new token, unless told) and
        append each request's next token; returns the logits."""
        if decode is None:
            decode = all(r.kv_len == len(r.tokens) - 1 for r in reqs)
        batch = self.build_decode(reqs) if decode else self.build_extend(reqs)
        logits = self.runner.forward(batch)
        next_ids = self.runner.sample(
            logits,
            [r.params for r in reqs],
            [r.generator for r in reqs],
            [r.output for r in reqs],
            [r.tokens[: r.prompt_len] for r in reqs],
        ).tolist()
        for r, t in zip(reqs, next_ids, strict=True):
            r.tokens.append(t)
            r.finished = self.stop.check(r.params, t, len(r.output)) is not None
        return logits

    def generate(self, reqs: Sequence[DriverRequest]) -> list[list[int]]:
        """Prefill all together, then decode the unfinished ones together until all stop."""
        self.step(reqs, decode=False)
        while running := [r for r in reqs if not r.finished]:
            self.step(running, decode=True)
        return [r.output for r in reqs]

    def release(self, req: DriverRequest) -> None:
        """Free the request's own slots (not borrowed prefix slots) and its row."""
        for slots in req.owned_slots:
            self.runner.token_pool.free(slots)
        req.owned_slots.clear()
        self.runner.req_pool.free(req.row)
