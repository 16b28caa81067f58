"""The FastAPI application: native endpoints (`/health`, `/generate`, `/flush_cache`,
`/metrics`), the OpenAI-compatible ones (`radixkv.openai_routes`) and OpenAI-style errors.

Every error, including unknown routes and unexpected exceptions, is answered as
`{"error": {"message", "type", "param", "code"}}`; a stack trace never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from radixkv.client_common import Result
from radixkv.http_gateway import ClientGone, Gateway, GatewayConfig, Prompt
from radixkv.openai_protocol import ApiError, GenerateBody, chat_messages
from radixkv.openai_routes import closed, event_stream, json_response, openai_router, sse
from radixkv.streams import AsyncStream

log = logging.getLogger("radixkv.http")


def error_response(exc: ApiError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return Response(exc.body(), exc.status, headers=headers, media_type="application/json")


def native_result(r: Result) -> dict[str, Any]:
    meta = {
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "cached_tokens": r.cached_tokens,
        "completion_tokens": r.completion_tokens,
        "ttft": r.ttft,
        "e2e_latency": r.latency,
    }
    return {"text": r.text, "output_ids": r.token_ids, "meta_info": meta}


def build_app(config: GatewayConfig) -> FastAPI:
    """The app of one runtime; it connects to the runtime when the server starts."""
    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.open()
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(
        title="radixkv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        """200 while the scheduler serves; 503 once it is gone (open even with an API key)."""
        dead = config.dead()
        if dead is not None:
            raise ApiError(503, dead, None, "unavailable")
        return json_response({"status": "ok", "model": config.model})

    app.include_router(native_router(gw))
    app.include_router(openai_router(gw))
    return app


def native_router(gw: Gateway) -> APIRouter:
    router = APIRouter(dependencies=[Depends(gw.authorize)])

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        """Text, token ids or chat messages with our sampling parameters; meta info per request."""
        req = await gw.body(request, GenerateBody)
        prompt = native_prompt(req)
        sp = req.sampling_params
        if req.stream:

            def render(item: str | Result) -> list[bytes]:
                if isinstance(item, str):
                    return [sse({"text": item})]
                return [sse(native_result(item))]

            async def open_stream() -> AsyncStream:
                return await gw.client.stream(prompt, params=sp)

            return await event_stream(gw, request, open_stream, render)
        try:
            r = await gw.call(request, lambda: gw.complete(prompt, sp))
        except ClientGone:
            return closed()
        return json_response(native_result(r))

    @router.post("/flush_cache")
    async def flush_cache(request: Request) -> Response:
        """Empty the radix cache; 409 while requests are in flight."""
        try:
            await gw.call(request, lambda: gw.client.flush_cache())
        except ApiError as exc:
            if exc.code == "bad_request":
                raise ApiError(409, exc.message, None, "busy") from None
            raise
        except ClientGone:
            return closed()
        return json_response({"ok": True})

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition: the scheduler's counters and gauges, the runtime's
        latency histograms and finish reasons."""
        try:
            stats = await gw.call(request, lambda: gw.client.stats())
        except ClientGone:
            return closed()
        text = gw.config.metrics.render(stats)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return router


def native_prompt(req: GenerateBody) -> Prompt:
    given = [x is not None for x in (req.text, req.input_ids, req.messages)]
    if sum(given) != 1:
        raise ApiError(400, "give exactly one of text, input_ids or messages", None, "invalid")
    if req.text is not None:
        return req.text
    if req.input_ids is not None:
        return req.input_ids
    return chat_messages(req.messages or [])


def add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return error_response(ApiError(exc.status_code, str(exc.detail), None, code))

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unexpected error serving an HTTP request", exc_info=exc)
        return error_response(ApiError(500, f"internal error ({type(exc).__name__})"))

    async def client_gone(_: Request, exc: Exception) -> Response:
        return closed()  # e.g. the client hung up while sending its body: nothing to report

    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
