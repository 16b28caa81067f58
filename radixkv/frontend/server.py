"""The runtime process: the client endpoint (ROUTER), the TokenizerManager and the scheduler child.

One thread, one `zmq.Poller` loop: client frames are validated, tokenized and forwarded; scheduler
outputs are detokenized and routed back to the client that asked. Nothing a client sends can stop
the loop: every bad frame gets an `ErrorReply` (rid "" when no rid could be read), and each frame
is handled inside one guard that logs an unexpected error, answers it, and goes on
(tests/test_frontend_fuzz.py throws random bytes and msgpack structures at a live runtime).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from radixkv.config import ServerArgs, is_loopback, matching_key
from radixkv.frontend.loop_worker import LoopWorker
from radixkv.frontend.peer_tracker import PeerTracker
from radixkv.frontend.scheduler_child import (
    DEFAULT_SCHEDULER,
    SchedulerChild,
    remove_stale_ipc_dirs,
)
from radixkv.frontend.tokenizer_manager import ReqState, TokenizerManager
from radixkv.frontend.validation import BadRequest
from radixkv.protocol import (
    MAX_FRAME_BYTES,
    AbortRequest,
    BatchOutput,
    DetokenizeReply,
    DetokenizeRequest,
    ErrorReply,
    Fatal,
    FlushCacheRequest,
    FlushReply,
    FrameTooLarge,
    GenerateRequest,
    GenerateResult,
    GetStatsRequest,
    Ready,
    ReqError,
    StatsReply,
    TokenizedRequest,
    TokenizeReply,
    TokenizeRequest,
    client_codec,
    key_cache_salt,
)
from radixkv.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from radixkv.http.server import HttpServer

log = logging.getLogger("radixkv.runtime")

LIVENESS_INTERVAL = 0.5  # seconds between checks that the scheduler process is alive
SCHEDULER_DIED = 3  # the exit status of a runtime whose scheduler died for good
MAX_CLIENT_FRAMES_PER_TURN = 256  # then serve the scheduler's outputs before reading more
# A prompt larger than this (characters, see TokenizerManager.prompt_size) is templated and
# tokenized on a worker thread, so that it does not hold up everyone else's tokens: the fast
# tokenizer releases the GIL (bench/loop_stall.py measures the difference).
INLINE_TOKENIZE_CHARS = 16_384


class RuntimeServer:
    """Serves clients on `endpoint` until `stop()` (or a signal handler) ends `serve_forever()`."""

    def __init__(
        self,
        args: ServerArgs,
        scheduler: str = DEFAULT_SCHEDULER,
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.args = args
        # large prompts tokenized off the loop: (identity, client rid) -> arrival time while the
        # worker has it
        self.tokenizing: dict[tuple[bytes, str], float] = {}
        self.worker = LoopWorker("radixkv-tokenize")
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.peers = PeerTracker(self.router)
        address = f"tcp://{args.host}:{args.port or '*'}"
        try:
            self.router.bind(address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(
                f"cannot listen on {address}: {exc}; choose another --port/--host"
            ) from exc
        self.endpoint: str = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        # the HTTP gateway's own key (never shown to anyone): it authorizes its callers itself and
        # sends requests already salted by their key under --isolate-cache-per-key
        self.gateway_key: str | None = None
        self.keys: tuple[str, ...] = ()  # empty: no key needed
        if args.api_keys:
            self.gateway_key = secrets.token_hex(16)
            self.keys = (*args.api_keys, self.gateway_key)
        if not is_loopback(args.host) and args.api_key is None:
            log.warning(
                "listening on %s without an API key (--allow-no-api-key): anyone who can reach "
                "this machine can use the runtime",
                args.host,
            )
        self.http: HttpServer | None = None
        if args.http_port is not None:
            try:
                from radixkv.http.server import HttpServer  # fastapi etc. only when asked for

                self.http = HttpServer(args.host, args.http_port)
            except ImportError as exc:
                self._close_sockets()
                raise OSError(
                    f"the HTTP server needs the 'server' extra (pip install 'radixkv[server]'): "
                    f"{exc}"
                ) from exc
            except OSError:
                self._close_sockets()
                raise
        self.metrics = self.http.metrics if self.http is not None else None
        remove_stale_ipc_dirs()
        self.scheduler, self.scheduler_kwargs = scheduler, scheduler_kwargs
        self.child = SchedulerChild(self.ctx, args, scheduler, scheduler_kwargs)
        self.start_timeout = 0.0  # set by start(); a restarted scheduler gets as long
        self.restarts = 0
        self.exit_status = 0  # what the process should exit with once serve_forever returns
        self.poller = zmq.Poller()
        self.codec = client_codec()
        self.encoder = msgspec.msgpack.Encoder()
        self.tm: TokenizerManager | None = None
        self.ready: Ready | None = None
        self.requests: dict[str, ReqState] = {}  # scheduler rid -> state
        self.by_client: dict[tuple[bytes, str], str] = {}  # (identity, client rid) -> scheduler rid
        self.control: dict[str, tuple[bytes, str]] = {}  # stats/flush: scheduler rid -> client
        self.rids = itertools.count()
        self.dead: str | None = None  # why the scheduler is gone, once it is
        self.stopping = threading.Event()
        self.drain_requested = False  # set by a signal handler; the loop starts the drain
        self.drain_deadline: float | None = None  # while draining: when the rest is aborted
        self.dropped_scheduler_frames = 0

    # ---- start-up and shutdown ----------------------------------------------------------------

    def start(self, timeout: float) -> Ready:
        """Spawn the scheduler and load the tokenizer meanwhile; wait for the scheduler's Ready."""
        self.start_timeout = timeout
        self.child.start()
        loaded: dict[str, Any] = {}

        def load() -> None:
            try:
                loaded["tokenizer"] = load_tokenizer(self.args.model)
            except Exception as exc:
                loaded["error"] = exc

        thread = threading.Thread(target=load, name="radixkv-tokenizer", daemon=True)
        thread.start()
        ready = self.child.wait_ready(timeout, keep_waiting=lambda: not self.stopping.is_set())
        thread.join()
        if "error" in loaded:
            raise RuntimeError(
                f"cannot load the tokenizer of {self.args.model!r}: {loaded['error']}"
            )
        self.tm = TokenizerManager(loaded["tokenizer"], ready)
        self.ready = ready
        if self.http is not None:
            from radixkv.http.server import gateway_config

            metrics = self.http.metrics
            config = gateway_config(
                self.endpoint, self.args, ready, metrics, self._dead, self.gateway_key
            )
            self.http.start(config)
        return ready

    def _dead(self) -> str | None:
        """Why new requests are refused (HTTP /health is 503 then), or None while serving."""
        if self.dead is None and self.drain_deadline is not None:
            return "the runtime is shutting down: it finishes the running requests, takes no more"
        return self.dead

    def stop(self) -> None:
        """Ask `serve_forever` to return (safe from signal handlers and other threads)."""
        self.stopping.set()

    def drain(self) -> None:
        """Ask for a graceful stop (safe from signal handlers): new requests are refused, running
        ones get `drain_timeout` seconds to finish, then `serve_forever` returns (and `close`
        aborts what is left). Asked again while draining: stop at once."""
        if self.drain_requested:
            self.stop()
        self.drain_requested = True

    def close(self) -> None:
        """Fail what is pending, stop the scheduler, close sockets, remove the ipc directory."""
        self._fail_all("the runtime is shutting down", "internal")
        if self.http is not None:
            self.http.stop()
        self.child.shutdown()
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.worker.close()
        self.peers.close()
        self.router.close()
        self.ctx.term()

    # ---- the loop -----------------------------------------------------------------------------

    def serve_forever(
        self, extra_fd: int | None = None, on_extra: Callable[[], None] = lambda: None
    ) -> None:
        """Run until stopped; `on_extra` is called when `extra_fd` (e.g. a pipe) is readable."""
        poller = self.poller
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.child.from_scheduler, zmq.POLLIN)
        poller.register(self.peers.monitor, zmq.POLLIN)
        poller.register(self.worker.fd, zmq.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, zmq.POLLIN)
        next_check = time.monotonic() + LIVENESS_INTERVAL
        while not self.stopping.is_set():
            events = dict(poller.poll(100))
            if self.child.from_scheduler in events:
                self._drain_scheduler()
            if self.router in events:
                self._drain_clients()
            if self.worker.fd in events:
                self.worker.run_finished()
            for identity in self.peers.take_gone():
                self._client_gone(identity)
            if extra_fd is not None and extra_fd in events:
                on_extra()
            if self.drain_requested and self._drained():
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LIVENESS_INTERVAL
                if self.dead is None and not self.child.alive():
                    self._drain_scheduler()  # its last words first
                    self._scheduler_died(
                        f"the scheduler process died ({self.child.exit_description()})"
                    )

    def _drained(self) -> bool:
        """Start draining, or say whether the drain is over (nothing in flight, or time is up)."""
        now = time.monotonic()
        if self.drain_deadline is None:
            self.drain_deadline = now + self.args.drain_timeout
            log.info(
                "draining: %d requests in flight get up to %.0f s to finish; no new ones "
                "(signal again to stop at once)",
                len(self.requests) + len(self.tokenizing),
                self.args.drain_timeout,
            )
        if not self.requests and not self.tokenizing:
            return True
        if now >= self.drain_deadline:
            log.warning("drain timeout: aborting %d requests", len(self.requests))
            return True
        return False

    # ---- clients ------------------------------------------------------------------------------

    def _reply(self, identity: bytes, message: msgspec.Struct) -> None:
        try:
            self.router.send_multipart([identity, self.encoder.encode(message)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a reply to a client that is not reading")

    def _error(
        self,
        identity: bytes,
        rid: str,
        message: str,
        code: str = "bad_request",
        param: str | None = None,
    ) -> None:
        self._reply(identity, ErrorReply(rid=rid, message=message, code=code, param=param))

    def _drain_clients(self) -> None:
        for _ in range(MAX_CLIENT_FRAMES_PER_TURN):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                self.peers.seen(identity, _source_fd(frames[-1]))
                self._on_client_frames(identity, frames[1:])
            except Exception:  # the one guard: a bug on some input must not stop everyone
                log.exception("unexpected error handling a client message; the loop goes on")
                self._error(identity, "", "internal error handling this message", "internal")

    def _on_client_frames(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        if len(frames) != 1:
            self._error(identity, "", f"expected one frame per message, got {len(frames)}")
            return
        size = len(frames[0].buffer)
        if size > MAX_FRAME_BYTES:
            limit = MAX_FRAME_BYTES
            message = f"message of {size} bytes exceeds the limit of {limit} bytes"
            self._error(identity, "", message, "too_large")
            return
        payload = frames[0].bytes
        try:
            msg = self.codec.decode(payload)
        except FrameTooLarge as exc:
            self._error(identity, "", str(exc), "too_large")
            return
        except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError included
            self._error(identity, _salvage_rid(payload), f"malformed or unknown message: {exc}")
            return
        if self.keys and matching_key((msg.api_key or "").encode(), self.keys) is None:
            self._error(identity, msg.rid, "missing or wrong API key", "unauthorized")
            return
        if isinstance(msg, GenerateRequest):
            self._on_generate(identity, msg)
        elif isinstance(msg, (TokenizeRequest, DetokenizeRequest)):
            self._on_tokenize(identity, msg)
        elif isinstance(msg, AbortRequest):
            rid = self.by_client.get((identity, msg.rid))
            if rid is not None:
                self.child.send(AbortRequest(rid=rid))
            else:
                self._drop_tokenizing((identity, msg.rid))
        elif self.dead is not None:
            self._error(identity, msg.rid, self.dead, "internal")
        else:  # FlushCacheRequest | GetStatsRequest
            rid = f"c{next(self.rids)}"
            self.control[rid] = (identity, msg.rid)
            forward = (
                FlushCacheRequest(rid=rid)
                if isinstance(msg, FlushCacheRequest)
                else GetStatsRequest(rid=rid)
            )
            self.child.send(forward)

    def _on_tokenize(self, identity: bytes, msg: TokenizeRequest | DetokenizeRequest) -> None:
        """Answered here: the tokenizer is the runtime process's, the scheduler is not needed."""
        assert self.tm is not None
        try:
            if isinstance(msg, TokenizeRequest):
                ids = self.tm.tokenize_only(msg)
                context = self.tm.max_context_len
                self._reply(
                    identity, TokenizeReply(rid=msg.rid, token_ids=ids, max_context_len=context)
                )
            else:
                self._reply(identity, DetokenizeReply(rid=msg.rid, text=self.tm.detokenize(msg)))
        except BadRequest as exc:
            self._error(identity, msg.rid, str(exc), param=exc.param)

    def _on_generate(self, identity: bytes, msg: GenerateRequest) -> None:
        assert self.tm is not None
        if self.dead is not None:
            self._error(identity, msg.rid, self.dead, "internal")
            return
        if self.drain_deadline is not None:
            self._error(identity, msg.rid, self._dead() or "", "unavailable")
            return
        if not msg.rid:
            self._error(identity, "", "a generate request needs a non-empty rid")
            return
        key = (identity, msg.rid)
        if key in self.by_client or key in self.tokenizing:
            self._error(identity, msg.rid, f"request id {msg.rid!r} is already in flight")
            return
        arrival = time.perf_counter()
        if self.tm.prompt_size(msg) > INLINE_TOKENIZE_CHARS:
            self.tokenizing[key] = arrival
            tm = self.tm
            self.worker.submit(
                lambda: tm.tokenize(msg), lambda done: self._tokenized(identity, msg, done)
            )
            return
        try:
            ids = self.tm.tokenize(msg)
        except BadRequest as exc:
            self._refuse(identity, msg.rid, exc)
            return
        self._admit(identity, msg, ids, arrival)

    def _tokenized(self, identity: bytes, msg: GenerateRequest, done: Future[list[int]]) -> None:
        """A worker finished tokenizing a large prompt (called on the loop)."""
        arrival = self.tokenizing.pop((identity, msg.rid), None)
        if arrival is None:
            return  # aborted, or its client left, meanwhile
        if self.dead is not None:
            self._error(identity, msg.rid, self.dead, "internal")
            return
        try:
            ids = done.result()
        except BadRequest as exc:
            self._refuse(identity, msg.rid, exc)
            return
        self._admit(identity, msg, ids, arrival)

    def _drop_tokenizing(self, key: tuple[bytes, str]) -> None:
        """Abort a request a worker is tokenizing: its result will be dropped."""
        if self.tokenizing.pop(key, None) is not None and self.metrics is not None:
            self.metrics.observe_end("abort")  # it never reached the scheduler: counted here

    def _refuse(self, identity: bytes, rid: str, exc: BadRequest) -> None:
        self._error(identity, rid, str(exc), param=exc.param)
        if self.metrics is not None:
            self.metrics.observe_end("error")

    def _admit(self, identity: bytes, msg: GenerateRequest, ids: list[int], arrival: float) -> None:
        assert self.tm is not None
        rid = str(next(self.rids))
        self.requests[rid] = self.tm.new_state(msg, identity, ids, arrival)
        self.by_client[(identity, msg.rid)] = rid
        salt = msg.cache_salt
        if self.args.isolate_cache_per_key and msg.api_key != self.gateway_key:
            assert msg.api_key is not None  # checked on arrival
            salt = key_cache_salt(msg.api_key, salt)  # (the HTTP gateway salts by its caller's)
        forward = TokenizedRequest(rid=rid, input_ids=ids, sampling=msg.sampling, cache_salt=salt)
        self.child.send(forward)

    def _client_gone(self, identity: bytes) -> None:
        for key in [key for key in self.tokenizing if key[0] == identity]:
            self._drop_tokenizing(key)
        for (ident, _), rid in list(self.by_client.items()):
            if ident == identity:
                self.child.send(AbortRequest(rid=rid))
                self._forget(rid)
                if self.metrics is not None:
                    self.metrics.observe_end("abort")
        log.debug("client %s disconnected; its requests were aborted", identity.hex())

    def _forget(self, rid: str) -> ReqState | None:
        state = self.requests.pop(rid, None)
        if state is not None:
            self.by_client.pop((state.identity, state.rid), None)
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
            if self.metrics is not None:
                self.metrics.observe_end("error")
        for identity, client_rid in self.control.values():
            self._error(identity, client_rid, message, code)
        for identity, client_rid in self.tokenizing:
            self._error(identity, client_rid, message, code)
        self.requests.clear()
        self.by_client.clear()
        self.control.clear()
        self.tokenizing.clear()


def _source_fd(frame: zmq.Frame) -> int:
    """The fd of the connection a frame came on, or -1 where libzmq cannot say (a peer speaking
    an old ZMTP version, raw bytes that are not ZMTP at all): such a peer is just not tracked."""
    try:
        return int(frame.get(zmq.SRCFD))
    except zmq.ZMQError:
        return -1


def _salvage_rid(payload: bytes) -> str:
    """The rid of a message that failed validation, if it is a map with a string rid."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return ""
    rid = raw.get("rid") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else ""
