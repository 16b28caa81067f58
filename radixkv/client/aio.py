"""`radixkv.AsyncClient`: the asyncio transport of `ClientAPI` (zmq.asyncio, one DEALER socket)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import zmq
import zmq.asyncio

from radixkv.client.core import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Call,
    ClientAPI,
    Control,
)
from radixkv.client.results import LOST, UNREACHABLE, Result
from radixkv.client.streams import AsyncStream


class AsyncClient(ClientAPI):
    """`Client`'s API as awaitables (`await client.generate(...)`); any number of concurrent calls
    on one event loop share the socket (a reader task routes replies by request id). Use it from
    one event loop."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._init_core(endpoint, api_key, timeout, connect_timeout, zmq.asyncio.Context())
        self._reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Abort this client's unfinished requests and close the socket."""
        if self._closed:
            return
        for rid in list(self._pending):
            self.abort(rid)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._close_sockets()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- for streams --------------------------------------------------------------------------

    async def next_reply(self, rid: str, timeout: float | None) -> Any:
        """The next reply of request `rid`; a timeout or cancellation aborts the request."""
        try:
            reply = await self._next(rid, timeout)
        except BaseException:
            self.abort(rid)
            raise
        return self._settled(rid, reply)

    def abort(self, rid: str) -> None:
        """Abort request `rid` without waiting (best effort: safe from a finalizer)."""
        if self._pending.pop(rid, None) is None or self._closed:
            return
        with contextlib.suppress(Exception):  # the loop or socket may be gone
            self._sock.send(self._abort_frame(rid), zmq.NOBLOCK)

    # ---- the transport ------------------------------------------------------------------------

    async def _run(self, call: Call) -> Any:
        self._start_reader()
        rids = [await self._submit(rid, frame) for rid, frame in self._requests(call)]
        if call.stream:
            streams = [AsyncStream(self, rid, call.timeout) for rid in rids]
            return streams if call.batch else streams[0]
        tasks = [asyncio.ensure_future(self._result_of(rid, call, i)) for i, rid in enumerate(rids)]
        try:
            results = list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # on a failure the others abort their requests as they unwind
        return results if call.batch else results[0]

    async def _submit(self, rid: str, frame: bytes) -> str:
        if self._closed:
            raise RuntimeError("the client is closed")
        self._reserve(rid, asyncio.Queue())
        self._sending()
        try:
            await self._sock.send(frame)
        except BaseException:  # cancelled mid-send: nothing to wait for, nothing left behind
            self._pending.pop(rid, None)
            raise
        return rid

    async def _result_of(self, rid: str, call: Call, index: int) -> Result:
        try:
            while rid in self._pending:
                reply = self._settled(rid, await self._next(rid, call.timeout))
            return self._result(reply, call, index)
        finally:
            self.abort(rid)  # a no-op once it finished

    async def _control(self, control: Control, timeout: float | None) -> Any:
        self._start_reader()
        rid, frame = self._control_request(control)
        self._reserve(rid, asyncio.Queue())
        self._sending()
        try:
            await self._sock.send(frame)
            reply = await self._next(rid, timeout)
        finally:
            self._pending.pop(rid, None)
        return self._control_result(control, reply)

    async def _next(self, rid: str, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(self._pending[rid].get(), timeout)
        except asyncio.TimeoutError:
            raise self._no_reply(timeout) from None

    # ---- socket -------------------------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            # without a connection, wake up now and then to fail calls that waited too long
            events = dict(await poller.poll(None if self._connected else 200))
            if self._sock in events:
                while await self._sock.poll(0):
                    self._dispatch(await self._sock.recv())
            if self._monitor in events and self._on_monitor_event(
                await self._monitor.recv_multipart()
            ):
                self._lose_all(LOST)
            if self._connect_overdue():
                self._lose_all(UNREACHABLE)

    def _lose_all(self, why: object) -> None:
        self._connect_deadline = None
        for queue in self._pending.values():
            queue.put_nowait(why)

    def _dispatch(self, frame: bytes) -> None:
        reply = self._decode(frame)
        queue = None if reply is None else self._pending.get(reply.rid)
        if queue is not None:
            queue.put_nowait(reply)
