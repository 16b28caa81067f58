"""The FastAPI application: `/health`, the native routes (`native`), the OpenAI-compatible ones
(`openai`) and OpenAI-style errors.

Every error, including unknown routes and unexpected exceptions, is answered as
`{"error": {"message", "type", "param", "code"}}`; a stack trace never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from radixkv.http.errors import ApiError
from radixkv.http.gateway import ClientGone, Gateway, GatewayConfig
from radixkv.http.native import native_router
from radixkv.http.openai import openai_router
from radixkv.http.responses import closed, error_response, json_response

log = logging.getLogger("radixkv.http")

MAX_HEADER_BYTES = 32 * 1024  # all header names and values of a request together


class HeaderLimit:
    """A 431 for a request whose headers exceed MAX_HEADER_BYTES. (h11 refuses, with a 400, only
    headers that arrive in more than one read; this bounds the ones that arrive in one.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > MAX_HEADER_BYTES:
                message = f"request headers of {size} bytes exceed the limit of {MAX_HEADER_BYTES}"
                error = ApiError(431, message, None, "headers_too_large")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    app.add_middleware(HeaderLimit)

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
