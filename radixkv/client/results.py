"""What a call returns or raises: `Result`, `RequestError`, `ConnectionLost`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixkv.protocol import ErrorReply, GenerateResult, TokenLogprob


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
    queue_time: float = 0.0  # seconds it waited in the scheduler for its first admission
    # per token of token_ids, with `logprobs=True` (TokenLogprob: logprob, top_ids, texts, ...)
    logprobs: list[TokenLogprob] | None = None
    # with `logprob_start_len=k` (and logprobs): the prompt's tokens' from position k on (the
    # first token's logprob is NaN: nothing precedes it)
    prompt_logprobs: list[TokenLogprob] | None = None
    rid: str = ""  # the request's id (a session's next request continues it by this)

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
            queue_time=m.queue_time,
            logprobs=reply.logprobs,
            prompt_logprobs=reply.prompt_logprobs,
            rid=reply.rid,
        )


class RequestError(RuntimeError):
    """The runtime refused or could not finish a request. `code` is the ErrorReply code
    (bad_request | unauthorized | too_large | overloaded | internal); `param` names the request
    field at fault (e.g. "temperature", "max_new_tokens", "prompt"), when one is."""

    def __init__(
        self, message: str, code: str = "bad_request", rid: str = "", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid
        self.param = param

    @classmethod
    def from_reply(cls, reply: ErrorReply, context: str = "") -> RequestError:
        prefix = f"{context}: " if context else ""
        return cls(f"{prefix}{reply.message} [{reply.code}]", reply.code, reply.rid, reply.param)


class ConnectionLost(ConnectionError):
    """The connection to the runtime closed while a call was waiting for its reply, or none
    could be made within the client's `connect_timeout`."""


class Lost:
    """Queued for a pending call when the runtime cannot be reached; `why` ends the message."""

    def __init__(self, why: str) -> None:
        self.why = why


LOST = Lost("closed")  # the connection to the runtime closed
UNREACHABLE = Lost("could not be made within the connect timeout; is the runtime running there?")


def reply_error(reply: Any, endpoint: str, context: str = "") -> Exception:
    """The exception for a reply that is not the one a call waited for."""
    if isinstance(reply, Lost):
        return ConnectionLost(f"the connection to the runtime at {endpoint} {reply.why}")
    if isinstance(reply, ErrorReply):
        return RequestError.from_reply(reply, context)
    return RequestError(f"unexpected reply {type(reply).__name__}", "internal")
