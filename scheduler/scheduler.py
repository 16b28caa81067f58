"""The scheduler: admit waiting requests under budgets, run extend or decode batches, cache results.

No sockets here (see `process.py`): the event loop calls `add_request`, `abort`, `step`, ... so the
whole scheduling logic runs in tests without processes.
"""

from __future__ import annotations

import itertools
import logging
import math
from concurrent.futures import Future
from typing import Any

import torch

from radixkv.config import ServerArgs
from radixkv.mem import KVCacheManager
from radixkv.model.forward_batch import ForwardBatch
from radixkv.model.model_runner import ModelRunner
from radixkv.model.stop_checker import FinishReason, StopChecker
from radixkv.protocol import ReqError, ReqOutput, SamplingParams, Stats, TokenLogprob
from radixkv.scheduler.admission import Admission
from radixkv.scheduler.grammar import GrammarBackend, GrammarError
from radixkv.scheduler.pacing import PrefillPacer
from radixkv.scheduler.policy import SchedulePolicy
from radixkv.scheduler.prompt_logprobs import forward_with_prompt_logprobs
from radixkv.scheduler.req import Req

log = logging.getLogger("radixkv.scheduler")


class RequestRejected(ValueError):
    """A request the scheduler cannot serve (the message says why and what limit); `code`
    "overloaded" when it could be served later (the waiting queue is full); `param` the field
    at fault, if one is."""

    def __init__(self, message: str, code: str = "bad_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class Scheduler(Admission):
    """Continuous batching with prefix-aware admission, chunked prefill, eviction, retraction."""

    def __init__(self, args: ServerArgs, runner: ModelRunner, mgr: KVCacheManager) -> None:
        self.args = args
        self.runner = runner
        self.mgr = mgr
        self.page = mgr.page_size
        self.stop = StopChecker.for_model(runner.config.eos_token_ids)
        self.grammar = GrammarBackend(
            args.model, runner.config.vocab_size, args.json_max_whitespace
        )
        self.policy = SchedulePolicy(
            args.effective_policy,
            mgr.tree,
            max_skips=args.max_skips,
            window=args.lpm_window,
            share_len=args.in_batch_share_len,
            seed=args.seed,
        )
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # decoding
        self.chunked: Req | None = None  # part-way through a chunked prefill
        self.compiling: list[tuple[Req, Future[Any]]] = []  # waiting for their grammar
        self.rejected: list[ReqError] = []  # refused after add_request (take_rejected)
        self.new_token_ratio = args.new_token_ratio
        self.stats = Stats(kv_capacity=mgr.token_pool.capacity)
        self._order = itertools.count()
        self._decode_steps = 0
        self._checked_idle = True
        self.pacer = PrefillPacer.for_args(args, self.page)

    # ---- requests in and out ------------------------------------------------------------------

    def add_request(
        self,
        rid: str,
        input_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request validated by the front end (`radixkv.frontend.validation`: a prompt
        that fits the context, sampling in range); raises RequestRejected if it can never fit the
        KV cache, which only the scheduler knows. With a `cache_salt` it shares cached KV only
        with requests of the same salt."""
        if any(self.find(rid)):
            raise RequestRejected(f"request id {rid!r} is already in use")
        limit = self.args.max_queued_requests
        if limit is not None and len(self.waiting) + len(self.compiling) >= limit:
            raise RequestRejected(
                f"{len(self.waiting)} requests are waiting, the limit (--max-queued-requests) is "
                f"{limit}; retry later",
                "overloaded",
            )
        if params.priority and self.args.radix_eviction_policy != "priority":
            raise RequestRejected(
                f"priority {params.priority} orders cached prefixes for eviction only with "
                "--radix-eviction-policy priority (it does not reorder scheduling)",
                param="priority",
            )
        need = math.ceil((len(input_ids) + params.max_new_tokens) / self.page) * self.page
        if need > self.mgr.token_pool.capacity:
            raise RequestRejected(
                f"the request needs up to {need} KV slots but the KV cache holds "
                f"{self.mgr.token_pool.capacity}; raise --max-total-tokens / --kv-memory or "
                "lower max_new_tokens"
            )
        req = Req(rid, list(input_ids), params, self.runner.device, cache_salt)
        req.wait_order = next(self._order)
        if params.grammar is not None:
            req.matcher = self.grammar.ready_matcher(params)
            if req.matcher is None:  # compiled meanwhile; queued (or refused) by _take_compiled
                self.compiling.append((req, self.grammar.matcher_async(params)))
                return
        self.waiting.append(req)
        self.stats.requests += 1

    def _take_compiled(self) -> None:
        """Queue the requests whose grammar is compiled; refuse those whose grammar failed."""
        pending = []
        for req, future in self.compiling:
            if not future.done():
                pending.append((req, future))
                continue
            try:
                req.matcher = future.result()
            except GrammarError as exc:
                self.rejected.append(ReqError(rid=req.rid, message=str(exc), param=exc.param))
                continue
            self.waiting.append(req)
            self.stats.requests += 1
        self.compiling = pending

    def take_rejected(self) -> list[ReqError]:
        """Requests refused after add_request returned (a grammar that did not compile)."""
        rejected, self.rejected = self.rejected, []
        return rejected

    def only_compiling(self) -> bool:
        """Nothing to run until a grammar compiles (the loop may sleep briefly)."""
        return bool(self.compiling) and not (self.waiting or self.running or self.chunked)

    def find(self, rid: str) -> list[Req]:
        pool = [*self.waiting, *self.running, *([self.chunked] if self.chunked else []),
                *(req for req, _ in self.compiling)]  # fmt: skip
        return [r for r in pool if r.rid == rid]

    def abort(self, rid: str) -> list[ReqOutput]:
        """Stop a request wherever it is; its computed KV stays cached, its slots are freed."""
        out = []
        for req in self.find(rid):
            if req in self.waiting:
                self.waiting.remove(req)
            self.compiling = [(r, f) for r, f in self.compiling if r is not req]
            if req in self.running:
                self.running.remove(req)
            if req is self.chunked:
                self.chunked = None
            if req.seq is not None:
                self.mgr.cache_finished(req.seq, req.tree_ids)
                req.seq = None
            out.append(self._finish(req, "abort", []))
        return out

    def flush_cache(self) -> tuple[bool, str]:
        if self.has_work():
            n = len(self.waiting) + len(self.running) + (self.chunked is not None)
            n += len(self.compiling)
            return False, f"cannot flush the cache with {n} requests in flight"
        self.mgr.reset()
        return True, ""

    def get_stats(self) -> Stats:
        s = self.stats
        tree = self.mgr.tree
        s.evicted_tokens = tree.evicted_tokens
        s.kv_used = s.kv_capacity - self.mgr.token_pool.available_size() - tree.evictable_size()
        s.evictable, s.protected = tree.evictable_size(), tree.protected_size()
        s.running = len(self.running) + (self.chunked is not None)
        s.waiting = len(self.waiting)
        host = self.mgr.host
        if host is not None:
            s.tier_hit_tokens, s.tier_load_seconds = host.hit_tokens, host.load_seconds
            s.tier_stored_tokens, s.tier_capacity = host.stored_tokens, host.capacity
            s.tier_tokens = host.tree.total_size()
        disk = self.mgr.disk
        if disk is not None:
            s.storage_hit_tokens, s.storage_stored_tokens = disk.hit_tokens, disk.stored_tokens
            s.storage_corrupt_blocks = disk.corrupt_blocks
            s.storage_evicted_blocks = disk.evicted_blocks
        return s

    def demote(self, keys: list[list[int]], shared: list[int]) -> None:
        """Paths of closed sessions: evicted before other prefixes (`RadixCache.demote`), in
        the pool and in the host tier, and never copied down to the tier."""
        host = self.mgr.host
        for key, keep in zip(keys, shared, strict=True):
            self.stats.demoted_tokens += self.mgr.tree.demote(key, keep)
            if host is not None:  # what the tier holds of it goes first there too
                host.tree.demote(key, keep)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.compiling)

    # ---- one iteration ------------------------------------------------------------------------

    def step(self) -> list[ReqOutput]:
        """Run one batch: a prefill (extend) batch if anything can be admitted, else a decode."""
        if self.compiling:
            self._take_compiled()
        riders = self._mixed_riders()
        admitted = self._admit()
        if admitted:
            return self._paced(self._run_extend, admitted, riders)
        if self.running:
            return self._run_decode(riders)
        if not self.has_work() and not self._checked_idle:
            self.check_idle()
        return []

    def check_idle(self) -> None:
        """Invariants that must hold whenever nothing is in flight."""
        self.mgr.check_integrity([])
        self._checked_idle = True

    # ---- running batches ----------------------------------------------------------------------

    def _run_extend(
        self, admitted: list[tuple[Req, int]], riders: tuple[list[Req], torch.Tensor] | None
    ) -> list[ReqOutput]:
        ids, prefix_lens, rows, slots = [], [], [], []
        for req, n in admitted:
            assert req.seq is not None
            start = req.seq.kv_len - n
            ids.append(req.fill_ids[start : req.seq.kv_len])
            prefix_lens.append(start)
            rows.append(req.seq.row)
            slots.append(self.mgr.req_pool.read(req.seq.row, start, req.seq.kv_len))
        entries = list(admitted)
        if riders is not None:  # decoding requests, a token each after their KV (mixed chunk)
            entries += [(r, 1) for r in riders[0]]
            ids += [[r.output_ids[-1]] for r in riders[0]]
            prefix_lens += [r.seq.kv_len - 1 for r in riders[0]]
            rows += [r.seq.row for r in riders[0]]
            slots.append(riders[1])
        batch = ForwardBatch.extend(ids, prefix_lens, rows, torch.cat(slots), self.runner.device)
        if any(r.wants_prompt_logprobs for r, _ in admitted):
            logits = forward_with_prompt_logprobs(self.runner, batch, entries, prefix_lens)
        else:
            logits = self.runner.forward(batch)
        done = [i for i, (r, _) in enumerate(entries) if not r.prefilling]
        outputs: list[ReqOutput] = []
        if done:
            next_ids = self._sample(logits[done], [entries[i][0] for i in done])
        for req, _ in admitted:
            if req.prefilling:
                assert req.seq is not None
                self.mgr.cache_unfinished(req.seq, req.tree_ids)
                self.chunked = req
        for i, (token, logprob) in zip(done, next_ids if done else [], strict=True):
            req = entries[i][0]
            if i >= len(admitted):  # a rider: as in a decode step
                outputs.extend(self._append(req, token, logprob))
                continue
            req.extend_target = 0
            outputs.extend(self._append(req, token, logprob))
            if req.seq is not None:  # still running: share its prompt with later arrivals now
                self.mgr.cache_unfinished(req.seq, req.tree_ids)
        if riders is not None:
            self._decoded(riders[0])
        self._log_batch("prefill", admitted, sum(prefix_lens[: len(admitted)]))
        return outputs

    def _run_decode(self, riders: tuple[list[Req], torch.Tensor] | None) -> list[ReqOutput]:
        """One token for every running request (their slots taken already when `riders`)."""
        if riders is None:
            self._make_room_for_decode()
            if not self.running:
                return []
            slots = self.mgr.alloc_decode([r.seq for r in self.running])
            assert slots is not None  # room was made above
            riders = (list(self.running), slots)
        reqs, slots = riders
        seqs = [r.seq for r in reqs]
        batch = ForwardBatch.decode(
            [r.output_ids[-1] for r in reqs],
            [s.kv_len for s in seqs],
            [s.row for s in seqs],
            slots,
            self.runner.device,
        )
        logits = self.runner.forward(batch)
        next_ids = self._sample(logits, reqs)
        outputs: list[ReqOutput] = []
        for req, (token, logprob) in zip(reqs, next_ids, strict=True):
            outputs.extend(self._append(req, token, logprob))
        self._decoded(reqs)
        return outputs

    def _decoded(self, reqs: list[Req]) -> None:
        """After a step that decoded `reqs` a token each (alone or riding in a prefill batch)."""
        self.new_token_ratio = max(
            self.args.min_new_token_ratio, self.new_token_ratio - self.args.new_token_ratio_decay
        )
        self._decode_steps += 1
        if self._decode_steps % 32 == 0:
            self._log_batch("decode", [(r, 1) for r in reqs], 0)

    def _sample(
        self, logits: torch.Tensor, reqs: list[Req]
    ) -> list[tuple[int, TokenLogprob | None]]:
        """Each request's next token, with its log probabilities if it asked for them."""
        params = [r.params for r in reqs]
        ids = self.runner.sample(
            self.grammar.mask(logits, [r.matcher for r in reqs]),
            params,
            [r.generator for r in reqs],
            [r.output_ids for r in reqs],
            [r.prompt_ids for r in reqs],
        )
        return list(zip(ids.tolist(), self.runner.logprobs(logits, ids, params), strict=True))

    def _append(self, req: Req, token: int, logprob: TokenLogprob | None) -> list[ReqOutput]:
        lps = None if logprob is None else [logprob]
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        reason = self.stop.check(req.params, token, len(req.output_ids))
        if req.matcher is not None:
            accepted = req.matcher.accept_token(token)
            if reason is None and (req.matcher.is_terminated() or not accepted):
                reason = FinishReason.STOP  # the grammar is complete
        if reason is None:
            if req not in self.running:
                self.running.append(req)
            return [self._output(req, [token], None, lps)]
        if req in self.running:
            self.running.remove(req)
        assert req.seq is not None
        self.mgr.cache_finished(req.seq, req.tree_ids)
        req.seq = None
        return [self._finish(req, reason.value, [token], lps)]

    def _finish(
        self, req: Req, reason: str, tokens: list[int], lps: list[TokenLogprob] | None = None
    ) -> ReqOutput:
        req.finish_reason = reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._checked_idle = False
        return self._output(req, tokens, reason, lps)

    @staticmethod
    def _output(
        req: Req, tokens: list[int], reason: str | None, lps: list[TokenLogprob] | None = None
    ) -> ReqOutput:
        prompt_lps, req.prompt_lps = req.prompt_lps, None  # sent once, with the first token
        return ReqOutput(
            req.rid, tokens, reason, len(req.prompt_ids), req.cached_tokens, req.queue_time, lps,
            prompt_lps,
        )  # fmt: skip

    def _log_batch(self, kind: str, batch: list[tuple[Req, int]], cached: int) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        used = self.mgr.token_pool.capacity - self.mgr.token_pool.available_size()
        log.info(
            "%s batch: %d reqs, new tokens %d, cached tokens %d, running %d, waiting %d, "
            "KV usage %.1f%% (evictable %d)",
            kind, len(batch), sum(n for _, n in batch), cached, len(self.running),
            len(self.waiting), 100 * used / self.mgr.token_pool.capacity,
            self.mgr.tree.evictable_size(),
        )  # fmt: skip
