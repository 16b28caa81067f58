"""HTTP request bodies (OpenAI-compatible and native) as `msgspec.Struct`s, and error objects.

Bodies are decoded with msgspec, which checks the types declared below (and OpenAI's own ranges,
such as temperature <= 2) and names the offending field (`$.temperature`), so every refusal
becomes a 400 with `param` set. The rules of the request itself (context length, vocabulary,
sampling ranges) are checked once, by the runtime (`radixkv.frontend.validation`), whose error
names the field as data. Unknown fields are ignored (clients send many optional ones); fields we
cannot honour are refused, not ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from radixkv.client.core import Message
from radixkv.protocol import MAX_SEED, ChatMessage, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 128  # OpenAI's is "the rest of the context"; ours is bounded

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
TopK = Annotated[int, Meta(ge=-1)]
MaxTokens = Annotated[int, Meta(ge=1)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Stop = str | list[str] | None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    """The sampling fields both OpenAI endpoints share."""

    # OpenAI's API takes an explicit null for every optional field (some clients send them):
    # null means the default, which `sampling()` fills in.
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None  # 1.0
    top_p: TopP | None = None  # 1.0
    top_k: TopK | None = None  # 0 (off); an extension, as in vLLM and SGLang
    seed: Seed | None = None
    stop: Stop = None
    n: Annotated[int, Meta(ge=1)] | None = None  # 1
    stream: bool | None = None  # False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None  # 0
    frequency_penalty: Penalty | None = None  # 0
    ignore_eos: bool | None = None  # False; an extension, for benchmarks

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a value we cannot honour, or None."""
        if self.n is not None and self.n != 1:
            return "n", f"n must be 1 (one choice per request), got {self.n}"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported; leave it at 0"
        return None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            max_new_tokens=self.max_tokens or default_max_tokens,
            stop=stop,
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling, kw_only=True):
    """`POST /v1/completions`: `prompt` is a string, token ids, or a list of either (a batch)."""

    prompt: str | list[Any]  # msgspec allows one array type per union: checked by prompts()
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                return name, f"{name} is not supported"
        if self.stream and len(self.prompts()) > 1:
            return "prompt", "streaming takes one prompt; send a batch without stream"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts (a single prompt is a batch of one); raises a 400 ApiError."""
        p = self.prompt
        if isinstance(p, str) or (p and all(_is_int(t) for t in p)):
            return [p]
        if p and all(isinstance(x, str) for x in p):
            return list(p)
        if p and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return list(p)
        raise ApiError(
            400,
            "prompt must be a string, a list of token ids, or a non-empty list of either",
            "prompt",
            "invalid_type",
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class OpenAIMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[TextPart] | None = None

    def to_chat(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.text for part in content)
        return ChatMessage(self.role, content or "")


def chat_messages(messages: list[OpenAIMessage]) -> list[Message]:
    """The runtime's chat messages; raises a 400 ApiError on non-text content."""
    try:
        return [m.to_chat() for m in messages]
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages", "invalid_value") from None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """`POST /v1/chat/completions`."""

    messages: list[OpenAIMessage]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs is not supported"
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        return super().unsupported()

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        sp = super().sampling(default_max_tokens)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return msgspec.structs.replace(sp, max_new_tokens=self.max_completion_tokens)
        return sp


class GenerateBody(msgspec.Struct, kw_only=True):
    """`POST /generate`, the native endpoint: exactly one of text, input_ids or messages."""

    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[OpenAIMessage] | None = None
    sampling_params: SamplingParams = SamplingParams()
    stream: bool = False


# ---- errors -------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An HTTP error answered with an OpenAI-style error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> bytes:
        error = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        return msgspec.json.encode({"error": error})


_PATH = re.compile(r" - at `\$\.([A-Za-z_]+)")  # the top-level field an error is in
_MISSING = re.compile(r"^Object missing required field `([A-Za-z_]+)`$")


def decode_body(body: bytes, type_: type[Any]) -> Any:
    """Decode a JSON body into `type_`; raises a 400 ApiError naming the bad field."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        match = _PATH.search(str(exc)) or _MISSING.match(str(exc))
        message = str(exc).replace("`$.", "`")
        param = match.group(1) if match else None
        raise ApiError(400, f"invalid request body: {message}", param, "invalid_value") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", None, "invalid_json") from None
