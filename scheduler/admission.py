"""Admission and memory pressure, the half of the scheduler that decides who runs.

`Admission` is a base of `Scheduler` (scheduler.py): which waiting requests the next extend
batch takes and how many tokens each (budgets, chunking, the KV reserve of the running
requests), which running requests ride along in it (mixed chunk), and which running requests go
back to the queue when the KV runs short (retraction). The attributes below are the scheduler's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from radixkv.config import ServerArgs
from radixkv.mem import KVCacheManager
from radixkv.protocol import ReqOutput, Stats
from radixkv.scheduler.pacing import PrefillPacer
from radixkv.scheduler.policy import SchedulePolicy
from radixkv.scheduler.req import Req

log = logging.getLogger("radixkv.scheduler")
Riders = tuple[list[Req], torch.Tensor] | None  # running requests riding in a prefill, their slots


class Admission:
    args: ServerArgs
    mgr: KVCacheManager
    policy: SchedulePolicy
    page: int
    waiting: list[Req]
    running: list[Req]  # decoding
    chunked: Req | None  # part-way through a chunked prefill
    new_token_ratio: float
    stats: Stats
    pacer: PrefillPacer | None  # --ttft-target

    def _mixed_riders(self) -> Riders:
        """With --enable-mixed-chunk, when a prefill may run: the running requests and their
        next slots, taken before admission, so that they decode a token in the prefill batch
        instead of waiting for every chunk of a long prompt (or decode on their own if nothing
        is admitted)."""
        if not (self.args.enable_mixed_chunk and self.running and (self.waiting or self.chunked)):
            return None
        self._make_room_for_decode()
        if not self.running:
            return None
        slots = self.mgr.alloc_decode([r.seq for r in self.running])
        assert slots is not None  # room was made above
        return list(self.running), slots

    def _decode_reserve(self) -> int:
        reqs = self.running + ([self.chunked] if self.chunked else [])
        return sum(math.ceil(r.remaining_new_tokens * self.new_token_ratio) for r in reqs)

    def _paced(
        self,
        run: Callable[[list[tuple[Req, int]], Riders], list[ReqOutput]],
        admitted: list[tuple[Req, int]],
        riders: Riders,
    ) -> list[ReqOutput]:
        """Run an extend batch (`run`: the scheduler's), counted, and timed for --ttft-target."""
        self.stats.prefill_steps += 1
        if self.pacer is None:
            return run(admitted, riders)
        self.stats.raised_prefill_steps += self.pacer.late
        start = time.perf_counter()
        outputs = run(admitted, riders)
        self.pacer.timed(time.perf_counter() - start, sum(n for _, n in admitted))
        return outputs

    def _step_budget(self) -> int:
        """The prompt tokens of the next extend batch, all requests together."""
        if self.pacer is None:
            return self.args.chunked_prefill_size
        return self.pacer.budget(self.mgr.tree, self.chunked, self.waiting, bool(self.running))

    def _admit(self) -> list[tuple[Req, int]]:
        """Pick requests for the next extend batch: (request, tokens to compute now)."""
        chosen: list[tuple[Req, int]] = []
        prefill_left = self.args.max_prefill_tokens
        chunk_left = self._step_budget()
        reserved = self._decode_reserve()
        may_chunk = True  # at most one request is part-way through its prefill
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            assert req.seq is not None
            remaining = req.extend_target - req.seq.kv_len
            n = remaining if remaining <= chunk_left else chunk_left // self.page * self.page
            may_chunk = n == remaining
            if self.mgr.alloc_extend(req.seq, req.seq.kv_len + n) is None:
                self._retract(req)  # cannot even continue: try again from the queue later
            else:
                chosen.append((req, n))
                prefill_left -= n
                chunk_left -= n
        if not self.waiting:
            return chosen
        ordered, deferred = self.policy.order(self.waiting, in_flight=[r for r, _ in chosen])
        if self.pacer is not None and self.pacer.urgent:  # the budget was raised for these
            urgent = self.pacer.urgent - deferred
            ordered = [r for r in ordered if id(r) in urgent] + [
                r for r in ordered if id(r) not in urgent
            ]
        admitted: set[int] = set()
        for req in ordered:
            if id(req) in deferred or prefill_left <= 0 or chunk_left <= 0:
                break
            if len(self.running) + len(chosen) >= self.args.max_running_requests:
                break
            if self.mgr.req_pool.available_size() == 0:
                break
            n = self._admit_one(req, min(prefill_left, chunk_left), reserved, may_chunk)
            if n == 0:
                break
            may_chunk = may_chunk and not req.prefilling
            chosen.append((req, n))
            admitted.add(id(req))
            reserved += math.ceil(req.remaining_new_tokens * self.new_token_ratio)
            prefill_left -= n
            chunk_left -= n
        if admitted:
            self.waiting = [r for r in self.waiting if id(r) not in admitted]
            for r in self.waiting:
                r.skips += 1
        return chosen

    def _admit_one(self, req: Req, limit: int, reserved: int, may_chunk: bool) -> int:
        """Lock the request's cached prefix and allocate its first extend; 0 if it does not fit."""
        # prompt log probabilities need the logits of every position from logprob_start_len - 1
        # on: those positions are computed, not matched in the tree (admit matches at most
        # len(tokens) - 1 of the tokens it is given)
        cap = req.params.logprob_start_len if req.wants_prompt_logprobs else None
        seq = self.mgr.admit(req.tree_ids, cap, req.params.priority)
        assert seq is not None  # a free row was checked by the caller
        fill = len(req.fill_ids)
        n = min(fill - seq.cached_len, limit)
        if n < fill - seq.cached_len:
            n = n // self.page * self.page  # a chunk ends on a page boundary
            if not may_chunk or n == 0:
                self.mgr.release(seq)
                return 0
        own_reserve = math.ceil(req.remaining_new_tokens * self.new_token_ratio)
        room = self.mgr.available_size() - reserved
        if n + own_reserve > room or self.mgr.alloc_extend(seq, seq.kv_len + n) is None:
            self.mgr.release(seq)
            return 0
        req.seq = seq
        req.extend_target = fill
        if not req.first_admitted:
            req.first_admitted = True
            req.cached_tokens = seq.cached_len
            req.queue_time = time.monotonic() - req.queued_at
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.cached_tokens += seq.cached_len
        return n

    # ---- memory pressure ----------------------------------------------------------------------

    def _make_room_for_decode(self) -> None:
        """Retract running requests (fewest generated tokens first) until every one left can get
        its next slot; evicting from the tree happens inside the allocation."""
        while self.running:
            need = sum(1 for r in self.running if r.seq.kv_len % self.page == 0)
            if self.mgr.available_size() >= need * self.page:
                return
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
            self.running.remove(victim)
            self._retract(victim)

    def _retract(self, req: Req) -> None:
        """Give a running request's KV back (cached, so evictable) and queue it again; it resumes
        by prefilling prompt + output so far and continues with the same tokens."""
        assert req.seq is not None
        self.mgr.cache_finished(req.seq, req.tree_ids)
        req.seq = None
        req.extend_target = 0
        self.waiting.append(req)
        self.stats.retractions += 1
        self.new_token_ratio = self.args.new_token_ratio
        log.info("retracted %s (%d tokens generated) to free KV", req.rid, len(req.output_ids))
