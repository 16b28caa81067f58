"""The client endpoint a runtime and a router share: one ROUTER socket speaking `ClientMessage`.

`ClientEndpoint` binds the socket, checks API keys, decodes every frame inside one guard (a bad
frame gets an `ErrorReply`, an unexpected error is logged and answered, the loop goes on),
tokenizes and validates generate requests once (`intake.GenerateIntake`), answers
tokenize/detokenize/server-info itself, tracks clients that disconnect, drains on a signal and
serves the HTTP API in a thread when asked. What happens to a validated request is the
subclass's: the runtime (`server.RuntimeServer`) hands it to its scheduler, the router
(`radixkv.router.server.RouterServer`) to one of its workers.
"""

from __future__ import annotations

import abc
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from radixkv.config import ServerArgs, is_loopback, matching_key
from radixkv.frontend.intake import GenerateIntake, salvage_rid
from radixkv.frontend.loop_worker import LoopWorker
from radixkv.frontend.peer_tracker import PeerTracker, source_fd
from radixkv.frontend.sessions import SessionStore
from radixkv.frontend.tokenizer_manager import TokenizerManager
from radixkv.protocol import (
    MAX_FRAME_BYTES,
    AbortRequest,
    CloseSessionRequest,
    DemoteRequest,
    DetokenizeRequest,
    ErrorReply,
    FlushCacheRequest,
    FrameTooLarge,
    GenerateRequest,
    GetServerInfoRequest,
    GetStatsRequest,
    OpenSessionRequest,
    Ready,
    ServerInfoReply,
    TokenizeRequest,
    client_codec,
)
from radixkv.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from radixkv.http.server import HttpServer

log = logging.getLogger("radixkv.runtime")

MAX_CLIENT_FRAMES_PER_TURN = 256  # then serve the backend's outputs before reading more


class ClientEndpoint(GenerateIntake, abc.ABC):
    """Serves clients on `endpoint` until `stop()` (or a signal handler) ends `serve_forever()`.

    Subclasses implement the backend: `_start_backend`, `_on_backend` (each loop turn, with the
    poll's events), `_admit` (a validated request), `_has_request`, `_abort`, `_control`
    (stats, flush), `_client_gone`, `_in_flight`, `_fail_all` and `_close_backend`.
    """

    def __init__(self, args: ServerArgs) -> None:
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
        self.exit_status = 0  # what the process should exit with once serve_forever returns
        self.poller = zmq.Poller()
        self.codec = client_codec()
        self.encoder = msgspec.msgpack.Encoder()
        self.tm: TokenizerManager | None = None
        self.sessions = SessionStore(args.max_sessions)
        self.next_expiry = 0.0  # when idle sessions are looked for next (--session-timeout)
        if self.metrics is not None:  # two ints the loop writes, read whole by the scrape
            self.metrics.sessions = lambda: (len(self.sessions.sessions), self.sessions.tokens)
        self.ready: Ready | None = None
        self.rids = itertools.count()
        self.dead: str | None = None  # why requests are refused, while they are
        self.stopping = threading.Event()
        self.drain_requested = False  # set by a signal handler; the loop starts the drain
        self.drain_deadline: float | None = None  # while draining: when the rest is aborted

    # ---- what a backend implements ------------------------------------------------------------

    @abc.abstractmethod
    def _start_backend(self, timeout: float) -> Ready:
        """Start what serves the requests; its `Ready`."""

    def _on_backend(self, events: dict[Any, int]) -> None:
        """Each loop turn, before clients are read: the backend's sockets and timers."""

    @abc.abstractmethod
    def _control(self, identity: bytes, msg: FlushCacheRequest | GetStatsRequest) -> None:
        """A stats or flush call."""

    def _client_gone(self, identity: bytes) -> None:
        """Abort what this client had in flight (it disconnected)."""

    def _in_flight(self) -> int:
        return 0

    def _fail_all(self, message: str, code: str) -> None:
        """Answer every pending request and control call with this error and forget them."""

    def _close_backend(self) -> None:
        pass

    def describe(self) -> str:
        """What serves behind this endpoint, for the start-up log ("" for one runtime)."""
        return ""

    # ---- start-up and shutdown ----------------------------------------------------------------

    def start(self, timeout: float) -> Ready:
        """Start the backend and load the tokenizer meanwhile; serve HTTP once both are ready."""
        loaded: dict[str, Any] = {}

        def load() -> None:
            try:
                loaded["tokenizer"] = load_tokenizer(self.args.model)
            except Exception as exc:
                loaded["error"] = exc

        thread = threading.Thread(target=load, name="radixkv-tokenizer", daemon=True)
        thread.start()
        ready = self._start_backend(timeout)
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
                self.endpoint, self.args, ready, metrics, self._refusing, self.gateway_key
            )
            self.http.start(config)
        return ready

    def _refusing(self) -> str | None:
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
        """Fail what is pending, stop the backend and the HTTP server, close sockets."""
        self._fail_all("the runtime is shutting down", "internal")
        if self.http is not None:
            self.http.stop()
        self._close_backend()
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
        poller.register(self.peers.monitor, zmq.POLLIN)
        poller.register(self.worker.fd, zmq.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, zmq.POLLIN)
        while not self.stopping.is_set():
            events = dict(poller.poll(100))
            self._on_backend(events)
            if self.router in events:
                self._drain_clients()
            if self.worker.fd in events:
                self.worker.run_finished()
            for identity in self.peers.take_gone():
                self._drop_client(identity)
            if extra_fd is not None and extra_fd in events:
                on_extra()
            if self.args.session_timeout:
                self._expire_sessions()
            if self.drain_requested and self._drained():
                return

    def _expire_sessions(self) -> None:
        """Close the sessions idle past --session-timeout (checked once a second)."""
        now = time.monotonic()
        if now < self.next_expiry:
            return
        self.next_expiry = now + 1.0
        for salt, closed in self.sessions.expire(self.args.session_timeout):
            if closed:
                self._demote([p for p, _ in closed], [n for _, n in closed], salt)

    def _drained(self) -> bool:
        """Start draining, or say whether the drain is over (nothing in flight, or time is up)."""
        now = time.monotonic()
        in_flight = self._in_flight() + len(self.tokenizing)
        if self.drain_deadline is None:
            self.drain_deadline = now + self.args.drain_timeout
            log.info(
                "draining: %d requests in flight get up to %.0f s to finish; no new ones "
                "(signal again to stop at once)",
                in_flight,
                self.args.drain_timeout,
            )
        if not in_flight:
            return True
        if now >= self.drain_deadline:
            log.warning("drain timeout: aborting %d requests", self._in_flight())
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
                self.peers.seen(identity, source_fd(frames[-1]))
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
            self._error(identity, salvage_rid(payload), f"malformed or unknown message: {exc}")
            return
        if self.keys and matching_key((msg.api_key or "").encode(), self.keys) is None:
            self._error(identity, msg.rid, "missing or wrong API key", "unauthorized")
            return
        if isinstance(msg, GenerateRequest):
            self._on_generate(identity, msg)
        elif isinstance(msg, (TokenizeRequest, DetokenizeRequest)):
            self._on_tokenize(identity, msg)
        elif isinstance(msg, GetServerInfoRequest):
            assert self.ready is not None
            self._reply(identity, ServerInfoReply(rid=msg.rid, ready=self.ready))
        elif isinstance(msg, (OpenSessionRequest, CloseSessionRequest, DemoteRequest)):
            self._on_session(identity, msg)
        elif isinstance(msg, AbortRequest):
            if self._drop_tokenizing((identity, msg.rid)) is None:
                self._abort(identity, msg.rid)
        elif self.dead is not None:
            self._error(identity, msg.rid, self.dead, "internal")
        else:  # FlushCacheRequest | GetStatsRequest
            self._control(identity, msg)

    def _drop_client(self, identity: bytes) -> None:
        for key in [key for key in self.tokenizing if key[0] == identity]:
            self._drop_tokenizing(key)
        self._client_gone(identity)
        log.debug("client %s disconnected; its requests were aborted", identity.hex())
