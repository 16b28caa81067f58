"""HTTP request bodies (OpenAI-compatible and native) as `msgspec.Struct`s, and error objects.

Bodies are decoded with msgspec, which checks the types declared below (and OpenAI's own ranges,
such as temperature <= 2) and names the offending field (`$.temperature`), so every refusal
becomes a 400 with `param` set. The rules of the request itself (context length, vocabulary,
sampling ranges) are checked once, by the runtime (`radixkv.frontend.validation`), whose error
names the field as data. No field is silently ignored: a body field we do not declare is refused
with a 400 naming it, and every declared field is honoured or, at values we cannot honour, refused
(`_Body.unsupported`); docs/api.md lists them all.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from radixkv.client.core import Message
from radixkv.http.errors import ApiError
from radixkv.http.tools import ToolPlan, call_text, plan_tools
from radixkv.protocol import MAX_INT, MAX_SEED, ChatMessage, Int, SamplingParams, SessionParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 128  # OpenAI's is "the rest of the context"; ours is bounded

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
TopK = Annotated[int, Meta(ge=-1, le=MAX_INT)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_INT)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Stop = str | list[str] | None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request body: a field it does not declare is refused (400 naming it), and every field it
    declares is honoured or, for values we cannot honour, refused by `unsupported()`. `LIMITS`
    names the fields honoured only at some values (null is always the default)."""

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def check_supported(self) -> None:
        """Raise the 400 (naming the field) for a value we cannot honour."""
        refused = self.unsupported()
        if refused is not None:
            raise ApiError(400, refused[1], refused[0], "unsupported")

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a value we cannot honour, or None."""
        for name, allowed in self.LIMITS.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                if not allowed:
                    return name, f"{name} is not supported; leave it out"
                shown = " or ".join(msgspec.json.encode(v).decode() for v in allowed)
                return name, f"{name} is not supported except as {shown}; got {value!r}"
        return None


class _Sampling(_Body, kw_only=True):
    """The fields both OpenAI endpoints share (docs/api.md lists each one, honoured or refused)."""

    # OpenAI's API takes an explicit null for every optional field (some clients send them):
    # null means the default, which `sampling()` fills in.
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None  # 1.0
    top_p: TopP | None = None  # 1.0
    top_k: TopK | None = None  # 0 (off); an extension, as in vLLM and SGLang
    seed: Seed | None = None
    stop: Stop = None
    stop_token_ids: list[Int] | None = None  # an extension, as in vLLM and SGLang
    n: Annotated[int, Meta(ge=1, le=MAX_INT)] | None = None  # 1
    stream: bool | None = None  # False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None  # 0
    frequency_penalty: Penalty | None = None  # 0
    logit_bias: dict[Int, float] | None = None  # OpenAI's keys are token ids as strings
    user: str | None = None  # an end-user id for the caller's records: no effect on the output
    cache_salt: str | None = None  # vLLM's: shares cached KV only with the same salt
    return_cached_tokens_details: bool | None = None  # SGLang's: `sglext` is always returned
    ignore_eos: bool | None = None  # False; an extension, for benchmarks
    min_tokens: Int | None = None  # 0; vLLM's extension (SGLang: min_new_tokens)
    min_p: float | None = None  # 0; an extension, as in vLLM and SGLang
    repetition_penalty: float | None = None  # 1; an extension, as in vLLM and SGLang
    # vLLM's and SGLang's extensions, honoured at their defaults only (for now)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    regex: str | None = None
    ebnf: str | None = None
    priority: Int | None = None  # 0; SGLang's and vLLM's: cache eviction order (docs/api.md)

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {
        "skip_special_tokens": (True,),
        "include_stop_str_in_output": (False,),
    }

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            max_new_tokens=self.max_tokens or default_max_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_new_tokens=self.min_tokens or 0,
            min_p=self.min_p or 0.0,
            logit_bias=dict(self.logit_bias or {}),
            logprobs=self.wants_logprobs,
            top_logprobs=self.top_logprobs_num,
            logprob_start_len=self.logprob_start_len,
            regex=self.regex,
            ebnf=self.ebnf,
            priority=self.priority or 0,
        )

    @property
    def wants_logprobs(self) -> bool:
        return False

    @property
    def top_logprobs_num(self) -> int:
        return 0

    @property
    def logprob_start_len(self) -> int:
        return -1  # no prompt log probabilities

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling, kw_only=True):
    """`POST /v1/completions`: `prompt` is a string, token ids, or a list of either (a batch)."""

    prompt: str | list[Any]  # msgspec allows one array type per union: checked by prompts()
    best_of: Annotated[int, Meta(ge=1, le=MAX_INT)] | None = None  # 1
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=MAX_INT)] | None = None
    suffix: str | None = None

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.LIMITS, "suffix": ("",),
    }  # fmt: skip

    @property
    def wants_logprobs(self) -> bool:  # best_of ranks its candidates by them
        return self.logprobs is not None or self.candidates > (self.n or 1)

    @property
    def top_logprobs_num(self) -> int:
        return self.logprobs or 0

    @property
    def logprob_start_len(self) -> int:
        """`echo` with `logprobs`: the prompt's log probabilities too, from its first token."""
        return 0 if self.echo and self.logprobs is not None else -1

    def unsupported(self) -> tuple[str, str] | None:
        if self.stream and len(self.prompts()) > 1:
            return "prompt", "streaming takes one prompt; send a batch without stream"
        if self.best_of is not None and self.best_of < (self.n or 1):
            return "best_of", f"best_of ({self.best_of}) must be >= n ({self.n or 1})"
        if self.stream and (self.best_of or 1) > 1:
            return "best_of", "best_of > 1 cannot stream (the best are known at the end)"
        return super().unsupported()

    @property
    def candidates(self) -> int:
        """How many completions to generate per prompt (best_of, at least n)."""
        return max(self.best_of or 1, self.n or 1)

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
    """A 64-bit integer (a larger one is refused here, not when forwarded: see protocol.Int)."""
    return isinstance(x, int) and not isinstance(x, bool) and -MAX_INT - 1 <= x <= MAX_INT


class TextPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str = ""


class OpenAIMessage(_Body, kw_only=True):
    """A chat message (roles: `radixkv.frontend.validation.CHAT_ROLES`)."""

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier tool calls
    tool_call_id: str | None = None  # which call a tool message answers: bookkeeping only

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {"name": (), "refusal": ()}

    def to_chat(self) -> ChatMessage:
        refused = self.unsupported()
        if refused is not None:
            raise ValueError(f"messages: {refused[1]}")
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.text for part in content)
        if self.tool_calls:  # an earlier forced call, as the model was made to write it
            content = "\n".join([*filter(None, [content]), *map(call_text, self.tool_calls)])
        return ChatMessage(self.role, content or "")


def chat_messages(messages: list[OpenAIMessage]) -> list[Message]:
    """The runtime's chat messages; raises a 400 ApiError on what we cannot honour."""
    try:
        return [m.to_chat() for m in messages]
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages", "invalid_value") from None


class FunctionDef(_Body, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # the output always follows `parameters` here


class ToolDef(_Body, kw_only=True):
    type: str
    function: FunctionDef


class NamedFunction(_Body, kw_only=True):
    name: str


class ToolChoice(_Body, kw_only=True):
    type: str
    function: NamedFunction


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[OpenAIMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_INT)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # without tools: no effect
    functions: list[Any] | None = None  # deprecated by OpenAI
    function_call: str | dict[str, Any] | None = None  # deprecated by OpenAI
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    store: bool | None = None  # OpenAI keeps completions for evals; we keep none
    metadata: dict[str, str] | None = None  # for stored completions: no effect on the output
    service_tier: str | None = None
    safety_identifier: str | None = None  # an end-user id: no effect on the output
    prompt_cache_key: str | None = None  # a caching hint: the radix cache finds prefixes itself

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.LIMITS,
        "functions": ([],),
        "function_call": ("none",),
        "modalities": (["text"],),
        "audio": (),
        "prediction": (),
        "reasoning_effort": (),
        "verbosity": (),
        "web_search_options": (),
        "store": (False,),
        "service_tier": ("auto", "default"),
    }

    def unsupported(self) -> tuple[str, str] | None:
        return self._tools_unsupported() or self._format_unsupported() or super().unsupported()

    def _tools_unsupported(self) -> tuple[str, str] | None:
        choice, names = self.tool_choice, [t.function.name for t in self.tools or []]
        if not names:
            if choice not in (None, "none"):
                return "tool_choice", f"tool_choice {choice!r} needs tools"
            return None
        if any(t.type != "function" for t in self.tools or []):
            return "tools", "tools must be of type 'function'"
        if choice in (None, "auto"):
            return "tool_choice", (
                "tool_choice 'auto' (the default with tools) needs a parser of the model's own "
                "tool-call format, which radixkv does not have: set tool_choice to 'required', "
                "to {'type': 'function', 'function': {'name': ...}}, or to 'none'"
            )
        if isinstance(choice, ToolChoice) and choice.function.name not in names:
            return "tool_choice", f"tool_choice names {choice.function.name!r}, not in tools"
        if isinstance(choice, str) and choice not in ("none", "required"):
            return "tool_choice", f"unknown tool_choice {choice!r}"
        if choice != "none" and self.response_format is not None:
            return "response_format", "give either forced tool calls or a response_format"
        return None

    def tool_plan(self) -> ToolPlan | None:
        """How the output is forced into a tool call, or None (no tools, or tool_choice none)."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        tools = msgspec.to_builtins(self.tools)
        return plan_tools(tools, msgspec.to_builtins(self.tool_choice))

    def _format_unsupported(self) -> tuple[str, str] | None:
        rf = self.response_format
        if rf is not None and rf.type not in ("text", "json_object", "json_schema"):
            return "response_format", (
                f"response_format {rf.type!r} is not supported; use text, json_object or "
                "json_schema"
            )
        if rf is not None and rf.type == "json_schema" and "schema" not in (rf.json_schema or {}):
            return "response_format", "response_format json_schema needs json_schema.schema"
        return None

    def schema(self) -> str | None:
        """The JSON schema the output must follow (json_object: any object; a forced tool
        call: its arguments), as JSON text."""
        if (plan := self.tool_plan()) is not None:
            return plan.schema
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return '{"type": "object"}'
        return msgspec.json.encode((rf.json_schema or {})["schema"]).decode()

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def top_logprobs_num(self) -> int:
        return self.top_logprobs or 0

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        sp = super().sampling(default_max_tokens)
        if (schema := self.schema()) is not None:
            sp = msgspec.structs.replace(sp, json_schema=schema)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return msgspec.structs.replace(sp, max_new_tokens=self.max_completion_tokens)
        return sp


class GenerateBody(_Body, kw_only=True):
    """`POST /generate`, the native endpoint: exactly one of text, input_ids or messages; our
    `SamplingParams` (an unknown sampling field is refused, as on the ZMQ endpoint). SGLang's
    other fields are honoured at their defaults only (its benchmark sends them)."""

    text: str | None = None
    input_ids: list[Int] | None = None
    messages: list[OpenAIMessage] | None = None
    sampling_params: SamplingParams = SamplingParams()
    stream: bool = False
    return_logprob: bool | None = None
    logprob_start_len: Int | None = None
    top_logprobs_num: Int | None = None
    return_text_in_logprobs: bool | None = None  # without return_logprob: no effect
    lora_path: str | None = None
    image_data: Any = None
    # the request's id (a session's next request continues it by this; default: a new one)
    rid: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    session_params: SessionParams | None = None  # the prompt continues a session's request
    return_routed_experts: bool | None = None  # MoE models only: none here
    return_cached_tokens_details: bool | None = None  # meta_info always has them
    cache_salt: str | None = None  # as on /v1: shares cached KV only with the same salt
    priority: Int | None = None  # SGLang's top-level field: sampling_params.priority here

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {
        "lora_path": (), "image_data": (),
        "return_routed_experts": (False,),
    }  # fmt: skip

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs_num and not self.return_logprob:
            return "top_logprobs_num", "top_logprobs_num needs return_logprob"
        if self.logprob_start_len not in (None, -1) and not self.return_logprob:
            return "logprob_start_len", "logprob_start_len needs return_logprob"
        return super().unsupported()

    @property
    def sampling(self) -> SamplingParams:
        """`sampling_params`, with SGLang's top-level logprob and priority fields folded in."""
        sp = self.sampling_params
        if self.priority is not None:
            sp = msgspec.structs.replace(sp, priority=self.priority)
        if not self.return_logprob:
            return sp
        top = self.top_logprobs_num or 0
        start = -1 if self.logprob_start_len is None else self.logprob_start_len
        return msgspec.structs.replace(sp, logprobs=True, top_logprobs=top, logprob_start_len=start)


class OpenSessionBody(_Body, kw_only=True):
    """`POST /open_session` (SGLang's): a session id (a new one when null); the cap on its
    prompts, history included, in tokens (0: the context length)."""

    session_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    capacity_of_str_len: Annotated[int, Meta(ge=0, le=MAX_INT)] = 0
    cache_salt: str | None = None  # ours: the salt every request of the session carries


class CloseSessionBody(_Body, kw_only=True):
    """`POST /close_session` (SGLang's)."""

    session_id: str
    cache_salt: str | None = None  # the session's (as opened)


class TokenizeBody(_Body, kw_only=True):
    """`POST /tokenize` (vLLM's and SGLang's): a text, or chat messages templated with the
    generation prompt as `/v1/chat/completions` would."""

    model: str | None = None
    prompt: str | None = None
    messages: list[OpenAIMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool | None = None

    LIMITS: ClassVar[dict[str, tuple[Any, ...]]] = {"add_generation_prompt": (True,)}


class DetokenizeBody(_Body, kw_only=True):
    """`POST /detokenize`: token ids -> text."""

    model: str | None = None
    tokens: list[Int]
