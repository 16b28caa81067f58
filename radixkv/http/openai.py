"""The OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`usage.prompt_tokens_details.cached_tokens` is the prefix the radix cache served. Streams are
server-sent events, one JSON chunk per `data:` line, ending with `data: [DONE]`; with
`stream_options.include_usage` a last chunk with empty `choices` carries the usage. SGLang's
`sglext.cached_tokens_details` stands beside every `usage`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from radixkv.client.core import Message
from radixkv.client.results import Result
from radixkv.http.gateway import ClientGone, Gateway
from radixkv.http.openai_protocol import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
)
from radixkv.http.responses import closed, event_stream, json_response, sse
from radixkv.protocol import SamplingParams


def sglext(results: list[Result]) -> dict[str, Any]:
    """SGLang's extension object, beside `usage`: where the cached tokens came from (all from
    the KV pool on the device here; a host tier would add to `host`)."""
    cached = sum(r.cached_tokens for r in results)
    return {"cached_tokens_details": {"device": cached, "host": 0}}


def usage_chunk(head: dict[str, Any], result: Result) -> bytes:
    """The last event of a stream that asked for usage: no choices."""
    return sse({**head, "choices": [], "usage": usage([result]), "sglext": sglext([result])})


def usage(results: list[Result]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)},
    }


def check(gw: Gateway, req: CompletionRequest | ChatCompletionRequest) -> None:
    gw.check_model(req.model)
    refused = req.unsupported()
    if refused is not None:
        raise ApiError(400, refused[1], refused[0], "unsupported")


def openai_router(gw: Gateway) -> APIRouter:
    """The /v1 routes, all behind the API key (when one is set)."""
    router = APIRouter(dependencies=[Depends(gw.authorize)])

    @router.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": gw.config.model,
            "object": "model",
            "created": 0,
            "owned_by": "radixkv",
            "max_model_len": gw.config.max_context_len,
        }
        return json_response({"object": "list", "data": [card]})

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await gw.body(request, CompletionRequest)
        check(gw, req)
        prompts = req.prompts()
        sp = req.sampling(DEFAULT_COMPLETION_TOKENS)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": gw.config.model}  # fmt: skip

        def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        if req.stream:

            def render(item: str | Result) -> list[bytes]:
                if isinstance(item, str):
                    return [sse({**head, "choices": [choice(0, item, None)]})]
                events = [sse({**head, "choices": [choice(0, "", item.finish_reason)]})]
                if req.include_usage:
                    events.append(
                        sse(
                            {
                                **head,
                                "choices": [],
                                "usage": usage([item]),
                                "sglext": sglext([item]),
                            }
                        )
                    )
                return events

            return await event_stream(
                gw, request, lambda: gw.client.stream(prompts[0], params=sp), render
            )

        async def run() -> list[Result]:
            tasks = [
                asyncio.ensure_future(gw.client.complete(p, params=sp)) for p in prompts
            ]  # they batch
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()  # after a failure, the others abort their requests

        try:
            results = await gw.call(request, run)
        except ClientGone:
            return closed()
        choices = [choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
        body = {**head, "choices": choices, "usage": usage(results), "sglext": sglext(results)}
        return json_response(body)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await gw.body(request, ChatCompletionRequest)
        check(gw, req)
        messages = chat_messages(req.messages)
        sp = req.sampling(DEFAULT_CHAT_TOKENS)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": gw.config.model}  # fmt: skip
        if req.stream:
            return await stream_chat(gw, request, req, messages, sp, head)
        try:
            r = await gw.call(request, lambda: gw.client.chat(messages, params=sp))
        except ClientGone:
            return closed()
        message = {"role": "assistant", "content": r.text}
        choice = {"index": 0, "message": message, "finish_reason": r.finish_reason}
        body = {**head, "object": "chat.completion", "choices": [choice], "usage": usage([r]),
                "sglext": sglext([r])}  # fmt: skip
        return json_response(body)

    return router


async def stream_chat(
    gw: Gateway,
    request: Request,
    req: ChatCompletionRequest,
    messages: list[Message],
    sp: SamplingParams,
    head: dict[str, Any],
) -> Response:
    """A chat completion as SSE: the role first, then content deltas, then the finish reason."""
    started = False

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    def render(item: str | Result) -> list[bytes]:
        nonlocal started
        events = [] if started else [chunk({"role": "assistant", "content": ""}, None)]
        started = True
        if isinstance(item, str):
            return [*events, chunk({"content": item}, None)]
        events.append(chunk({}, item.finish_reason))
        if req.include_usage:
            events.append(
                sse({**head, "choices": [], "usage": usage([item]), "sglext": sglext([item])})
            )
        return events

    return await event_stream(gw, request, lambda: gw.client.stream(messages, params=sp), render)
