"""Iterators over a streamed generation: text chunks as they are decoded, then the `Result`.

A stream reads its replies through the public `next_reply` and `abort` of the client that made it
(any object with those methods: see `ReplySource`), and decodes them here, once for both kinds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from radixkv.client.results import Result, reply_error
from radixkv.protocol import GenerateResult, TokenChunk, TokenLogprob


class ReplySource(Protocol):
    endpoint: str

    def next_reply(self, rid: str, timeout: float | None) -> Any:
        """The next reply of request `rid` (an awaitable of it, for the async client)."""

    def abort(self, rid: str) -> None:
        """Abort request `rid` at the runtime, without waiting (safe from a finalizer)."""


class _StreamState:
    """The decoding shared by both streams: chunk text, the final Result, or the error."""

    def __init__(self, source: ReplySource, rid: str, timeout: float | None) -> None:
        self._source = source
        self.rid = rid
        self._timeout = timeout
        self.result: Result | None = None
        self._done = False
        # progress so far (the Result has the final counts)
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self._logprobs: list[TokenLogprob] = []  # of tokens whose text was not taken yet
        self.prompt_logprobs: list[TokenLogprob] | None = None  # from the first chunk, if asked

    @contextlib.contextmanager
    def _ending_on_error(self) -> Iterator[None]:
        """A read that raises (a timeout, an interrupt, the request's error) ends the stream."""
        try:
            yield
        except BaseException:
            self._done = True
            raise

    def _take(self, reply: Any) -> str | Result | None:
        """Text for a non-empty chunk, None for an empty one, the Result at the end; raises the
        request's error."""
        if isinstance(reply, TokenChunk):
            self.completion_tokens += len(reply.token_ids)
            self.prompt_tokens, self.cached_tokens = reply.prompt_tokens, reply.cached_tokens
            self._logprobs.extend(reply.logprobs or ())
            if reply.prompt_logprobs is not None:
                self.prompt_logprobs = reply.prompt_logprobs
            return reply.text or None
        self._done = True
        if isinstance(reply, GenerateResult):
            self.result = Result.from_reply(reply)
            return self.result
        raise reply_error(reply, self._source.endpoint)

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log probabilities of the tokens received since the last call (with
        `logprobs=True`): call after each text chunk to pair them with it."""
        taken, self._logprobs = self._logprobs, []
        return taken

    def close(self) -> None:
        """Stop reading; aborts the request at the runtime if it has not finished."""
        if not self._done:
            self._done = True
            self._source.abort(self.rid)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # a finalizer must not raise (e.g. at interpreter exit)
            return


class Stream(_StreamState):
    """Yields `str` text chunks, then the final `Result` (also kept as `.result`).

    Closing it early (`close()`, leaving a `with` block, or dropping it) aborts the request at the
    runtime. `timeout` bounds the wait for each chunk."""

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str | Result:
        while not self._done:
            with self._ending_on_error():
                item = self._take(self._source.next_reply(self.rid, self._timeout))
            if item is not None:
                return item
        raise StopIteration

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_StreamState):
    """`async for` over text chunks, then the `Result` (`.result`); `await aclose()` or dropping
    it unfinished aborts the request."""

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str | Result:
        while not self._done:
            with self._ending_on_error():
                item = self._take(await self._source.next_reply(self.rid, self._timeout))
            if item is not None:
                return item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.close()
