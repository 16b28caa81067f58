"""Every rule a generate request must pass, checked once, in the runtime process.

A refusal is a `BadRequest` that says what was wrong and the limit, and names the field at fault
(`param`, in `radixkv.protocol` names) so that it reaches the client as data, never parsed back
out of the message. Past these checks the scheduler and the model trust the request; the
scheduler checks only what it alone knows (whether the request can ever fit its KV cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from radixkv.protocol import MAX_SEED, ChatMessage, GenerateRequest, SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_STOP_STRINGS = 64  # OpenAI allows 4; vLLM and SGLang set no limit. Each one is searched for
MAX_STOP_CHARS = 1024  # in every output chunk, and the longest sets how much text is held back
MAX_STOP_TOKEN_IDS = 1024
MAX_CACHE_SALT_CHARS = 1024
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's system


class BadRequest(ValueError):
    """A request that cannot be served as sent; `param` names the field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_prompt_kind(req: GenerateRequest) -> None:
    """A generate request carries exactly one of text, messages or input_ids (and a usable
    cache salt, if any)."""
    given = [x is not None for x in (req.text, req.messages, req.input_ids)]
    if sum(given) != 1:
        raise BadRequest("give exactly one of text, messages or input_ids", "prompt")
    if req.cache_salt is not None and not 0 < len(req.cache_salt) <= MAX_CACHE_SALT_CHARS:
        raise BadRequest(
            f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
            f"characters, got {len(req.cache_salt)}",
            "cache_salt",
        )


def check_text(text: str, max_chars: int, max_context_len: int) -> None:
    """Before tokenizing: not empty, and not so long that it cannot fit the context."""
    if not text:
        raise BadRequest("the prompt is empty", "prompt")
    if len(text) > max_chars:
        raise BadRequest(
            f"the prompt has {len(text)} characters, more than can fit the context length "
            f"{max_context_len} tokens",
            "prompt",
        )


def check_messages(messages: Sequence[ChatMessage], max_chars: int, max_context_len: int) -> None:
    """Before templating: at least one message, known roles, not too long to fit the context."""
    if not messages:
        raise BadRequest("messages is empty; give at least one {role, content} message", "messages")
    if len(messages) > max_context_len:  # every message is at least one token once templated
        raise BadRequest(
            f"{len(messages)} messages cannot fit the context length {max_context_len} tokens",
            "messages",
        )
    for m in messages:
        if m.role not in CHAT_ROLES:
            raise BadRequest(
                f"unknown chat role {m.role!r}; use one of {', '.join(CHAT_ROLES)}", "messages"
            )
    chars = sum(len(m.content) for m in messages)
    if chars > max_chars:
        raise BadRequest(
            f"the messages have {chars} characters, more than can fit the context length "
            f"{max_context_len} tokens",
            "messages",
        )


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "input_ids") -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        what = {"stop_token_ids": "stop token id", "logit_bias": "logit_bias token id"}.get(
            param, "token id"
        )
        raise BadRequest(f"{what} {bad[0]} is outside the vocabulary [0, {vocab_size})", param)


def check_sampling(sp: SamplingParams, vocab_size: int) -> None:
    """Out-of-range sampling values (NaN included)."""
    if not (sp.temperature >= 0 and math.isfinite(sp.temperature)):
        raise BadRequest(
            f"temperature must be a finite number >= 0 (0 = greedy), got {sp.temperature}",
            "temperature",
        )
    if not 0 < sp.top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {sp.top_p}", "top_p")
    if sp.top_k < -1:
        raise BadRequest(
            f"top_k must be -1 or 0 (off) or a positive count, got {sp.top_k}", "top_k"
        )
    if sp.seed is not None and not 0 <= sp.seed <= MAX_SEED:
        raise BadRequest(f"seed must be in [0, 2**63 - 1], got {sp.seed}", "seed")
    if sp.max_new_tokens < 1:
        raise BadRequest(f"max_new_tokens must be >= 1, got {sp.max_new_tokens}", "max_new_tokens")
    check_stops(sp)
    check_token_ids(sp.stop_token_ids, vocab_size, "stop_token_ids")
    check_penalties(sp, vocab_size)
    if not 0 <= sp.top_logprobs <= MAX_TOP_LOGPROBS:
        raise BadRequest(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {sp.top_logprobs}",
            "top_logprobs",
        )
    if sp.top_logprobs and not sp.logprobs:
        raise BadRequest("top_logprobs needs logprobs", "top_logprobs")
    if sp.logprob_start_len < -1 or (sp.logprob_start_len >= 0 and not sp.logprobs):
        raise BadRequest(
            "logprob_start_len is -1 (no prompt log probabilities) or a prompt position, and "
            f"needs logprobs; got {sp.logprob_start_len}",
            "logprob_start_len",
        )
    check_grammar(sp)


def check_stops(sp: SamplingParams) -> None:
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(sp.stop)}", "stop")
    if any(not s for s in sp.stop):
        raise BadRequest("stop strings must not be empty", "stop")
    longest = max((len(s) for s in sp.stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise BadRequest(
            f"a stop string has {longest} characters; at most {MAX_STOP_CHARS}", "stop"
        )
    if len(sp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise BadRequest(
            f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(sp.stop_token_ids)}",
            "stop_token_ids",
        )


def check_grammar(sp: SamplingParams) -> None:
    """At most one constraint; a JSON schema that is JSON. (Whether it compiles is the
    scheduler's to say: the grammar engine lives there.)"""
    given = [k for k in ("json_schema", "regex", "ebnf") if getattr(sp, k) is not None]
    if len(given) > 1:
        raise BadRequest(f"give at most one of json_schema, regex or ebnf, not {given}", given[1])
    if sp.json_schema is not None:
        try:
            msgspec.json.decode(sp.json_schema)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise BadRequest(f"json_schema is not JSON: {exc}", "json_schema") from None


def check_penalties(sp: SamplingParams, vocab_size: int) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sp, name)
        if not -2 <= value <= 2:
            raise BadRequest(f"{name} must be in [-2, 2], got {value}", name)
    if not (sp.repetition_penalty > 0 and math.isfinite(sp.repetition_penalty)):
        raise BadRequest(
            f"repetition_penalty must be a finite number > 0 (1 = off), got "
            f"{sp.repetition_penalty}",
            "repetition_penalty",
        )
    if not 0 <= sp.min_p <= 1:
        raise BadRequest(f"min_p must be in [0, 1], got {sp.min_p}", "min_p")
    if not 0 <= sp.min_new_tokens <= sp.max_new_tokens:
        raise BadRequest(
            f"min_new_tokens must be in [0, max_new_tokens = {sp.max_new_tokens}], got "
            f"{sp.min_new_tokens}",
            "min_new_tokens",
        )
    check_token_ids(list(sp.logit_bias), vocab_size, "logit_bias")
    bad = [b for b in sp.logit_bias.values() if not -100 <= b <= 100]
    if bad:
        raise BadRequest(f"logit_bias values must be in [-100, 100], got {bad[0]}", "logit_bias")


def check_logprob_start(sp: SamplingParams, prompt_tokens: int) -> None:
    if sp.logprob_start_len >= prompt_tokens:
        raise BadRequest(
            f"logprob_start_len {sp.logprob_start_len} is not a position of the {prompt_tokens}-"
            "token prompt",
            "logprob_start_len",
        )


def check_fits_context(prompt_tokens: int, max_new_tokens: int, max_context_len: int) -> None:
    """The prompt and every token it may generate fit the context."""
    if not prompt_tokens:
        raise BadRequest("the prompt is empty", "prompt")
    if prompt_tokens >= max_context_len:
        raise BadRequest(
            f"the prompt has {prompt_tokens} tokens; the context length is {max_context_len} "
            "(prompt + max_new_tokens must fit it)",
            "prompt",
        )
    if prompt_tokens + max_new_tokens > max_context_len:
        raise BadRequest(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context length {max_context_len}; shorten the prompt or lower max_new_tokens "
            f"(at most {max(0, max_context_len - prompt_tokens)} here)",
            "prompt",
        )
