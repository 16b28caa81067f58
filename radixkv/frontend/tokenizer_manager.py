"""The TokenizerManager: prompts in (text, chat messages, ids → validated token ids) and
scheduler outputs out (token ids → text chunks and final results, with stop strings and timing).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from radixkv.frontend.detokenizer import IncrementalDetokenizer, StopStrings
from radixkv.frontend.validation import (
    BadRequest,
    check_fits_context,
    check_logprob_start,
    check_messages,
    check_prompt_kind,
    check_sampling,
    check_text,
    check_token_ids,
)
from radixkv.protocol import (
    ChatMessage,
    DetokenizeRequest,
    GenerateRequest,
    GenerateResult,
    Ready,
    ReqOutput,
    RequestMeta,
    RuntimeReply,
    TokenChunk,
    TokenizeRequest,
    TokenLogprob,
)

ROLE_NAMES = {"developer": "system"}  # OpenAI's newer name; chat templates know "system"


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
    last_token_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    queue_time: float = 0.0
    stopped: bool = False  # a stop string matched; the scheduler was told to abort
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # with logprob_start_len >= 0


@dataclass(slots=True)
class OutputStep:
    """What one `ReqOutput` turned into: replies for the client, and what to do next."""

    replies: list[RuntimeReply]
    finished: bool
    abort_scheduler: bool  # a stop string ended the request before the scheduler did
    token_gap: float | None = None  # seconds per token since the previous tokens (after the first)


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
        self._token_texts: dict[int, str] = {}  # a token's text decoded alone (for logprobs)
        # whether encoding a text puts a BOS first (a session's continuation drops it)
        self.bos_token_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.adds_bos = self.bos_token_id is not None and bool(
            tokenizer.encode("a")[:1] == [self.bos_token_id]
        )

    # ---- requests in --------------------------------------------------------------------------

    def tokenize(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids, every rule of `validation` checked; raises BadRequest."""
        check_prompt_kind(req)
        check_sampling(req.sampling, self.vocab_size)  # the cheap checks before any encoding
        if req.text is not None:
            check_text(req.text, self.max_prompt_chars, self.max_context_len)
            ids = list(self.tokenizer.encode(req.text))
        elif req.messages is not None:
            check_messages(req.messages, self.max_prompt_chars, self.max_context_len)
            ids = self._encode_chat(req.messages)
        else:
            ids = list(req.input_ids or [])
            check_token_ids(ids, self.vocab_size)
        check_logprob_start(req.sampling, len(ids))
        check_fits_context(len(ids), req.sampling.max_new_tokens, self.max_context_len)
        return ids

    @staticmethod
    def prompt_size(req: GenerateRequest | TokenizeRequest) -> int:
        """A cheap measure of the work `tokenize` will do: characters, plus a few per message."""
        if req.text is not None:
            return len(req.text)
        if req.messages is not None:
            return sum(len(m.content) + 16 for m in req.messages)
        return 0  # token ids: nothing to encode

    def tokenize_only(self, req: TokenizeRequest) -> list[int]:
        """The token ids of a text or of chat messages (as `tokenize` would make them for a
        generate request), without a generation's checks; raises BadRequest."""
        if (req.text is None) == (req.messages is None):
            raise BadRequest("give exactly one of text or messages", "prompt")
        if req.messages is not None:
            check_messages(req.messages, self.max_prompt_chars, self.max_context_len)
            return self._encode_chat(req.messages)
        check_text(req.text or " ", self.max_prompt_chars, self.max_context_len)
        return list(self.tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens))

    def detokenize(self, req: DetokenizeRequest) -> str:
        """The text of token ids; raises BadRequest on ids outside the vocabulary."""
        check_token_ids(req.token_ids, self.vocab_size)
        text: str = self.tokenizer.decode(
            req.token_ids, skip_special_tokens=req.skip_special_tokens
        )
        return text

    def _encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": ROLE_NAMES.get(m.role, m.role), "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # a template may reject an order of roles, etc.
            raise BadRequest(
                f"the chat template rejected these messages: {exc}", "messages"
            ) from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def new_state(
        self, req: GenerateRequest, identity: bytes, ids: list[int], arrival: float
    ) -> ReqState:
        state = ReqState(
            prompt_tokens=len(ids),
            rid=req.rid,
            identity=identity,
            stream=req.stream,
            arrival=arrival,
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStrings(req.sampling.stop),
        )
        if req.sampling.logprob_start_len >= 0:
            state.prompt_logprobs = []
        if req.sampling.logprob_start_len == 0:  # the first token: no context, no probability
            text = self._text_of(ids[0])
            state.prompt_logprobs = [TokenLogprob(ids[0], math.nan, [], [], text, [])]
        return state

    # ---- outputs out --------------------------------------------------------------------------

    def on_output(self, state: ReqState, out: ReqOutput) -> OutputStep:
        """Fold one step's tokens into the request; returns chunks and, at the end, the result."""
        now = time.perf_counter()
        gap = None
        first = state.first_token_at is None and bool(out.token_ids)
        if out.token_ids:
            if state.first_token_at is None:
                state.first_token_at = now
            elif state.last_token_at is not None:
                gap = (now - state.last_token_at) / len(out.token_ids)
            state.last_token_at = now
        state.prompt_tokens, state.cached_tokens = out.prompt_tokens, out.cached_tokens
        state.queue_time = out.queue_time
        state.token_ids.extend(out.token_ids)
        logprobs = self._with_texts(out.logprobs) if out.logprobs else None
        if logprobs:
            state.logprobs.extend(logprobs)
        prompt_logprobs = None
        if state.prompt_logprobs is not None and first:  # they come with the first token
            state.prompt_logprobs += self._with_texts(out.prompt_logprobs or [])
            prompt_logprobs = state.prompt_logprobs
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
                        rid=state.rid,
                        text=state.text[state.sent : safe],
                        token_ids=out.token_ids,
                        prompt_tokens=out.prompt_tokens,
                        cached_tokens=out.cached_tokens,
                        logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs,
                    )
                )
                state.sent = max(state.sent, safe)
        if finish is None:
            return OutputStep(replies, finished=False, abort_scheduler=False, token_gap=gap)
        replies.append(self.result(state, finish, now))
        return OutputStep(replies, finished=True, abort_scheduler=state.stopped, token_gap=gap)

    def _with_texts(self, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
        """The entries with each token's own text (a token decoded alone)."""
        return [
            msgspec.structs.replace(
                lp,
                text=self._text_of(lp.token_id),
                top_texts=[self._text_of(t) for t in lp.top_ids],
            )
            for lp in logprobs
        ]

    def _text_of(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

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
            queue_time=state.queue_time,
        )
        return GenerateResult(
            rid=state.rid,
            text=state.text,
            token_ids=list(state.token_ids),
            finish_reason=finish_reason,
            meta=meta,
            logprobs=list(state.logprobs) if state.logprobs else None,
            prompt_logprobs=state.prompt_logprobs,
        )
