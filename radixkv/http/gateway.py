"""What every HTTP handler shares: the runtime client, auth, body limits, the served model names,
client-disconnect handling and the mapping of runtime errors to HTTP errors.

Handlers reach the runtime loop through an `AsyncClient` connected to the runtime's own client
endpoint over loopback, so an HTTP request takes exactly the path a Python client's request takes:
the same TokenizerManager, validation, stop strings, accounting and abort handling, and the
runtime loop stays single-threaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from radixkv.client.aio import AsyncClient
from radixkv.client.core import DEFAULT_TIMEOUT, Prompt
from radixkv.client.results import ConnectionLost, RequestError, Result
from radixkv.client.streams import AsyncStream
from radixkv.config import matching_key
from radixkv.http.errors import ApiError, decode_body
from radixkv.http.metrics import RuntimeMetrics
from radixkv.protocol import MAX_SEED, SamplingParams, TokenLogprob, key_cache_salt

log = logging.getLogger("radixkv.http")
T = TypeVar("T")
MAX_BODY_BYTES = 8 * 1024 * 1024
STATUS_OF_CODE = {
    "bad_request": 400,
    "unauthorized": 401,
    "too_large": 413,
    "aborted": 400,
    "overloaded": 429,
}
# The runtime names fields as `radixkv.protocol` does; these few have other names over HTTP.
HTTP_PARAM = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "text": "prompt",
    "input_ids": "prompt",
}


@dataclass(frozen=True)
class GatewayConfig:
    """How the HTTP front end reaches and describes its runtime."""

    endpoint: str  # the runtime's client endpoint, as reachable from this process
    api_keys: tuple[str, ...]  # what callers may send; empty: no key needed
    model: str  # the served model name (listed by /v1/models)
    aliases: tuple[str, ...]  # other names accepted in `model` (e.g. the path it was loaded from)
    max_context_len: int
    metrics: RuntimeMetrics
    dead: Callable[[], str | None]  # why the scheduler is gone, or None while it serves
    server_info: dict[str, Any]  # the launch options and the scheduler's handshake (no API key)
    max_body_bytes: int = MAX_BODY_BYTES
    timeout: float = DEFAULT_TIMEOUT  # seconds to wait for a result or the next chunk
    stream_stall_timeout: float = 10.0  # seconds a stream's write may wait for its reader
    client_key: str | None = None  # the key this gateway's own client sends to the runtime
    isolate_cache_per_key: bool = False  # salt each request by its caller's key


class ClientGone(Exception):
    """The HTTP client disconnected; its request was aborted."""


class Gateway:
    """Per-app state: the config and, between start-up and shutdown, the runtime client."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._client: AsyncClient | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise ApiError(503, "the HTTP server is starting or stopping", None, "unavailable")
        return self._client

    async def open(self) -> None:
        """Connect to the runtime (call on the server's event loop)."""
        cfg = self.config
        self._client = AsyncClient(cfg.endpoint, api_key=cfg.client_key, timeout=cfg.timeout)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # ---- checks -------------------------------------------------------------------------------

    async def authorize(self, request: Request) -> None:
        """With an API key configured, require `Authorization: Bearer <key>` (401 otherwise).
        Async so FastAPI runs it on the event loop, not in its thread pool."""
        keys = self.config.api_keys
        if not keys:
            return
        if self._caller_key(request) not in keys:
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                "the key the runtime was launched with (--api-key)",
                None,
                "invalid_api_key",
            )

    def _caller_key(self, request: Request) -> str | None:
        """The configured key the request's `Authorization: Bearer` header names, if any
        (compared in constant time against every key)."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        # bytes: compare_digest refuses non-ASCII str, and a header may hold any latin-1 byte
        return matching_key(given.strip().encode("utf-8", "surrogateescape"), self.config.api_keys)

    def cache_salt(self, request: Request, salt: str | None) -> str | None:
        """The salt a request is sent with: its own, and its caller's key's under
        --isolate-cache-per-key (the runtime does the same for its ZMQ clients)."""
        if not self.config.isolate_cache_per_key:
            return salt
        key = self._caller_key(request)
        assert key is not None  # authorize() let it in
        return key_cache_salt(key, salt)

    def check_model(self, model: str | None) -> None:
        """Accept no model, the served name or one of its aliases; 400 otherwise."""
        names = (self.config.model, *self.config.aliases)
        if model is not None and model not in names:
            raise ApiError(
                400,
                f"the model {model!r} is not served here; this runtime serves "
                f"{self.config.model!r} (see GET /v1/models)",
                "model",
                "model_not_found",
            )

    async def body(self, request: Request, type_: type[T]) -> T:
        """Read the JSON body (refusing one over the size limit with 413) and decode it."""
        limit = self.config.max_body_bytes
        too_large = ApiError(
            413, f"the request body exceeds the limit of {limit} bytes", None, "body_too_large"
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone from None
        result: T = decode_body(b"".join(chunks), type_)
        return result

    # ---- calls into the runtime ---------------------------------------------------------------

    async def call(self, request: Request, make: Callable[[], Awaitable[T]]) -> T:
        """Await `make()`, aborting it (and raising ClientGone) if the HTTP client disconnects;
        runtime errors become ApiErrors. Call after the body is read."""
        task = asyncio.ensure_future(self._mapped(make))
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if not task.done():  # the client left first
            task.cancel()  # the runtime client aborts the request as the task unwinds
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone()
        return task.result()

    async def relay(
        self, request: Request, open_source: Callable[[], Awaitable[AsyncIterator[T]]]
    ) -> AsyncGenerator[T, None]:
        """Items of a stream opened by `open_source()`. If the HTTP client disconnects, or this
        generator is closed early, the stream's task is cancelled, which aborts the request."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for item in await self._mapped(open_source):
                    queue.put_nowait(item)
                queue.put_nowait(done)
            except Exception as exc:  # the consumer raises it; nothing may leave it waiting
                queue.put_nowait(map_error(exc))

        async def watch() -> None:
            await wait_disconnect(request)
            pumping.cancel()
            queue.put_nowait(ClientGone())

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch())
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            watching.cancel()
            pumping.cancel()

    async def complete_n(
        self, prompt: Prompt, sp: SamplingParams, n: int, salt: str | None = None
    ) -> list[Result]:
        """`n` generations of one prompt that compute its prefill once: the first copy runs alone
        until its first token (its prompt is then in the radix cache), then the others fork from
        it and find the prompt cached. With a seed, copy i samples with seed + i."""
        if n == 1:
            return [await self.client.complete(prompt, params=sp, cache_salt=salt)]
        first = await self.client.stream(prompt, params=copy_params(sp, 0), cache_salt=salt)
        try:
            async for _ in first:
                break  # a token exists: the prompt's KV is in the tree
            forks = [
                asyncio.ensure_future(
                    self.client.complete(prompt, params=copy_params(sp, i), cache_salt=salt)
                )
                for i in range(1, n)
            ]
            try:
                async for _ in first:
                    pass
                assert first.result is not None
                return [first.result, *await asyncio.gather(*forks)]
            finally:
                for fork in forks:
                    fork.cancel()  # after a failure, the others abort their requests
        finally:
            await first.aclose()

    async def stream_n(
        self, prompt: Prompt, sp: SamplingParams, n: int, salt: str | None = None
    ) -> AsyncIterator[tuple[int, str | Result, list[TokenLogprob]]]:
        """`n` streamed copies of one prompt, merged: (copy index, text piece or final Result,
        log probabilities of the tokens that came with it; with `logprob_start_len`, a copy's
        first item's are preceded by its prompt's). Copy 0's first item comes first, so the
        others, sent then, find its prompt cached (as in `complete_n`)."""
        streams = [await self.client.stream(prompt, params=copy_params(sp, 0), cache_salt=salt)]
        prompt_given: set[int] = set()

        def logprobs(i: int, stream: AsyncStream) -> list[TokenLogprob]:
            if stream.prompt_logprobs is None or i in prompt_given:
                return stream.take_logprobs()
            prompt_given.add(i)
            return [*stream.prompt_logprobs, *stream.take_logprobs()]

        async def merged() -> AsyncIterator[tuple[int, str | Result, list[TokenLogprob]]]:
            first = await streams[0].__anext__()
            yield 0, first, logprobs(0, streams[0])
            queue: asyncio.Queue[Any] = asyncio.Queue()
            ended = int(isinstance(first, Result))
            for i in range(1, n):
                copy = copy_params(sp, i)
                streams.append(await self.client.stream(prompt, params=copy, cache_salt=salt))

            async def pump(i: int, stream: AsyncStream) -> None:
                try:
                    async for item in stream:
                        queue.put_nowait((i, item, logprobs(i, stream)))
                except Exception as exc:  # the consumer raises it
                    queue.put_nowait(exc)

            tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
            try:
                while ended < n:
                    got = await queue.get()
                    if isinstance(got, Exception):
                        raise got
                    ended += isinstance(got[1], Result)
                    yield got
            finally:
                for task in tasks:
                    task.cancel()
                for stream in streams:
                    await stream.aclose()  # aborts a copy that has not finished

        return merged()

    async def _mapped(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except (RequestError, ConnectionLost, TimeoutError) as exc:
            raise map_error(exc) from None


def copy_params(sp: SamplingParams, i: int) -> SamplingParams:
    """The sampling parameters of copy `i` of n: another seed, when one is set."""
    if sp.seed is None or i == 0:
        return sp
    return msgspec.structs.replace(sp, seed=(sp.seed + i) % (MAX_SEED + 1))


async def wait_disconnect(request: Request) -> None:
    """Return when the HTTP client disconnects (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def map_error(exc: Exception) -> ApiError:
    """The HTTP error for an exception of the runtime client."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        message = str(exc).removesuffix(f" [{exc.code}]")
        status = STATUS_OF_CODE.get(exc.code, 503)
        param = HTTP_PARAM.get(exc.param, exc.param) if exc.param else None
        return ApiError(status, message, param, exc.code)
    if isinstance(exc, ConnectionLost):
        return ApiError(503, f"lost the runtime: {exc}", None, "unavailable")
    if isinstance(exc, TimeoutError):
        return ApiError(504, str(exc), None, "timeout")
    log.error("unexpected error serving an HTTP request", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__})", None, "internal")
