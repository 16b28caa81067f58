"""`radixkv.AsyncClient`: the asyncio twin of `Client` (zmq.asyncio, one DEALER socket)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

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
from radixkv.streams import AsyncStream


class AsyncClient:
    """Coroutine methods like `Client`'s; any number of concurrent calls on one event loop share
    the socket (a reader task routes replies by request id). Use it from one event loop."""

    def __init__(
        self, endpoint: str, api_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.endpoint = endpoint
        self.api_key = api_key
        self.timeout = timeout
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self._codec = reply_codec()
        self._encoder = msgspec.msgpack.Encoder()
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    # ---- public API ---------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[str],
        *,
        stream: bool = False,
        params: WireSamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Result, list[Result] for a list of prompts, or an AsyncStream if `stream`."""
        sp = make_sampling(params, sampling)
        if isinstance(prompt, str):
            return await self._one({"text": prompt}, sp, stream, timeout)
        return await self._batch([{"text": p} for p in prompt], sp, stream, timeout)

    async def generate_ids(
        self,
        input_ids: Sequence[int] | Sequence[Sequence[int]],
        *,
        stream: bool = False,
        params: WireSamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        sp = make_sampling(params, sampling)
        if is_batch_of_ids(input_ids):
            kinds = [{"input_ids": list(ids)} for ids in input_ids]  # type: ignore[arg-type]
            return await self._batch(kinds, sp, stream, timeout)
        return await self._one({"input_ids": list(input_ids)}, sp, stream, timeout)

    async def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        *,
        stream: bool = False,
        params: WireSamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        sp = make_sampling(params, sampling)
        if is_batch_of_conversations(messages):
            kinds = [{"messages": to_messages(conv)} for conv in messages]  # type: ignore[arg-type]
            return await self._batch(kinds, sp, stream, timeout)
        return await self._one({"messages": to_messages(messages)}, sp, stream, timeout)  # type: ignore[arg-type]

    async def stream(
        self,
        prompt: str | list[int] | list[Message],
        *,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncStream:
        """`async for piece in await client.stream(...)`: text chunks, then the Result."""
        sp = make_sampling(sampling.pop("params", None), sampling)
        stream: AsyncStream = await self._one(prompt_kind(prompt), sp, True, timeout)
        return stream

    async def stats(self, timeout: float | None = None) -> Stats:
        reply = await self._control(GetStatsRequest, timeout)
        assert isinstance(reply, StatsReply)
        return reply.stats

    async def flush_cache(self, timeout: float | None = None) -> None:
        reply = await self._control(FlushCacheRequest, timeout)
        assert isinstance(reply, FlushReply)
        if not reply.ok:
            raise RequestError(f"cannot flush the cache: {reply.message}", "bad_request")

    async def close(self) -> None:
        if self._closed:
            return
        for rid in list(self._queues):
            await self._abort(rid)
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close()
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- requests -----------------------------------------------------------------------------

    async def _submit(self, kind: dict[str, Any], sp: WireSamplingParams, stream: bool) -> str:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        rid = f"r{next(self._ids)}"
        request = GenerateRequest(rid=rid, sampling=sp, stream=stream, api_key=self.api_key, **kind)
        frame = encode_checked(self._encoder, request)
        self._queues[rid] = asyncio.Queue()
        try:
            await self._sock.send(frame)
        except BaseException:  # cancelled mid-send: nothing to wait for, nothing left behind
            self._queues.pop(rid, None)
            raise
        return rid

    async def _one(
        self, kind: dict[str, Any], sp: WireSamplingParams, stream: bool, timeout: float | None
    ) -> Any:
        rid = await self._submit(kind, sp, stream)
        if stream:
            return AsyncStream(self, rid, self._timeout(timeout))
        return await self._result_of(rid, timeout)

    async def _batch(
        self,
        kinds: list[dict[str, Any]],
        sp: WireSamplingParams,
        stream: bool,
        timeout: float | None,
    ) -> list[Any]:
        rids = [await self._submit(k, sp, stream) for k in kinds]
        if stream:
            return [AsyncStream(self, rid, self._timeout(timeout)) for rid in rids]
        tasks = [asyncio.ensure_future(self._result_of(r, timeout, f"prompt {i} of {len(rids)}"))
                 for i, r in enumerate(rids)]  # fmt: skip
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # on a failure the others abort their requests as they unwind

    async def _result_of(self, rid: str, timeout: float | None, context: str = "") -> Result:
        try:
            while True:
                reply = await self._next(rid, self._timeout(timeout))
                if isinstance(reply, GenerateResult):
                    self._queues.pop(rid, None)
                    return Result.from_reply(reply)
                if not isinstance(reply, TokenChunk):
                    self._queues.pop(rid, None)
                    raise self._failure(reply, context)
        finally:
            if rid in self._queues:
                await self._abort(rid)

    async def _control(
        self, kind: type[GetStatsRequest] | type[FlushCacheRequest], timeout: float | None
    ) -> Any:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        rid = f"c{next(self._ids)}"
        self._queues[rid] = asyncio.Queue()
        await self._sock.send(self._encoder.encode(kind(rid=rid, api_key=self.api_key)))
        try:
            reply = await self._next(rid, self._timeout(timeout))
        finally:
            self._queues.pop(rid, None)
        if isinstance(reply, (StatsReply, FlushReply)):
            return reply
        raise self._failure(reply)

    async def _next(self, rid: str, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(self._queues[rid].get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no reply from the runtime at {self.endpoint} within {timeout} s; is it running? "
                "(raise the client's timeout for long generations)"
            ) from None

    def _failure(self, reply: Any, context: str = "") -> Exception:
        return reply_error(reply, self.endpoint, context)

    async def _stream_next(self, rid: str, timeout: float | None) -> Any:
        """The next reply of a stream; a timeout or cancellation aborts the request."""
        try:
            reply = await self._next(rid, timeout)
        except BaseException:
            await self._abort(rid)
            raise
        if not isinstance(reply, TokenChunk):
            self._queues.pop(rid, None)
        return reply

    def _abort_nowait(self, rid: str) -> None:
        """Best-effort abort from a finalizer (no awaiting)."""
        if self._closed or self._queues.pop(rid, None) is None:
            return
        with contextlib.suppress(Exception):  # the loop or socket may be gone
            frame = self._encoder.encode(AbortRequest(rid=rid, api_key=self.api_key))
            self._sock.send(frame, zmq.NOBLOCK)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _abort(self, rid: str) -> None:
        self._queues.pop(rid, None)
        if not self._closed:
            await self._sock.send(self._encoder.encode(AbortRequest(rid=rid, api_key=self.api_key)))

    async def _read_loop(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            events = dict(await poller.poll())
            if self._sock in events:
                while await self._sock.poll(0):
                    self._dispatch(await self._sock.recv())
            if self._monitor in events:
                await self._monitor.recv_multipart()
                for queue in self._queues.values():
                    queue.put_nowait(LOST)

    def _dispatch(self, frame: bytes) -> None:
        try:
            reply = self._codec.decode(frame)
        except (msgspec.DecodeError, ValueError):
            return
        queue = self._queues.get(reply.rid)
        if queue is not None:
            queue.put_nowait(reply)
