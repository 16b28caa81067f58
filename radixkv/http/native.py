"""The native routes, in SGLang's formats: `/generate` (text, token ids or chat messages with our
sampling parameters; `meta_info` per request, and in every event of a stream, whose `text` is
cumulative), `/flush_cache` and vLLM's `/reset_prefix_cache`, `/get_server_info`,
`/get_model_info`, `/health_generate`, `/tokenize`, `/detokenize`, and Prometheus `/metrics`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from radixkv.client.core import Prompt
from radixkv.client.results import Result
from radixkv.client.streams import AsyncStream
from radixkv.http.errors import ApiError
from radixkv.http.gateway import ClientGone, Gateway
from radixkv.http.logprobs import native_logprobs
from radixkv.http.openai_protocol import (
    CloseSessionBody,
    DetokenizeBody,
    GenerateBody,
    OpenSessionBody,
    TokenizeBody,
    chat_messages,
)
from radixkv.http.responses import closed, event_stream, json_response, sse
from radixkv.protocol import SamplingParams, SessionParams

HEALTH_PROBE = SamplingParams(max_new_tokens=1, ignore_eos=True)
MAX_FLUSH_WAIT = 3600.0  # seconds /flush_cache?timeout= may wait for the runtime to be idle


def finish_reason(r: Result) -> dict[str, Any]:
    """SGLang's form: {"type": "length", "length": n} or {"type": "stop"} (or "abort")."""
    if r.finish_reason == "length":
        return {"type": "length", "length": r.completion_tokens}
    return {"type": r.finish_reason}


def meta_info(
    rid: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "finish_reason": None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "cached_tokens_details": {"device": cached_tokens, "host": 0},
    }


def native_result(rid: str, r: Result, with_text: bool = False) -> dict[str, Any]:
    meta = meta_info(rid, r.prompt_tokens, r.cached_tokens, r.completion_tokens)
    meta.update(finish_reason=finish_reason(r), ttft=r.ttft, e2e_latency=r.latency)
    if r.logprobs is not None:
        meta.update(native_logprobs(r.logprobs, with_text, r.prompt_logprobs))
    return {"text": r.text, "output_ids": r.token_ids, "meta_info": meta}


def native_router(gw: Gateway) -> APIRouter:
    router = APIRouter(dependencies=[Depends(gw.authorize)])

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        """Text, token ids or chat messages with our sampling parameters; meta info per request."""
        req = await gw.body(request, GenerateBody)
        req.check_supported()
        salt = gw.cache_salt(request, req.cache_salt)
        prompt, sp, rid = native_prompt(req), req.sampling, req.rid or uuid.uuid4().hex
        with_text = bool(req.return_text_in_logprobs)
        session = req.session_params
        if req.stream:
            return await stream_generate(gw, request, prompt, sp, rid, with_text, salt, session)
        try:
            r = await gw.call(
                request,
                lambda: gw.client.complete(
                    prompt, params=sp, cache_salt=salt, session=session, rid=rid
                ),
            )
        except ClientGone:
            return closed()
        return json_response(native_result(rid, r, with_text))

    @router.post("/open_session")
    async def open_session(request: Request) -> Response:
        """SGLang's: open a session; its id, as a JSON string."""
        body = await gw.body(request, OpenSessionBody)
        salt = gw.cache_salt(request, body.cache_salt)
        capacity = body.capacity_of_str_len
        try:
            sid = await gw.call(request, lambda: gw.client.open_session(
                body.session_id, capacity_of_str_len=capacity, cache_salt=salt))  # fmt: skip
        except ClientGone:
            return closed()
        return json_response(sid)

    @router.post("/close_session")
    async def close_session(request: Request) -> Response:
        """SGLang's: close a session (its prefixes are evicted first from now on)."""
        body = await gw.body(request, CloseSessionBody)
        salt = gw.cache_salt(request, body.cache_salt)
        try:
            await gw.call(request, lambda: gw.client.close_session(body.session_id,
                                                                   cache_salt=salt))  # fmt: skip
        except ClientGone:
            return closed()
        return Response(status_code=200)

    @router.post("/flush_cache")
    async def flush_cache(request: Request) -> Response:
        """Empty the radix cache; 409 while requests are in flight."""
        return await flush(gw, request)

    @router.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> Response:
        """vLLM's name for `/flush_cache`."""
        return await flush(gw, request)

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def get_server_info(request: Request) -> Response:
        """The launch options and the scheduler's handshake; `internal_states` the live counters."""
        try:
            stats = await gw.call(request, lambda: gw.client.stats())
        except ClientGone:
            return closed()
        live = {
            "running": stats.running, "waiting": stats.waiting, "kv_used": stats.kv_used,
            "kv_capacity": stats.kv_capacity, "hit_rate": stats.hit_rate,
        }  # fmt: skip
        return json_response({**gw.config.server_info, "internal_states": [live]})

    @router.get("/get_model_info")
    @router.get("/model_info")
    async def get_model_info() -> Response:
        info = gw.config.server_info
        return json_response({"model_path": info["model_path"], "tokenizer_path": info["model"],
                              "is_generation": True})  # fmt: skip

    @router.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        """200 once a one-token generation went through the whole stack; 503 otherwise."""
        try:
            await gw.call(request, lambda: gw.client.complete([0], params=HEALTH_PROBE))
        except ClientGone:
            return closed()
        except ApiError as exc:
            raise ApiError(503, f"generation failed: {exc.message}", None, "unavailable") from None
        return json_response({"status": "ok"})

    @router.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's and SGLang's: `prompt` (a text) or `messages` -> `tokens`, `count`."""
        req = await gw.body(request, TokenizeBody)
        req.check_supported()
        gw.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", "prompt", "invalid")
        what = req.prompt if req.prompt is not None else chat_messages(req.messages or [])
        add = req.add_special_tokens
        ids = await gw.call(request, lambda: gw.client.tokenize(what, add_special_tokens=add))
        context = gw.config.max_context_len
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": context})

    @router.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        """`tokens` -> `text` (SGLang's name) and `prompt` (vLLM's)."""
        req = await gw.body(request, DetokenizeBody)
        gw.check_model(req.model)
        text = await gw.call(request, lambda: gw.client.detokenize(req.tokens))
        return json_response({"text": text, "prompt": text})

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


async def flush(gw: Gateway, request: Request) -> Response:
    """Flush the radix cache; with `?timeout=S` (SGLang's), wait up to S seconds for the
    requests in flight to finish first (409 if they have not)."""
    try:
        wait = float(request.query_params.get("timeout", 0))
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_FLUSH_WAIT:
        raise ApiError(
            400, f"timeout must be in [0, {MAX_FLUSH_WAIT}] seconds", "timeout", "invalid"
        )
    deadline = time.monotonic() + wait
    while True:
        try:
            await gw.call(request, lambda: gw.client.flush_cache())
            return json_response({"ok": True})
        except ApiError as exc:
            if exc.code != "bad_request":
                raise
            if time.monotonic() >= deadline:
                raise ApiError(409, exc.message, None, "busy") from None
        except ClientGone:
            return closed()
        await asyncio.sleep(0.05)


async def stream_generate(
    gw: Gateway,
    request: Request,
    prompt: Prompt,
    sp: SamplingParams,
    rid: str,
    with_text: bool,
    salt: str | None,
    session: SessionParams | None = None,
) -> Response:
    """SGLang's stream: every event carries the text so far and `meta_info` (the token counts
    so far; `finish_reason` set in the last, which also has `output_ids`)."""
    text = ""

    async def open_stream() -> AsyncIterator[tuple[str | Result, tuple[int, int, int]]]:
        stream: AsyncStream = await gw.client.stream(
            prompt, params=sp, cache_salt=salt, session=session, rid=rid
        )

        async def items() -> AsyncIterator[tuple[str | Result, tuple[int, int, int]]]:
            async for item in stream:  # the counts as they were when the item came
                yield item, (stream.prompt_tokens, stream.cached_tokens, stream.completion_tokens)

        return items()

    def render(event: tuple[str | Result, tuple[int, int, int]]) -> list[bytes]:
        nonlocal text
        item, counts = event
        if isinstance(item, Result):
            return [sse(native_result(rid, item, with_text))]
        text += item
        return [sse({"text": text, "meta_info": meta_info(rid, *counts)})]

    return await event_stream(gw, request, open_stream, render)


def native_prompt(req: GenerateBody) -> Prompt:
    given = [x is not None for x in (req.text, req.input_ids, req.messages)]
    if sum(given) != 1:
        raise ApiError(400, "give exactly one of text, input_ids or messages", None, "invalid")
    if req.text is not None:
        return req.text
    if req.input_ids is not None:
        return req.input_ids
    return chat_messages(req.messages or [])
