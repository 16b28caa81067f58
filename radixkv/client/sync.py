"""`radixkv.Client`: the synchronous transport of `ClientAPI` over one ZMQ DEALER socket."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator
from typing import Any

import zmq

from radixkv.client.core import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Call,
    ClientAPI,
    Control,
)
from radixkv.client.results import LOST, UNREACHABLE, Result
from radixkv.client.streams import Stream


class Client(ClientAPI):
    """Sends requests to a runtime and waits for the replies (the API: `ClientAPI`).

    One DEALER socket; replies are matched to calls by request id, so a partly read stream and
    other calls can be interleaved. Not for concurrent use: a call made while another thread is
    inside one raises at once; give each thread its own Client (they are cheap) or use
    `AsyncClient`.
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._init_core(endpoint, api_key, timeout, connect_timeout, zmq.Context())
        self._lock = threading.RLock()
        self._deferred_aborts: list[str] = []

    def close(self) -> None:
        """Abort this client's unfinished requests and close the socket."""
        if self._closed:
            return
        with self._lock:
            for rid in list(self._pending):
                self._sock.send(self._abort_frame(rid))
            self._close_sockets()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- for streams --------------------------------------------------------------------------

    def next_reply(self, rid: str, timeout: float | None) -> Any:
        """The next reply of request `rid`; a timeout or interrupt aborts the request."""
        with self._use():
            try:
                _, reply = self._wait([rid], timeout)
            except BaseException:
                self._abort_now(rid)
                raise
            return self._settled(rid, reply)

    def abort(self, rid: str) -> None:
        """Abort from any thread or a finalizer: sent now if the socket is free, else next call."""
        if self._closed or rid not in self._pending:
            return
        if self._lock.acquire(blocking=False):
            try:
                self._abort_now(rid)
            finally:
                self._lock.release()
        else:
            self._deferred_aborts.append(rid)

    # ---- the transport ------------------------------------------------------------------------

    def _run(self, call: Call) -> Any:
        with self._use():
            rids = [self._submit(rid, frame) for rid, frame in self._requests(call)]
            if call.stream:
                streams = [Stream(self, rid, call.timeout) for rid in rids]
                return streams if call.batch else streams[0]
            results = self._results(call, rids)
            return results if call.batch else results[0]

    def _submit(self, rid: str, frame: bytes) -> str:
        self._reserve(rid, deque())
        self._sending()
        self._sock.send(frame)
        return rid

    def _results(self, call: Call, rids: list[str]) -> list[Result]:
        """Every request's Result; on the first error, the others are aborted."""
        index = {rid: i for i, rid in enumerate(rids)}
        results: dict[str, Result] = {}
        try:
            while len(results) < len(rids):
                rid, reply = self._wait([r for r in rids if r not in results], call.timeout)
                self._settled(rid, reply)
                if rid not in self._pending:  # its request ended: a result or an error
                    results[rid] = self._result(reply, call, index[rid])
        finally:
            for rid in rids:
                if rid in self._pending:
                    self._abort_now(rid)
        return [results[r] for r in rids]

    def _control(self, control: Control, timeout: float | None) -> Any:
        with self._use():
            rid, frame = self._control_request(control)
            self._pending[rid] = deque()
            self._sending()
            self._sock.send(frame)
            try:
                _, reply = self._wait([rid], timeout)
            finally:
                self._pending.pop(rid, None)
        return self._control_result(control, reply)

    def _abort_now(self, rid: str) -> None:
        self._pending.pop(rid, None)
        if not self._closed:
            self._sock.send(self._abort_frame(rid))

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
                self._abort_now(self._deferred_aborts.pop())
            yield
        finally:
            self._lock.release()

    def _wait(self, rids: Collection[str], timeout: float | None) -> tuple[str, Any]:
        """The next reply for any of `rids` (all must be pending); TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            for rid in rids:
                if self._pending[rid]:
                    return rid, self._pending[rid].popleft()
            if self._connect_overdue():
                self._lose_all(UNREACHABLE)
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._no_reply(timeout)
            if self._connect_deadline is not None:  # wake up to check it
                until_connect = max(0.0, self._connect_deadline - time.monotonic())
                left = until_connect if left is None else min(left, until_connect)
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
            reply = self._decode(frame)
            inbox = None if reply is None else self._pending.get(reply.rid)
            if inbox is not None:
                inbox.append(reply)

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            if self._on_monitor_event(self._monitor.recv_multipart()):
                self._lose_all(LOST)

    def _lose_all(self, why: object) -> None:
        self._connect_deadline = None
        for inbox in self._pending.values():
            inbox.append(why)
