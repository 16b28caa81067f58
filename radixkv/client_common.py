"""What the sync and async clients share: results, errors and building requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec

from radixkv.protocol import (
    MAX_FRAME_BYTES,
    ChatMessage,
    ErrorReply,
    GenerateRequest,
    GenerateResult,
    WireSamplingParams,
)

SAMPLING_FIELDS = tuple(WireSamplingParams.__struct_fields__)
DEFAULT_TIMEOUT = 600.0
Message: TypeAlias = "ChatMessage | Mapping[str, str]"


@dataclass(frozen=True, slots=True)
class Result:
    """One finished generation and how much of its prompt the radix cache served."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft: float  # seconds from arrival at the runtime to the first token
    latency: float  # seconds from arrival at the runtime to the last token

    @classmethod
    def from_reply(cls, reply: GenerateResult) -> Result:
        m = reply.meta
        return cls(
            text=reply.text,
            token_ids=reply.token_ids,
            finish_reason=reply.finish_reason,
            prompt_tokens=m.prompt_tokens,
            cached_tokens=m.cached_tokens,
            completion_tokens=m.completion_tokens,
            ttft=m.ttft,
            latency=m.latency,
        )


class RequestError(RuntimeError):
    """The runtime refused or could not finish a request; `code` is the ErrorReply code
    (bad_request | unauthorized | too_large | aborted | internal)."""

    def __init__(self, message: str, code: str = "bad_request", rid: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid

    @classmethod
    def from_reply(cls, reply: ErrorReply, context: str = "") -> RequestError:
        prefix = f"{context}: " if context else ""
        return cls(f"{prefix}{reply.message} [{reply.code}]", reply.code, reply.rid)


class ConnectionLost(ConnectionError):
    """The connection to the runtime closed while a call was waiting for its reply."""


LOST = object()  # queued for a pending call when the connection to the runtime closes


def reply_error(reply: Any, endpoint: str, context: str = "") -> Exception:
    """The exception for a reply that is not the one a call waited for."""
    if reply is LOST:
        return ConnectionLost(f"the connection to the runtime at {endpoint} closed")
    if isinstance(reply, ErrorReply):
        return RequestError.from_reply(reply, context)
    return RequestError(f"unexpected reply {type(reply).__name__}", "internal")


def make_sampling(params: WireSamplingParams | None, kwargs: dict[str, Any]) -> WireSamplingParams:
    """Sampling parameters from keyword arguments (`stop` may be a single string)."""
    unknown = sorted(set(kwargs) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown sampling argument(s) {', '.join(unknown)}; "
            f"valid: {', '.join(SAMPLING_FIELDS)}"
        )
    if isinstance(kwargs.get("stop"), str):
        kwargs = {**kwargs, "stop": [kwargs["stop"]]}
    if params is not None:
        return msgspec.structs.replace(params, **kwargs)
    try:
        return msgspec.convert(kwargs, WireSamplingParams)
    except msgspec.ValidationError as exc:
        raise TypeError(f"bad sampling argument: {exc}") from exc


def to_messages(messages: Sequence[Message]) -> list[ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m, ChatMessage):
            out.append(m)
        elif isinstance(m, Mapping) and "role" in m and "content" in m:
            out.append(ChatMessage(str(m["role"]), str(m["content"])))
        else:
            raise TypeError(
                f"a chat message is a {{'role': ..., 'content': ...}} mapping, got {m!r}"
            )
    return out


def is_batch_of_conversations(messages: Sequence[Any]) -> bool:
    return bool(messages) and isinstance(messages[0], (list, tuple))


def is_batch_of_ids(input_ids: Sequence[Any]) -> bool:
    return bool(input_ids) and isinstance(input_ids[0], (list, tuple))


def encode_checked(encoder: msgspec.msgpack.Encoder, request: GenerateRequest) -> bytes:
    """Encode a request, refusing locally what the runtime would refuse as too large."""
    frame = encoder.encode(request)
    if len(frame) > MAX_FRAME_BYTES:
        raise RequestError(
            f"the request is {len(frame)} bytes; the runtime accepts at most {MAX_FRAME_BYTES}",
            "too_large",
            request.rid,
        )
    return frame


def prompt_kind(prompt: str | list[int] | list[Message]) -> dict[str, Any]:
    """GenerateRequest fields for one prompt: text, token ids or chat messages."""
    if isinstance(prompt, str):
        return {"text": prompt}
    items = list(prompt)
    if items and all(isinstance(t, int) for t in items):
        return {"input_ids": items}
    if items and all(isinstance(m, (ChatMessage, Mapping)) for m in items):
        return {"messages": to_messages(items)}  # type: ignore[arg-type]
    if not items:
        return {"input_ids": []}  # the runtime answers with a clear "empty prompt" error
    raise TypeError("a prompt is a string, a list of token ids or a list of chat messages")
