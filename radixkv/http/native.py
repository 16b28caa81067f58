"""The native routes, as SGLang names them: `/generate` (text, token ids or chat messages with
our sampling parameters, meta info per request), `/flush_cache` and Prometheus `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from radixkv.client.core import Prompt
from radixkv.client.results import Result
from radixkv.client.streams import AsyncStream
from radixkv.http.gateway import ClientGone, Gateway
from radixkv.http.openai_protocol import ApiError, GenerateBody, chat_messages
from radixkv.http.responses import closed, event_stream, json_response, sse


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
            r = await gw.call(request, lambda: gw.client.complete(prompt, params=sp))
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
