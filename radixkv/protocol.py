"""Every message that crosses a socket, as `msgspec.Struct`s encoded with msgpack (never pickle).

Two channels:

    client (DEALER) ──▶ runtime (ROUTER)      ClientMessage      replies: RuntimeReply
    runtime (PUSH)  ──▶ scheduler (PULL)      SchedulerMessage
    scheduler (PUSH) ──▶ runtime (PULL)       SchedulerReply

Each message is a tagged struct (`{"type": ...}` on the wire), so one decoder per channel turns a
frame into the right class or raises `msgspec.ValidationError`/`DecodeError`, which the receiver
answers with an `ErrorReply` (or counts and drops) instead of crashing.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec

MAX_FRAME_BYTES = 64 * 1024 * 1024  # a larger frame is refused before it is decoded
MAX_SEED = 2**63 - 1  # seeds are in [0, MAX_SEED]
MAX_INT = 2**63 - 1
# Every integer a client sends: msgpack and JSON can carry larger ones, which nothing here needs
# and which would fail far from the input (OverflowError when forwarded to the scheduler).
Int = Annotated[int, msgspec.Meta(ge=-MAX_INT - 1, le=MAX_INT)]


class SamplingParams(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """How to sample and when to stop, as a client sends it (`radixkv.SamplingParams`).

    The runtime checks every field once (`radixkv.frontend.validation`); past it, the scheduler
    and the model trust these values. `top_k` 0 or -1 and `top_p` 1 turn those filters off;
    `temperature` 0 is greedy; `seed` makes a sampled request reproducible in any batch.
    """

    temperature: float = 0.0
    top_k: Int = 0
    top_p: float = 1.0
    seed: Int | None = None
    max_new_tokens: Int = 128
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[Int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's definitions (docs/api.md): penalties on the tokens generated so far (repetition: on
    # the prompt's too), EOS and stop ids barred until min_new_tokens, min_p relative to the top
    # token's probability, logit_bias added to the logits.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: Int = 0
    min_p: float = 0.0
    logit_bias: dict[Int, float] = msgspec.field(default_factory=dict)
    # the log probability of every generated token (and of the `top_logprobs` most likely ones)
    logprobs: bool = False
    top_logprobs: Int = 0
    # with logprobs, also the prompt's tokens' from this position on (SGLang's
    # `logprob_start_len`; OpenAI's `echo` is 0); -1: none. The first token has none (nothing
    # precedes it), and the prompt from here on is computed, not taken from the radix cache
    logprob_start_len: Int = -1
    # structured output (SGLang's names), at most one: the output follows a JSON schema (a JSON
    # text), a regular expression or an EBNF grammar, and ends when it is complete
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # SGLang's request `priority`, for cache eviction only: with --radix-eviction-policy priority
    # the prefixes a request caches are evicted after those of lower priority (higher is kept
    # longer); refused under any other policy, and it does not reorder scheduling
    priority: Int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def grammar(self) -> tuple[str, str] | None:
        """("json_schema" | "regex" | "ebnf", its text), or None without a constraint."""
        for kind in ("json_schema", "regex", "ebnf"):
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty, a bias or min_new_tokens changes this request's logits."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_new_tokens
            or self.logit_bias
        )


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    """A generated token's log probability: a float32 log-softmax of the model's logits at that
    step (before temperature, penalties or any other sampling adjustment), and the same of the
    most likely tokens. The runtime fills in the tokens' texts for clients."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    text: str = ""
    top_texts: list[str] = msgspec.field(default_factory=list)


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


# ---- client → runtime ---------------------------------------------------------------------------


class SessionParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A generate request's place in a session (SGLang's `session_params`,
    `radixkv.frontend.sessions`): it continues request `rid` of session `id` (its prompt and
    output, the first `offset` tokens of them if given, its prompt only with
    `drop_previous_output`), or starts a new branch without `rid`; `replace` forgets what
    continued `rid` before (the whole session without `rid`), aborting what still runs."""

    id: str
    rid: str | None = None
    offset: Int | None = None
    replace: bool = False
    drop_previous_output: bool = False


class GenerateRequest(msgspec.Struct, tag="generate", kw_only=True, forbid_unknown_fields=True):
    """Exactly one of `text`, `messages` (chat, templated by the runtime) or `input_ids`; a field
    this runtime does not know is refused, never ignored."""

    rid: str
    text: str | None = None
    messages: list[ChatMessage] | None = None
    input_ids: list[Int] | None = None
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    api_key: str | None = None
    # shares cached KV only with requests of the same salt (vLLM's name): closes the side
    # channel of cached_tokens and TTFT between users who must not see each other's prompts
    cache_salt: str | None = None
    session: SessionParams | None = None  # the prompt continues a session's earlier request


def salted_key_head(first_token: int, salt: str) -> int:
    """The radix-tree key of a salted request's first token (cache isolation, vLLM's
    `cache_salt`); here because cache events carry tree keys and a router computes the same.

    Keys are token ids (>= 0); a salted request's first key is instead a negative number mixed from
    the salt and that token. Requests with the same salt and prompt meet on it and share as usual;
    with another salt, or none, they differ from the first token on, so they never share a node,
    and so never a KV slot. The KV stored is the token's own: only the key is salted.
    """
    digest = hashlib.blake2b(f"{first_token}:{salt}".encode(), digest_size=7).digest()
    return -1 - int.from_bytes(digest, "little")


def tree_key(input_ids: list[int], cache_salt: str | None) -> list[int]:
    """The radix-tree key of a prompt: its ids, the first salted when it has a salt."""
    if cache_salt is None or not input_ids:
        return input_ids
    return [salted_key_head(input_ids[0], cache_salt), *input_ids[1:]]


def key_cache_salt(api_key: str, cache_salt: str | None) -> str:
    """The salt of a request under `--isolate-cache-per-key`: one per key (a digest, so the key
    itself is never a tree key), combined with the request's own salt if it gave one."""
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:32]
    return f"key:{digest}" if cache_salt is None else f"key:{digest}:{cache_salt}"


class AbortRequest(msgspec.Struct, tag="abort", kw_only=True):
    rid: str
    api_key: str | None = None


class FlushCacheRequest(msgspec.Struct, tag="flush_cache", kw_only=True):
    rid: str = ""
    api_key: str | None = None


class GetStatsRequest(msgspec.Struct, tag="get_stats", kw_only=True):
    rid: str = ""
    api_key: str | None = None


class TokenizeRequest(msgspec.Struct, tag="tokenize", kw_only=True, forbid_unknown_fields=True):
    """Token ids of a text, or of chat messages templated as a generate request would be."""

    rid: str = ""
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for text (a chat template places its own)
    api_key: str | None = None


class DetokenizeRequest(msgspec.Struct, tag="detokenize", kw_only=True, forbid_unknown_fields=True):
    rid: str = ""
    token_ids: list[Int]
    skip_special_tokens: bool = False
    api_key: str | None = None


class GetServerInfoRequest(msgspec.Struct, tag="get_server_info", kw_only=True):
    """The scheduler's start-up handshake (`Ready`): model, KV capacity, context length, and
    where it publishes cache events; a router asks each worker for it."""

    rid: str = ""
    api_key: str | None = None


class OpenSessionRequest(
    msgspec.Struct, tag="open_session", kw_only=True, forbid_unknown_fields=True
):
    """Open a session (SGLang's `open_session`): `session_id`, or a new one when None;
    `capacity_of_str_len` caps its requests' prompts, history included, in tokens (0: only the
    context length). Its requests must carry the same `cache_salt`. Answered `SessionReply`."""

    rid: str = ""
    session_id: str | None = None
    capacity_of_str_len: Int = 0
    cache_salt: str | None = None
    api_key: str | None = None


class CloseSessionRequest(
    msgspec.Struct, tag="close_session", kw_only=True, forbid_unknown_fields=True
):
    """Close a session: it can no longer be continued, and the cache evicts the prefixes only
    it used before any other (its running requests finish). Answered `SessionReply`."""

    rid: str = ""
    session_id: str
    cache_salt: str | None = None
    api_key: str | None = None


class DemoteRequest(msgspec.Struct, tag="demote", kw_only=True, forbid_unknown_fields=True):
    """Prefixes no one needs any more (a router's closed session, for the runtimes that may hold
    them): each path past its first `shared` tokens is evicted before other prefixes until it is
    used again (`RadixCache.demote`). Answered with nothing."""

    rid: str = ""
    paths: list[list[Int]]
    shared: list[Int]
    cache_salt: str | None = None
    api_key: str | None = None


ClientMessage = (
    GenerateRequest
    | OpenSessionRequest
    | CloseSessionRequest
    | DemoteRequest
    | AbortRequest
    | FlushCacheRequest
    | GetStatsRequest
    | TokenizeRequest
    | DetokenizeRequest
    | GetServerInfoRequest
)


# ---- runtime → client ---------------------------------------------------------------------------


class RequestMeta(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request accounting: how much of the prompt the radix cache served."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft: float  # seconds from arrival at the runtime to the first token
    latency: float  # seconds from arrival to the final token
    queue_time: float = 0.0  # seconds it waited in the scheduler for its first admission


class TokenChunk(msgspec.Struct, tag="chunk", kw_only=True):
    """A streamed piece of output: new text (never a broken UTF-8 sequence) and its token ids,
    with the request's prompt and cached token counts (known once it was admitted)."""

    rid: str
    text: str
    token_ids: list[int]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked
    # in the first chunk, with logprob_start_len >= 0: the prompt's tokens' from that position on
    # (the first token's logprob is NaN: nothing precedes it)
    prompt_logprobs: list[TokenLogprob] | None = None


class GenerateResult(msgspec.Struct, tag="result", kw_only=True):
    rid: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    meta: RequestMeta
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # as in TokenChunk


class ErrorReply(msgspec.Struct, tag="error", kw_only=True):
    """A request (or a frame) that could not be served; `rid` is "" when none could be read.

    `param` names the request field at fault, in this protocol's names ("temperature",
    "max_new_tokens", "messages", or "prompt" for the prompt as a whole), when one is.
    """

    rid: str
    message: str
    code: str = "bad_request"  # bad_request | unauthorized | too_large | overloaded | internal
    param: str | None = None


class Stats(msgspec.Struct, kw_only=True):
    """Monotonic counters (tokens and events since start) and gauges (now)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    evicted_tokens: int = 0
    demoted_tokens: int = 0  # cached tokens closed sessions marked to be evicted first
    retractions: int = 0
    prefill_steps: int = 0  # extend batches run (prefill chunks, riders included)
    raised_prefill_steps: int = 0  # of those, with a budget --ttft-target raised for late prompts
    finished: dict[str, int] = msgspec.field(default_factory=dict)
    kv_capacity: int = 0
    kv_used: int = 0
    evictable: int = 0
    protected: int = 0
    running: int = 0
    waiting: int = 0
    # with a host KV tier (--kv-host-tier): prompt tokens served from it (also in cached_tokens),
    # the seconds spent loading them back, tokens written into it, its size and capacity
    tier_hit_tokens: int = 0
    tier_load_seconds: float = 0.0
    tier_stored_tokens: int = 0
    tier_tokens: int = 0
    tier_capacity: int = 0
    # with --kv-storage-dir: prompt tokens read back from disk (also in cached_tokens), tokens
    # written there, and blocks found corrupt or truncated (skipped and removed)
    storage_hit_tokens: int = 0
    storage_stored_tokens: int = 0
    storage_corrupt_blocks: int = 0
    storage_evicted_blocks: int = 0  # removed to stay under --kv-storage-size
    # from a router: each worker's own (the fields above are their sums)
    workers: list[WorkerStats] = msgspec.field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class WorkerStats(msgspec.Struct, kw_only=True):
    """One worker behind a router: its endpoint, whether it is in the rotation, the requests the
    router has in flight there and has sent there since it started, and its own `Stats` (None
    while it is down)."""

    worker: str
    alive: bool
    in_flight: int
    routed: int
    stats: Stats | None = None


class SessionReply(msgspec.Struct, tag="session", kw_only=True):
    """A session opened or closed."""

    rid: str
    session_id: str


class StatsReply(msgspec.Struct, tag="stats", kw_only=True):
    rid: str
    stats: Stats


class FlushReply(msgspec.Struct, tag="flushed", kw_only=True):
    rid: str
    ok: bool
    message: str = ""


class TokenizeReply(msgspec.Struct, tag="tokens", kw_only=True):
    rid: str
    token_ids: list[int]
    max_context_len: int


class DetokenizeReply(msgspec.Struct, tag="text", kw_only=True):
    rid: str
    text: str


class ServerInfoReply(msgspec.Struct, tag="server_info", kw_only=True):
    rid: str
    ready: Ready


RuntimeReply = (
    TokenChunk
    | GenerateResult
    | ErrorReply
    | StatsReply
    | FlushReply
    | TokenizeReply
    | DetokenizeReply
    | ServerInfoReply
    | SessionReply
)


# ---- runtime → scheduler ------------------------------------------------------------------------


class TokenizedRequest(msgspec.Struct, tag="tokenized", kw_only=True):
    """A validated request: the scheduler checks only what it alone knows (KV capacity)."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    cache_salt: str | None = None


class ShutdownRequest(msgspec.Struct, tag="shutdown"):
    pass


class DemotePaths(msgspec.Struct, tag="demote_paths", kw_only=True):
    """Tree keys of paths no one needs any more, each past its first `shared` tokens
    (`RadixCache.demote`)."""

    keys: list[list[int]]
    shared: list[int]


SchedulerMessage = (
    TokenizedRequest
    | AbortRequest
    | FlushCacheRequest
    | GetStatsRequest
    | DemotePaths
    | ShutdownRequest
)


# ---- scheduler → runtime ------------------------------------------------------------------------


class ReqOutput(msgspec.Struct, array_like=True):
    """New tokens of one request in one step; `finish_reason` set on its last."""

    rid: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    queue_time: float = 0.0  # seconds the request waited for its first admission
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token (TokenChunk's)


class BatchOutput(msgspec.Struct, tag="batch_out"):
    outputs: list[ReqOutput]


class ReqError(msgspec.Struct, tag="req_error", kw_only=True):
    """The scheduler refused or aborted a request (e.g. it can never fit in the KV cache, or
    the waiting queue is full: code "overloaded"; `param`: a grammar that does not compile)."""

    rid: str
    message: str
    code: str = "bad_request"
    param: str | None = None


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    """Start-up handshake: the scheduler is loaded and serving."""

    model: str
    kv_capacity: int
    page_size: int
    max_context_len: int
    max_running_requests: int
    dtype: str
    eos_token_ids: list[int]
    cache_events: str | None = None  # the PUB endpoint of its cache events (--cache-events-port)


class Fatal(msgspec.Struct, tag="fatal", kw_only=True):
    """The scheduler cannot go on (e.g. the model failed to load); it exits after sending this."""

    message: str


SchedulerReply = BatchOutput | ReqError | StatsReply | FlushReply | Ready | Fatal


# ---- scheduler → router (PUB/SUB) ---------------------------------------------------------------


class CacheEvent(msgspec.Struct, array_like=True, frozen=True):
    """A change to a worker's radix tree. `tokens` is a path from the root in tree keys (token
    ids; a salted request's first key salted, `tree_key`). "stored": the whole path is cached;
    "removed": the path is cut back to its first `keep` tokens (a leaf evicted); "cleared": the
    whole tree was flushed (no tokens)."""

    kind: str
    tokens: list[int]
    keep: int = 0


class CacheEvents(msgspec.Struct, tag="cache_events"):
    """The events of one scheduler step, numbered: a router that sees a gap in `seq` (a slow
    subscriber's messages were dropped) knows its view of that worker is incomplete."""

    seq: int
    events: list[CacheEvent]


# ---- codec --------------------------------------------------------------------------------------


class Codec:
    """One msgpack encoder and a decoder for one channel's union of message types."""

    def __init__(self, message_type: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(message_type)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, frame: bytes) -> Any:
        """Raises `msgspec.DecodeError` (a subclass of ValidationError's base) on bad frames."""
        if len(frame) > MAX_FRAME_BYTES:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
        return self._decoder.decode(frame)


class FrameTooLarge(ValueError):
    pass


def cache_events_codec() -> Codec:
    """What a router decodes from a worker's cache-event publisher."""
    return Codec(CacheEvents)


def client_codec() -> Codec:
    """What the runtime's client endpoint decodes."""
    return Codec(ClientMessage)


def reply_codec() -> Codec:
    """What a client decodes."""
    return Codec(RuntimeReply)


def scheduler_codec() -> Codec:
    """What the scheduler decodes."""
    return Codec(SchedulerMessage)


def scheduler_reply_codec() -> Codec:
    """What the runtime decodes from the scheduler."""
    return Codec(SchedulerReply)
