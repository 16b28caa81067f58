"""The runtime process: the client endpoint (`endpoint.ClientEndpoint`), the TokenizerManager
and the scheduler child.

One thread, one `zmq.Poller` loop: client frames are validated, tokenized and forwarded; scheduler
outputs are detokenized and routed back to the client that asked. Nothing a client sends can stop
the loop (see `endpoint`; tests/test_frontend_fuzz.py throws random bytes and msgpack structures
at a live runtime).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import zmq

from radixkv.config import ServerArgs
from radixkv.frontend.endpoint import ClientEndpoint
from radixkv.frontend.scheduler_child import (
    DEFAULT_SCHEDULER,
    SchedulerChild,
    remove_stale_ipc_dirs,
)
from radixkv.frontend.tokenizer_manager import ReqState
from radixkv.protocol import (
    AbortRequest,
    BatchOutput,
    DemotePaths,
    Fatal,
    FlushCacheRequest,
    FlushReply,
    GenerateRequest,
    GenerateResult,
    GetStatsRequest,
    Ready,
    ReqError,
    StatsReply,
    TokenizedRequest,
    tree_key,
)

log = logging.getLogger("radixkv.runtime")

LIVENESS_INTERVAL = 0.5  # seconds between checks that the scheduler process is alive
SCHEDULER_DIED = 3  # the exit status of a runtime whose scheduler died for good


class RuntimeServer(ClientEndpoint):
    """Serves clients on `endpoint` with one scheduler child, until `stop()`."""

    def __init__(
        self,
        args: ServerArgs,
        scheduler: str = DEFAULT_SCHEDULER,
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(args)
        remove_stale_ipc_dirs()
        self.scheduler, self.scheduler_kwargs = scheduler, scheduler_kwargs
        self.child = SchedulerChild(self.ctx, args, scheduler, scheduler_kwargs)
        self.start_timeout = 0.0  # set by start(); a restarted scheduler gets as long
        self.restarts = 0
        self.requests: dict[str, ReqState] = {}  # scheduler rid -> state
        self.by_client: dict[tuple[bytes, str], str] = {}  # (identity, client rid) -> scheduler rid
        self.control: dict[str, tuple[bytes, str]] = {}  # stats/flush: scheduler rid -> client
        self.dropped_scheduler_frames = 0
        self.next_check = 0.0

    # ---- the backend: one scheduler child ------------------------------------------------------

    def _start_backend(self, timeout: float) -> Ready:
        """Spawn the scheduler and wait for its Ready."""
        self.start_timeout = timeout
        self.child.start()
        ready = self.child.wait_ready(timeout, keep_waiting=lambda: not self.stopping.is_set())
        self.poller.register(self.child.from_scheduler, zmq.POLLIN)
        return ready

    def _close_backend(self) -> None:
        self.child.shutdown()

    def _on_backend(self, events: dict[Any, int]) -> None:
        if self.child.from_scheduler in events:
            self._drain_scheduler()
        if time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + LIVENESS_INTERVAL
            if self.dead is None and not self.child.alive():
                self._drain_scheduler()  # its last words first
                self._scheduler_died(
                    f"the scheduler process died ({self.child.exit_description()})"
                )

    def _in_flight(self) -> int:
        return len(self.requests)

    def _has_request(self, key: tuple[bytes, str]) -> bool:
        return key in self.by_client

    def _abort(self, identity: bytes, client_rid: str) -> None:
        rid = self.by_client.get((identity, client_rid))
        if rid is not None:
            self.child.send(AbortRequest(rid=rid))

    def _control(self, identity: bytes, msg: FlushCacheRequest | GetStatsRequest) -> None:
        rid = f"c{next(self.rids)}"
        self.control[rid] = (identity, msg.rid)
        forward = (
            FlushCacheRequest(rid=rid)
            if isinstance(msg, FlushCacheRequest)
            else GetStatsRequest(rid=rid)
        )
        self.child.send(forward)

    def _admit(self, identity: bytes, msg: GenerateRequest, ids: list[int], arrival: float) -> None:
        assert self.tm is not None
        rid = str(next(self.rids))
        self.requests[rid] = self.tm.new_state(msg, identity, ids, arrival)
        self.by_client[(identity, msg.rid)] = rid
        salt = self._cache_salt(msg)
        forward = TokenizedRequest(rid=rid, input_ids=ids, sampling=msg.sampling, cache_salt=salt)
        self.child.send(forward)

    def _client_gone(self, identity: bytes) -> None:
        for (ident, _), rid in list(self.by_client.items()):
            if ident == identity:
                self.child.send(AbortRequest(rid=rid))
                self._forget(rid)
                if self.metrics is not None:
                    self.metrics.observe_end("abort")

    def _demote(self, paths: list[list[int]], shared: list[int], salt: str | None) -> None:
        self.child.send(DemotePaths(keys=[tree_key(p, salt) for p in paths], shared=shared))

    def _forget(self, rid: str) -> ReqState | None:
        state = self.requests.pop(rid, None)
        if state is not None:
            self.by_client.pop((state.identity, state.rid), None)
            self.sessions.drop((state.identity, state.rid))  # unless it finished
        return state

    # ---- scheduler ----------------------------------------------------------------------------

    def _drain_scheduler(self) -> None:
        while True:
            try:
                frame = self.child.from_scheduler.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = self.child.codec.decode(frame)
            except (msgspec.DecodeError, ValueError) as exc:
                self.dropped_scheduler_frames += 1
                log.warning("dropped a malformed frame from the scheduler: %s", exc)
                continue
            self._on_scheduler_message(msg)

    def _on_scheduler_message(self, msg: Any) -> None:
        assert self.tm is not None
        if isinstance(msg, BatchOutput):
            for out in msg.outputs:
                state = self.requests.get(out.rid)
                if state is None:
                    continue  # aborted, stopped by a stop string, or its client left
                step = self.tm.on_output(state, out)
                if step.token_gap is not None and self.metrics is not None:
                    self.metrics.observe_token_gap(step.token_gap)
                for reply in step.replies:
                    self._reply(state.identity, reply)
                if step.finished:
                    self.sessions.finish((state.identity, state.rid), state.token_ids)
                    self._forget(out.rid)
                    result = step.replies[-1]
                    if self.metrics is not None and isinstance(result, GenerateResult):
                        self.metrics.observe_result(result)
                    if step.abort_scheduler:
                        self.child.send(AbortRequest(rid=out.rid))
        elif isinstance(msg, ReqError):
            state = self._forget(msg.rid)
            if state is not None:
                self._error(state.identity, state.rid, msg.message, msg.code, msg.param)
                if self.metrics is not None:
                    self.metrics.observe_end("error")
        elif isinstance(msg, (StatsReply, FlushReply)):
            client = self.control.pop(msg.rid, None)
            if client is not None:
                identity, client_rid = client
                self._reply(identity, msgspec.structs.replace(msg, rid=client_rid))
        elif isinstance(msg, Fatal):
            self._scheduler_died(f"the scheduler stopped: {msg.message}")

    def _scheduler_died(self, reason: str) -> None:
        """Fail what it was running; restart it (args.on_scheduler_death) or stop serving."""
        args = self.args
        restart = args.on_scheduler_death == "restart"
        if restart and self.restarts >= args.max_scheduler_restarts:
            restart = False
            reason = f"{reason}; it was restarted {self.restarts} times already"
        then = "a new scheduler is starting" if restart else "the runtime exits"
        self._fail_all(f"{reason}; the request was lost; {then}", "internal")
        if restart:
            self.restarts += 1
            self.dead = f"{reason}; {then}"
            log.error("%s; restarting it (%d of %d)", reason, self.restarts,
                      args.max_scheduler_restarts)  # fmt: skip
            try:
                self._restart_scheduler()
            except Exception as exc:
                reason = f"{reason}; restarting it failed: {exc}"
            else:
                self.dead = None
                log.info("the scheduler is serving again")
                return
        self.dead = f"{reason}; the runtime exits"
        log.error("%s", self.dead)
        self.exit_status = SCHEDULER_DIED
        self.stop()

    def _restart_scheduler(self) -> None:
        """A new scheduler process and channel (blocking: client messages wait in the socket)."""
        self.poller.unregister(self.child.from_scheduler)
        self.child.shutdown(timeout=1)
        self.child = SchedulerChild(self.ctx, self.args, self.scheduler, self.scheduler_kwargs)
        self.child.start()
        self.child.wait_ready(self.start_timeout, keep_waiting=lambda: not self.stopping.is_set())
        self.poller.register(self.child.from_scheduler, zmq.POLLIN)

    def _fail_all(self, message: str, code: str) -> None:
        for state in self.requests.values():
            self._error(state.identity, state.rid, message, code)
            self.sessions.drop((state.identity, state.rid))
            if self.metrics is not None:
                self.metrics.observe_end("error")
        for identity, client_rid in self.control.values():
            self._error(identity, client_rid, message, code)
        self._fail_tokenizing(message, code)
        self.requests.clear()
        self.by_client.clear()
        self.control.clear()
