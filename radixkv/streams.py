"""Iterators over a streamed generation: text chunks as they are decoded, then the `Result`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from radixkv.client_common import Result
from radixkv.protocol import GenerateResult, TokenChunk

if TYPE_CHECKING:
    from radixkv.async_client import AsyncClient
    from radixkv.client import Client


class Stream:
    """Yields `str` text chunks, then the final `Result` (also kept as `.result`).

    Closing it early (`close()`, leaving a `with` block, or dropping it) aborts the request at the
    runtime. `timeout` bounds the wait for each chunk."""

    def __init__(self, client: Client, rid: str, timeout: float | None) -> None:
        self._client = client
        self.rid = rid
        self._timeout = timeout
        self.result: Result | None = None
        self._done = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str | Result:
        while not self._done:
            try:
                reply = self._client._stream_next(self.rid, self._timeout)
            except BaseException:
                self._done = True
                raise
            if isinstance(reply, TokenChunk):
                if reply.text:
                    return reply.text
                continue
            self._done = True
            if isinstance(reply, GenerateResult):
                self.result = Result.from_reply(reply)
                return self.result
            raise self._client._failure(reply)
        raise StopIteration

    def close(self) -> None:
        """Stop reading; aborts the request at the runtime if it has not finished."""
        if not self._done:
            self._done = True
            self._client.abort_later(self.rid)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # a finalizer must not raise (e.g. at interpreter exit)
            return


class AsyncStream:
    """`async for` over text chunks, then the `Result` (`.result`); `await aclose()` or dropping
    it unfinished aborts the request."""

    def __init__(self, client: AsyncClient, rid: str, timeout: float | None) -> None:
        self._client = client
        self.rid = rid
        self._timeout = timeout
        self.result: Result | None = None
        self._done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str | Result:
        while not self._done:
            try:
                reply = await self._client._stream_next(self.rid, self._timeout)
            except BaseException:
                self._done = True
                raise
            if isinstance(reply, TokenChunk):
                if reply.text:
                    return reply.text
                continue
            self._done = True
            if isinstance(reply, GenerateResult):
                self.result = Result.from_reply(reply)
                return self.result
            raise self._client._failure(reply)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            await self._client._abort(self.rid)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._client._abort_nowait(self.rid)
