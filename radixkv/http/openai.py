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
from radixkv.http.logprobs import chat_logprobs, completion_logprobs
from radixkv.http.openai_protocol import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
)
from radixkv.http.responses import closed, event_stream, json_response, sse
from radixkv.http.tools import ToolPlan, ToolStream, tool_calls, with_tools_message
from radixkv.protocol import SamplingParams, TokenLogprob


def sglext(results: list[Result]) -> dict[str, Any]:
    """SGLang's extension object, beside `usage`: where the cached tokens of every choice came
    from (all from the KV pool on the device here; a host tier would add to `host`), and each
    choice's own cached tokens (with n > 1, copies 2..n find the first copy's prompt cached)."""
    cached = sum(r.cached_tokens for r in results)
    return {
        "cached_tokens_details": {"device": cached, "host": 0},
        "cached_tokens_per_choice": [r.cached_tokens for r in results],
    }


def usage_chunk(head: dict[str, Any], results: list[Result]) -> bytes:
    """The last event of a stream that asked for usage (all its copies ended): no choices."""
    return sse({**head, "choices": [], "usage": usage([results]), "sglext": sglext(results)})


def usage(groups: list[list[Result]]) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once (with its first copy's cached tokens), the
    completions of every copy (`groups`: per prompt, its n results)."""
    prompt = sum(g[0].prompt_tokens for g in groups)
    completion = sum(r.completion_tokens for g in groups for r in g)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(g[0].cached_tokens for g in groups)},
    }


async def echo_text(gw: Gateway, prompt: str | list[int]) -> str:
    """The prompt as `echo` repeats it: itself, or the text of its token ids."""
    if isinstance(prompt, str):
        return prompt
    text: str = await gw.client.detokenize(prompt)
    return text


def check(gw: Gateway, req: CompletionRequest | ChatCompletionRequest) -> None:
    gw.check_model(req.model)
    req.check_supported()


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
        salt = gw.cache_salt(request, req.cache_salt)
        prompts = req.prompts()
        sp = req.sampling(DEFAULT_COMPLETION_TOKENS)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": gw.config.model}  # fmt: skip

        def choice(
            index: int, text: str, finish: str | None, lps: list[TokenLogprob] | None, start: int
        ) -> dict[str, Any]:
            logprobs = None if req.logprobs is None else completion_logprobs(lps, start)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

        if req.stream:
            n, sent, ended = req.n or 1, [0] * (req.n or 1), []
            echo = await echo_text(gw, prompts[0]) if req.echo else None
            echoed: set[int] = set()

            def render(event: tuple[int, str | Result, list[TokenLogprob]]) -> list[bytes]:
                i, item, lps = event
                events = []
                if echo is not None and i not in echoed:  # the prompt leads each choice's text
                    echoed.add(i)
                    if isinstance(item, str):
                        item = echo + item
                    else:  # nothing generated: the prompt alone, then the end
                        sent[i] = len(echo)
                        events.append(sse({**head, "choices": [choice(i, echo, None, lps, 0)]}))
                        lps = []
                if isinstance(item, str):
                    start, sent[i] = sent[i], sent[i] + len(item)
                    return [sse({**head, "choices": [choice(i, item, None, lps, start)]})]
                ended.append(item)
                last = choice(i, "", item.finish_reason, lps, sent[i])
                # sglext on the finishing chunk: SGLang's benchmark reads it there
                events.append(sse({**head, "choices": [last], "sglext": sglext([item])}))
                if req.include_usage and len(ended) == n:
                    events.append(usage_chunk(head, ended))
                return events

            return await event_stream(
                gw,
                request,
                lambda: gw.stream_n(prompts[0], sp, n, salt),
                render,
            )

        n, k = req.n or 1, req.candidates

        async def run() -> list[list[Result]]:
            tasks = [
                asyncio.ensure_future(gw.complete_n(p, sp, k, salt)) for p in prompts
            ]  # they batch
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()  # after a failure, the others abort their requests

        try:
            groups = await gw.call(request, run)
        except ClientGone:
            return closed()
        # best_of: the n candidates of highest total log probability, best first
        best = [sorted(g, key=total_logprob, reverse=True)[:n] if k > n else g for g in groups]
        results = [r for group in best for r in group]  # choice index: prompt * n + copy
        if req.echo:  # each choice begins with its prompt (and its logprobs with the prompt's)
            texts = [await echo_text(gw, p) for p in prompts for _ in range(n)]
            choices = [
                choice(i, texts[i] + r.text, r.finish_reason,
                       [*(r.prompt_logprobs or []), *(r.logprobs or [])], 0)
                for i, r in enumerate(results)
            ]  # fmt: skip
        else:
            choices = [
                choice(i, r.text, r.finish_reason, r.logprobs, 0) for i, r in enumerate(results)
            ]
        body = {**head, "choices": choices, "usage": usage(groups), "sglext": sglext(results)}
        return json_response(body)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await gw.body(request, ChatCompletionRequest)
        check(gw, req)
        salt = gw.cache_salt(request, req.cache_salt)
        messages = chat_messages(req.messages)
        plan = req.tool_plan()
        if plan is not None:
            messages = with_tools_message(plan, messages)
        sp = req.sampling(DEFAULT_CHAT_TOKENS)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": gw.config.model}  # fmt: skip
        if req.stream:
            return await stream_chat(gw, request, req, messages, sp, head, salt, plan)
        try:
            results = await gw.call(
                request,
                lambda: gw.complete_n(messages, sp, req.n or 1, salt),
            )
        except ClientGone:
            return closed()
        choices = [
            {"index": i, **assistant_message(r, plan),
             "logprobs": chat_logprobs(r.logprobs) if req.logprobs else None}
            for i, r in enumerate(results)
        ]  # fmt: skip
        body = {**head, "object": "chat.completion", "choices": choices,
                "usage": usage([results]), "sglext": sglext(results)}  # fmt: skip
        return json_response(body)

    return router


def total_logprob(r: Result) -> float:
    return sum(lp.logprob for lp in r.logprobs or [])


def assistant_message(r: Result, plan: ToolPlan | None) -> dict[str, Any]:
    """A choice's message and finish reason: text, or the tool call a forced output makes."""
    calls = None if plan is None else tool_calls(plan, r.text)
    if calls is None:
        return {
            "message": {"role": "assistant", "content": r.text},
            "finish_reason": r.finish_reason,
        }
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    return {"message": message, "finish_reason": "tool_calls"}


async def stream_chat(
    gw: Gateway,
    request: Request,
    req: ChatCompletionRequest,
    messages: list[Message],
    sp: SamplingParams,
    head: dict[str, Any],
    salt: str | None,
    plan: ToolPlan | None = None,
) -> Response:
    """A chat completion as SSE: per choice the role first, then content deltas, then the finish
    reason; with n > 1 the choices' chunks interleave (each names its index). A forced tool call
    streams as OpenAI's `tool_calls` deltas (`ToolStream`)."""
    n, started, ended = req.n or 1, set(), []
    tools = {i: ToolStream(plan) for i in range(n)} if plan is not None else None

    def chunk(
        i: int,
        delta: dict[str, Any],
        finish: str | None,
        lps: list[TokenLogprob],
        end: Result | None = None,
    ) -> bytes:
        logprobs = chat_logprobs(lps) if req.logprobs else None
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        ext = {} if end is None else {"sglext": sglext([end])}  # on the finishing chunk
        return sse({**head, "choices": [choice], **ext})

    def render(event: tuple[int, str | Result, list[TokenLogprob]]) -> list[bytes]:
        i, item, lps = event
        events = [] if i in started else [chunk(i, {"role": "assistant", "content": ""}, None, [])]
        started.add(i)
        if isinstance(item, str):
            delta = {"content": item} if tools is None else tools[i].delta(item)
            return [*events, chunk(i, delta, None, lps)] if delta else events
        ended.append(item)
        finish: str = item.finish_reason
        if tools is not None:
            last, finish = tools[i].end(item)
            if last:
                events.append(chunk(i, last, None, []))
        events.append(chunk(i, {}, finish, lps, item))
        if req.include_usage and len(ended) == n:
            events.append(usage_chunk(head, ended))
        return events

    return await event_stream(
        gw,
        request,
        lambda: gw.stream_n(messages, sp, n, salt),
        render,
    )
