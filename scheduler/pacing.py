"""How many prompt tokens one extend batch may compute, under `--ttft-target`.

A prefill step is a gap in every decoding request's stream (with `--enable-mixed-chunk` they ride
along in it, a token each, but wait for the whole step): small steps keep the inter-token
latency smooth, big ones prefill faster per token (fewer passes over the weights, fewer riders'
decodes) and so bring first tokens sooner. `PrefillPacer` takes small steps, of
`--chunked-prefill-size` tokens, as long as every queued prompt can still get its first token
within `--ttft-target` seconds of its arrival at their pace. When one cannot, the step takes
every uncached token up to and including the first such prompt's (up to `--max-prefill-tokens`),
those prompts first in it; a later late prompt gets the next step, so the first is not held up
by the second's tokens. With nothing decoding, small steps protect nobody: a step takes the full
budget.

The check, each step, in deadline order (the chunked request, then the waiting ones by arrival; a
retracted request, which had its first token, has no deadline but its tokens count for those after
it): `S_i` the uncached tokens of request i and of those before it, `slack_i` the time left to its
deadline, `ts` the measured seconds per prompt token of a small step (a moving average, so the rule
follows the machine and the batch: riders included). It is on time if `S_i * ts <= slack_i`. Before
a small step was timed, every step is small.

Computing just enough now for the rest to finish at the deadline at small steps was tried: it
plans every at-risk prompt to land at the deadline, so the next burst makes it late
(docs/scheduling.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from radixkv.config import ServerArgs
from radixkv.mem import RadixCache
from radixkv.scheduler.req import Req

SCAN = 256  # waiting requests looked at per step (the oldest; like the policy's window)


class PrefillPacer:
    def __init__(self, target_s: float, chunk: int, max_tokens: int, page: int) -> None:
        self.target_s = target_s
        self.chunk = chunk
        self.max_tokens = max(chunk, max_tokens)
        self.page = page
        self.small_s: float | None = None  # seconds per prompt token, small steps
        self.urgent: set[int] = set()  # ids of the requests the last budget was raised for
        self.raised = False  # the last budget is more than a small step's
        self.late = False  # ... because a prompt would be late (not because nothing decodes)

    @classmethod
    def for_args(cls, args: ServerArgs, page: int) -> PrefillPacer | None:
        """The pacer of `--ttft-target`, or None without one."""
        if args.ttft_target is None:
            return None
        return cls(args.ttft_target, args.chunked_prefill_size, args.max_prefill_tokens, page)

    def budget(
        self, tree: RadixCache, chunked: Req | None, waiting: Sequence[Req], decoding: bool
    ) -> int:
        """The prompt tokens the next extend batch may compute, all requests together."""
        self.urgent = set()
        self.raised = self.late = False
        if not decoding:
            self.raised = True
            return self.max_tokens
        if self.small_s is None:  # no small step timed yet: take one
            return self.chunk
        need = 0
        order: list[int] = []
        now, total = time.monotonic(), 0
        pending = ([chunked] if chunked is not None else []) + sorted(
            waiting[:SCAN], key=lambda r: r.queued_at
        )
        for req in pending:
            order.append(id(req))
            total += self._uncached(tree, req, chunked)
            if req.output_ids:  # retracted, resuming: its first token came long ago
                continue
            if total * self.small_s > req.queued_at + self.target_s - now:
                need = total  # one late prompt a step: those behind it wait less for theirs
                self.urgent.update(order)
                break
        self.raised = self.late = need > self.chunk
        if not self.raised:
            self.urgent = set()
            return self.chunk
        return min(self.max_tokens, -(-need // self.page) * self.page)

    @staticmethod
    def _uncached(tree: RadixCache, req: Req, chunked: Req | None) -> int:
        """Prompt tokens `req` still has to compute: beyond what the tree holds and (waiting
        ones) what the chunked request is computing for them (its questions wait for a shared
        system prompt)."""
        if req.seq is not None:  # part-way through its prefill
            return req.extend_target - req.seq.kv_len
        ids = req.tree_ids
        cached = tree.peek_prefix(ids)[0]
        if chunked is not None:
            cached = max(cached, _shared_len(ids, chunked.tree_ids))
        fill = len(req.fill_ids)
        return fill - min(cached, fill - 1)

    def timed(self, seconds: float, tokens: int) -> None:
        """An extend step of `tokens` prompt tokens under the budget last given took `seconds`
        (a moving average over ~8 small steps)."""
        if self.raised or tokens < self.chunk // 2:  # leftovers say little about the pace
            return
        per_token = seconds / tokens
        last = self.small_s
        self.small_s = per_token if last is None else last + (per_token - last) / 8


def _shared_len(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of `a` and `b` (slices compared in C, by halves)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
