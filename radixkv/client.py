"""`radixkv.Client`: a synchronous client of a runtime's endpoint over one ZMQ DEALER socket."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import msgspec
import zmq

from radixkv.client_common import (
    DEFAULT_TIMEOUT,
    LOST,
    Message,
    RequestError,
    Result,
    encode_checked,
    is_batch_of_conversations,
    is_batch_of_ids,
    make_sampling,
    prompt_kind,
    reply_error,
    to_messages,
)
from radixkv.protocol import (
    AbortRequest,
    FlushCacheRequest,
    FlushReply,
    GenerateRequest,
    GenerateResult,
    GetStatsRequest,
    Stats,
    StatsReply,
    TokenChunk,
    WireSamplingParams,
    reply_codec,
)
from radixkv.streams import Stream


class Client:
    """Sends requests to a runtime and waits for the replies.

    One DEALER socket; replies are matched to calls by request id, so a partly read stream and
    other calls can be interleaved. Not for concurrent use: a call made while another thread is
    inside one raises at once; give each thread its own Client (they are cheap) or use
    `AsyncClient`. `timeout` (seconds, None = forever) bounds the wait for the result of a call,
    or for the next chunk of a stream; on expiry the request is aborted and TimeoutError raised.
    """

    def __init__(
        self, endpoint: str, api_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.endpoint = endpoint
        self.api_key = api_key
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self._codec = reply_codec()
        self._encoder = msgspec.msgpack.Encoder()
        self._inbox: dict[str, deque[Any]] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._deferred_aborts: list[str] = []
        self._closed = False

    # ---- public API ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        stream: bool = False,
        params: WireSamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Complete a prompt (-> Result), a list of prompts (-> list[Result], sent at once so the
        scheduler batches them) or stream one (-> Stream of text chunks, then the Result)."""
        sp = make_sampling(params, sampling)
        if isinstance(prompt, str):
            return self._one({"text": prompt}, sp, stream, timeout)
        return self._batch([{"text": p} for p in prompt], sp, stream, timeout)

    def generate_ids(
        self,
        input_ids: Sequence[int] | Sequence[Sequence[int]],
        *,
        stream: bool = False,
        params: WireSamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Like `generate`, from token ids (one list, or a list of lists for a batch)."""
        sp = make_sampling(params, sampling)
        if is_batch_of_ids(input_ids):
            kinds = [{"input_ids": list(ids)} for ids in input_ids]  # type: ignore[arg-type]
            return self._batch(kinds, sp, stream, timeout)
        return self._one({"input_ids": list(input_ids)}, sp, stream, timeout)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        *,
        stream: bool = False,
        params: WireSamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Like `generate`, from chat messages ({"role", "content"}) templated by the runtime;
        a list of conversations is a batch."""
        sp = make_sampling(params, sampling)
        if is_batch_of_conversations(messages):
            kinds = [{"messages": to_messages(conv)} for conv in messages]  # type: ignore[arg-type]
            return self._batch(kinds, sp, stream, timeout)
        return self._one({"messages": to_messages(messages)}, sp, stream, timeout)  # type: ignore[arg-type]

    def stream(
        self,
        prompt: str | list[int] | list[Message],
        *,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Stream:
        """Stream one prompt (text, token ids or chat messages): text chunks, then the Result."""
        sp = make_sampling(sampling.pop("params", None), sampling)
        stream: Stream = self._one(prompt_kind(prompt), sp, True, timeout)
        return stream

    def stats(self, timeout: float | None = None) -> Stats:
        """The scheduler's counters and gauges (`Stats.hit_rate` = cached / prompt tokens)."""
        reply = self._control(GetStatsRequest, timeout)
        assert isinstance(reply, StatsReply)
        return reply.stats

    def flush_cache(self, timeout: float | None = None) -> None:
        """Empty the radix cache; raises RequestError while requests are in flight."""
        reply = self._control(FlushCacheRequest, timeout)
        assert isinstance(reply, FlushReply)
        if not reply.ok:
            raise RequestError(f"cannot flush the cache: {reply.message}", "bad_request")

    def close(self) -> None:
        """Abort this client's unfinished requests and close the socket."""
        if self._closed:
            return
        with self._lock:
            for rid in list(self._inbox):
                self._send(AbortRequest(rid=rid, api_key=self.api_key))
            self._closed = True
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close()
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests -----------------------------------------------------------------------------

    def _submit(self, kind: dict[str, Any], sp: WireSamplingParams, stream: bool) -> str:
        rid = f"r{next(self._ids)}"
        request = GenerateRequest(rid=rid, sampling=sp, stream=stream, api_key=self.api_key, **kind)
        frame = encode_checked(self._encoder, request)
        self._inbox[rid] = deque()
        self._sock.send(frame)
        return rid

    def _one(
        self, kind: dict[str, Any], sp: WireSamplingParams, stream: bool, timeout: float | None
    ) -> Any:
        with self._use():
            rid = self._submit(kind, sp, stream)
        if stream:
            return Stream(self, rid, self._timeout(timeout))
        with self._use():
            return self._result_of(rid, self._timeout(timeout))

    def _batch(
        self,
        kinds: list[dict[str, Any]],
        sp: WireSamplingParams,
        stream: bool,
        timeout: float | None,
    ) -> list[Any]:
        if stream:
            return [self._one(k, sp, True, timeout) for k in kinds]
        with self._use():
            rids = [self._submit(k, sp, False) for k in kinds]
            index = {rid: i for i, rid in enumerate(rids)}
            results: dict[str, Result] = {}
            try:
                while len(results) < len(rids):
                    left = [r for r in rids if r not in results]
                    rid, reply = self._wait(left, self._timeout(timeout))
                    if isinstance(reply, GenerateResult):
                        results[rid] = Result.from_reply(reply)
                        self._inbox.pop(rid, None)
                    elif not isinstance(reply, TokenChunk):
                        raise self._failure(reply, f"prompt {index[rid]} of {len(rids)}")
            finally:
                for rid in rids:
                    if rid not in results and rid in self._inbox:
                        self._abort(rid)
            return [results[r] for r in rids]

    def _result_of(self, rid: str, timeout: float | None) -> Result:
        try:
            while True:
                _, reply = self._wait([rid], timeout)
                if isinstance(reply, GenerateResult):
                    self._inbox.pop(rid, None)
                    return Result.from_reply(reply)
                if not isinstance(reply, TokenChunk):
                    raise self._failure(reply)
        finally:
            if rid in self._inbox:
                self._abort(rid)

    def _control(
        self, kind: type[GetStatsRequest] | type[FlushCacheRequest], timeout: float | None
    ) -> Any:
        with self._use():
            rid = f"c{next(self._ids)}"
            self._inbox[rid] = deque()
            self._sock.send(self._encoder.encode(kind(rid=rid, api_key=self.api_key)))
            try:
                _, reply = self._wait([rid], self._timeout(timeout))
            finally:
                self._inbox.pop(rid, None)
            if isinstance(reply, (StatsReply, FlushReply)):
                return reply
            raise self._failure(reply)

    def _failure(self, reply: Any, context: str = "") -> Exception:
        return reply_error(reply, self.endpoint, context)

    def _stream_next(self, rid: str, timeout: float | None) -> Any:
        """The next reply of a stream; a timeout or interrupt aborts the request."""
        with self._use():
            try:
                _, reply = self._wait([rid], timeout)
            except BaseException:
                self._abort(rid)
                raise
            if not isinstance(reply, TokenChunk):
                self._inbox.pop(rid, None)
            return reply

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _abort(self, rid: str) -> None:
        self._inbox.pop(rid, None)
        if not self._closed:
            self._send(AbortRequest(rid=rid, api_key=self.api_key))

    def abort_later(self, rid: str) -> None:
        """Abort from any thread or a finalizer: sent now if the socket is free, else next call."""
        if self._closed or rid not in self._inbox:
            return
        if self._lock.acquire(blocking=False):
            try:
                self._abort(rid)
            finally:
                self._lock.release()
        else:
            self._deferred_aborts.append(rid)

    # ---- socket -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _use(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "this Client is in use by another thread; a Client is not thread-safe: give each "
                "thread its own radixkv.Client(endpoint) or use radixkv.AsyncClient"
            )
        try:
            if self._closed:
                raise RuntimeError("the client is closed")
            while self._deferred_aborts:
                self._abort(self._deferred_aborts.pop())
            yield
        finally:
            self._lock.release()

    def _send(self, message: msgspec.Struct) -> None:
        self._sock.send(self._encoder.encode(message))

    def _wait(self, rids: Collection[str], timeout: float | None) -> tuple[str, Any]:
        """The next reply for any of `rids` (all must be pending); TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            for rid in rids:
                if self._inbox[rid]:
                    return rid, self._inbox[rid].popleft()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"no reply from the runtime at {self.endpoint} within {timeout} s; is it "
                    "running? (raise the client's timeout for long generations)"
                )
            events = dict(poller.poll(None if left is None else max(1, int(left * 1000))))
            if self._sock in events:
                self._read_replies()
            if self._monitor in events:
                self._read_monitor()

    def _read_replies(self) -> None:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._codec.decode(frame)
            except (msgspec.DecodeError, ValueError):
                continue
            inbox = self._inbox.get(reply.rid)
            if inbox is not None:
                inbox.append(reply)

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            self._monitor.recv_multipart()
            for inbox in self._inbox.values():
                inbox.append(LOST)
