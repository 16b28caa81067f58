"""The TokenizerManager: prompts in (text, chat messages, ids → validated token ids) and
scheduler outputs out (token ids → text chunks and final results, with stop strings and timing).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from radixkv.detokenizer import IncrementalDetokenizer, StopStrings
from radixkv.protocol import (
    GenerateRequest,
    GenerateResult,
    Ready,
    ReqOutput,
    RequestMeta,
    RuntimeReply,
    TokenChunk,
    WireSamplingParams,
)

MAX_SEED = 2**63 - 1
CHAT_ROLES = ("system", "user", "assistant", "tool")


class BadRequest(ValueError):
    """A request that cannot be served as sent; the message says what is wrong and the limit."""


def check_sampling(sp: WireSamplingParams, prompt_tokens: int, max_context_len: int) -> None:
    """Raise BadRequest on out-of-range sampling values (NaN included)."""
    if not (sp.temperature >= 0 and math.isfinite(sp.temperature)):
        raise BadRequest(
            f"temperature must be a finite number >= 0 (0 = greedy), got {sp.temperature}"
        )
    if not 0 < sp.top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {sp.top_p}")
    if sp.top_k < -1:
        raise BadRequest(f"top_k must be -1 or 0 (off) or a positive count, got {sp.top_k}")
    if sp.seed is not None and not 0 <= sp.seed <= MAX_SEED:
        raise BadRequest(f"seed must be in [0, 2**63 - 1], got {sp.seed}")
    if sp.max_new_tokens < 1:
        raise BadRequest(f"max_new_tokens must be >= 1, got {sp.max_new_tokens}")
    if prompt_tokens + sp.max_new_tokens > max_context_len:
        raise BadRequest(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({sp.max_new_tokens}) exceeds the "
            f"context length {max_context_len}; shorten the prompt or lower max_new_tokens "
            f"(at most {max(0, max_context_len - prompt_tokens)} here)"
        )
    if any(not s for s in sp.stop):
        raise BadRequest("stop strings must not be empty")


@dataclass(slots=True)
class ReqState:
    """What the runtime keeps for one in-flight generate request."""

    rid: str  # the client's id
    identity: bytes  # the client's ZMQ routing id
    stream: bool
    arrival: float  # time.perf_counter() at arrival
    detok: IncrementalDetokenizer
    stops: StopStrings
    text: str = ""  # output text so far (cut at a stop string)
    sent: int = 0  # characters of `text` already streamed
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    stopped: bool = False  # a stop string matched; the scheduler was told to abort


@dataclass(slots=True)
class OutputStep:
    """What one `ReqOutput` turned into: replies for the client, and what to do next."""

    replies: list[RuntimeReply]
    finished: bool
    abort_scheduler: bool  # a stop string ended the request before the scheduler did


class TokenizerManager:
    """Tokenizes and validates requests; detokenizes outputs. No sockets here."""

    def __init__(self, tokenizer: Any, ready: Ready) -> None:
        self.tokenizer = tokenizer
        self.max_context_len = ready.max_context_len
        self.vocab_size = len(tokenizer)
        # A token never spans more characters than its longest vocabulary entry, so a text longer
        # than this cannot fit the context: refuse it without spending time tokenizing it.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = self.max_context_len * max(1, longest)

    # ---- requests in --------------------------------------------------------------------------

    def tokenize(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids, checked against the context; raises BadRequest."""
        given = [x is not None for x in (req.text, req.messages, req.input_ids)]
        if sum(given) != 1:
            raise BadRequest("give exactly one of text, messages or input_ids")
        if req.text is not None:
            ids = self._encode_text(req.text)
        elif req.messages is not None:
            ids = self._encode_chat(req)
        else:
            ids = list(req.input_ids or [])
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(
                    f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
        if not ids:
            raise BadRequest("the prompt is empty")
        if len(ids) >= self.max_context_len:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; the context length is {self.max_context_len} "
                "(prompt + max_new_tokens must fit it)"
            )
        check_sampling(req.sampling, len(ids), self.max_context_len)
        bad_stop = [t for t in req.sampling.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise BadRequest(
                f"stop token id {bad_stop[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            raise BadRequest("the prompt is empty")
        if len(text) > self.max_prompt_chars:
            raise BadRequest(
                f"the prompt has {len(text)} characters, more than can fit the context length "
                f"{self.max_context_len} tokens"
            )
        return list(self.tokenizer.encode(text))

    def _encode_chat(self, req: GenerateRequest) -> list[int]:
        messages = req.messages or []
        if not messages:
            raise BadRequest("messages is empty; give at least one {role, content} message")
        for m in messages:
            if m.role not in CHAT_ROLES:
                raise BadRequest(
                    f"unknown chat role {m.role!r}; use one of {', '.join(CHAT_ROLES)}"
                )
        chars = sum(len(m.content) for m in messages)
        if chars > self.max_prompt_chars:
            raise BadRequest(
                f"the messages have {chars} characters, more than can fit the context length "
                f"{self.max_context_len} tokens"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # a template may reject an order of roles, etc.
            raise BadRequest(f"the chat template rejected these messages: {exc}") from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def new_state(
        self, req: GenerateRequest, identity: bytes, prompt_tokens: int, arrival: float
    ) -> ReqState:
        return ReqState(
            prompt_tokens=prompt_tokens,
            rid=req.rid,
            identity=identity,
            stream=req.stream,
            arrival=arrival,
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStrings(req.sampling.stop),
        )

    # ---- outputs out --------------------------------------------------------------------------

    def on_output(self, state: ReqState, out: ReqOutput) -> OutputStep:
        """Fold one step's tokens into the request; returns chunks and, at the end, the result."""
        now = time.perf_counter()
        if out.token_ids and state.first_token_at is None:
            state.first_token_at = now
        state.prompt_tokens, state.cached_tokens = out.prompt_tokens, out.cached_tokens
        state.token_ids.extend(out.token_ids)
        delta = state.detok.push(out.token_ids)
        if out.finish_reason is not None:
            delta += state.detok.flush()
        finish = self._append_text(state, delta, out.finish_reason)
        replies: list[RuntimeReply] = []
        if state.stream:
            safe = len(state.text) if finish else len(state.text) - state.stops.holdback(state.text)
            if safe > state.sent or out.token_ids:
                replies.append(
                    TokenChunk(
                        rid=state.rid, text=state.text[state.sent : safe], token_ids=out.token_ids
                    )
                )
                state.sent = max(state.sent, safe)
        if finish is None:
            return OutputStep(replies, finished=False, abort_scheduler=False)
        replies.append(self.result(state, finish, now))
        return OutputStep(replies, finished=True, abort_scheduler=state.stopped)

    def _append_text(self, state: ReqState, delta: str, reason: str | None) -> str | None:
        """Add decoded text, cutting at a stop string; returns the finish reason, if finished."""
        if delta and state.stops:
            start = len(state.text)
            state.text += delta
            cut = state.stops.find(state.text, start)
            if cut is not None:
                state.text = state.text[:cut]
                state.stopped = True
                return "stop"
        else:
            state.text += delta
        return reason

    def result(self, state: ReqState, finish_reason: str, now: float) -> GenerateResult:
        first = state.first_token_at if state.first_token_at is not None else now
        meta = RequestMeta(
            prompt_tokens=state.prompt_tokens,
            cached_tokens=state.cached_tokens,
            completion_tokens=len(state.token_ids),
            ttft=first - state.arrival,
            latency=now - state.arrival,
        )
        return GenerateResult(
            rid=state.rid,
            text=state.text,
            token_ids=list(state.token_ids),
            finish_reason=finish_reason,
            meta=meta,
        )
