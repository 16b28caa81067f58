"""How the HTTP routes answer: JSON bodies, OpenAI-style errors, server-sent events, and the
non-answer to a client that has gone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from radixkv.http.errors import ApiError
from radixkv.http.gateway import ClientGone, Gateway

T = TypeVar("T")  # what a stream yields (text and the Result, or richer items)
log = logging.getLogger("radixkv.http")


def error_response(exc: ApiError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return Response(exc.body(), exc.status, headers=headers, media_type="application/json")


def closed() -> Response:
    """The answer to a client that has gone (nobody reads it; 499 as in nginx's logs)."""
    return Response(status_code=499)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status, media_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class ReaderStalled(Exception):
    pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose reader must keep reading. A write waits only when every buffer
    between us and the reader is full (the asyncio transport's, the kernel's send buffer, the
    reader's receive window); one that still waits after `stall_timeout` seconds means a reader
    that stopped (a suspended `curl -N`, a frozen process): the response ends there, which aborts
    its request and frees its KV, as a frozen ZMQ client's heartbeat timeout does."""

    def __init__(self, content: AsyncIterator[bytes], stall_timeout: float) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_give_up(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.stall_timeout)
            except asyncio.TimeoutError:
                raise ReaderStalled from None

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except ReaderStalled:  # starlette's task group re-raises it unwrapped
            log.warning(
                "an HTTP stream's reader stopped reading for %.0f s; its request was aborted",
                self.stall_timeout,
            )
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def event_stream(
    gw: Gateway,
    request: Request,
    open_stream: Callable[[], Awaitable[AsyncIterator[T]]],
    render: Callable[[T], list[bytes]],
) -> Response:
    """Stream as SSE. The first item is awaited before answering, so a refused request gets a
    proper error status instead of a 200 whose stream carries the error."""
    items = gw.relay(request, open_stream)
    try:
        first = await items.__anext__()
    except (ClientGone, StopAsyncIteration):
        await items.aclose()
        return closed()

    async def body() -> AsyncIterator[bytes]:
        try:
            for event in render(first):
                yield event
            async for item in items:
                for event in render(item):
                    yield event
        except ApiError as exc:  # after the headers: report it in the stream
            yield sse(msgspec.json.decode(exc.body()))
        except ClientGone:
            return
        finally:
            await items.aclose()
        yield SSE_DONE

    return EventStreamResponse(body(), gw.config.stream_stall_timeout)
