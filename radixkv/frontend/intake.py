"""What a client endpoint does with a generate, tokenize or detokenize request before its backend
sees it: the TokenizerManager templates, tokenizes and validates it once (a prompt larger than
`INLINE_TOKENIZE_CHARS` on a worker thread, so that it does not hold up everyone else's tokens),
and a refusal names the field at fault. `GenerateIntake` is a part of `endpoint.ClientEndpoint`,
kept in its own file; the runtime and the router both validate through it, so a router refuses
bad input exactly as one runtime does.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec

from radixkv.config import ServerArgs
from radixkv.frontend.loop_worker import LoopWorker
from radixkv.frontend.sessions import SessionStore
from radixkv.frontend.tokenizer_manager import TokenizerManager
from radixkv.frontend.validation import (
    BadRequest,
    check_fits_context,
    check_logprob_start,
    check_token_ids,
)
from radixkv.protocol import (
    CloseSessionRequest,
    DemoteRequest,
    DetokenizeReply,
    DetokenizeRequest,
    GenerateRequest,
    OpenSessionRequest,
    SessionReply,
    TokenizeReply,
    TokenizeRequest,
    key_cache_salt,
)

# A prompt larger than this (characters, see TokenizerManager.prompt_size) is templated and
# tokenized on a worker thread: the fast tokenizer releases the GIL (bench/loop_stall.py
# measures the difference).
INLINE_TOKENIZE_CHARS = 16_384


class GenerateIntake(abc.ABC):
    # provided by ClientEndpoint
    args: ServerArgs
    tm: TokenizerManager | None
    dead: str | None
    drain_deadline: float | None
    tokenizing: dict[tuple[bytes, str], float]
    worker: LoopWorker
    metrics: Any
    gateway_key: str | None
    _reply: Callable[[bytes, msgspec.Struct], None]
    _error: Callable[..., None]
    _refusing: Callable[[], str | None]
    sessions: SessionStore

    @abc.abstractmethod
    def _admit(self, identity: bytes, msg: GenerateRequest, ids: list[int], arrival: float) -> None:
        """A validated request with its token ids: hand it to the backend."""

    @abc.abstractmethod
    def _has_request(self, key: tuple[bytes, str]) -> bool:
        """Whether (identity, client rid) is in flight in the backend."""

    @abc.abstractmethod
    def _abort(self, identity: bytes, client_rid: str) -> None:
        """The client aborted its request `client_rid`."""

    @abc.abstractmethod
    def _demote(self, paths: list[list[int]], shared: list[int], salt: str | None) -> None:
        """Tell the cache(s) these paths (token ids, cached under `salt`), past their first
        `shared` tokens, are needed by no one (a closed session's)."""

    def _on_tokenize(self, identity: bytes, msg: TokenizeRequest | DetokenizeRequest) -> None:
        """Answered here: the tokenizer is this process's, the backend is not needed."""
        assert self.tm is not None
        try:
            if isinstance(msg, TokenizeRequest):
                ids = self.tm.tokenize_only(msg)
                context = self.tm.max_context_len
                self._reply(
                    identity, TokenizeReply(rid=msg.rid, token_ids=ids, max_context_len=context)
                )
            else:
                self._reply(identity, DetokenizeReply(rid=msg.rid, text=self.tm.detokenize(msg)))
        except BadRequest as exc:
            self._error(identity, msg.rid, str(exc), param=exc.param)

    def _on_generate(self, identity: bytes, msg: GenerateRequest) -> None:
        assert self.tm is not None
        if self.dead is not None:
            self._error(identity, msg.rid, self.dead, "internal")
            return
        if self.drain_deadline is not None:
            self._error(identity, msg.rid, self._refusing() or "", "unavailable")
            return
        if not msg.rid:
            self._error(identity, "", "a generate request needs a non-empty rid")
            return
        key = (identity, msg.rid)
        if self._has_request(key) or key in self.tokenizing:
            self._error(identity, msg.rid, f"request id {msg.rid!r} is already in flight")
            return
        arrival = time.perf_counter()
        if self.tm.prompt_size(msg) > INLINE_TOKENIZE_CHARS:
            self.tokenizing[key] = arrival
            tm = self.tm
            self.worker.submit(
                lambda: tm.tokenize(msg), lambda done: self._tokenized(identity, msg, done)
            )
            return
        try:
            ids = self.tm.tokenize(msg)
        except BadRequest as exc:
            self._refuse(identity, msg.rid, exc)
            return
        self._admit_tokenized(identity, msg, ids, arrival)

    def _tokenized(self, identity: bytes, msg: GenerateRequest, done: Future[list[int]]) -> None:
        """A worker finished tokenizing a large prompt (called on the loop)."""
        arrival = self.tokenizing.pop((identity, msg.rid), None)
        if arrival is None:
            return  # aborted, or its client left, meanwhile
        if self.dead is not None:
            self._error(identity, msg.rid, self.dead, "internal")
            return
        try:
            ids = done.result()
        except BadRequest as exc:
            self._refuse(identity, msg.rid, exc)
            return
        self._admit_tokenized(identity, msg, ids, arrival)

    def _admit_tokenized(
        self, identity: bytes, msg: GenerateRequest, ids: list[int], arrival: float
    ) -> None:
        """Admit a tokenized request; in a session, its prompt continues the session's history
        (checked again as a whole), and the session records it once the backend took it."""
        assert self.tm is not None
        if msg.session is None:
            self._admit(identity, msg, ids, arrival)
            return
        key = (identity, msg.rid)
        try:
            continues = msg.session.rid is not None
            if continues and msg.messages is not None:
                raise BadRequest(
                    "a request that continues a session takes its new turn as text or input_ids, "
                    "exactly as the model should see it after the history; chat messages would be "
                    "templated as a conversation of their own (a system prompt and all)",
                    "messages",
                )
            if continues and self.tm.adds_bos and ids and ids[0] == self.tm.bos_token_id:
                ids = ids[1:]  # the history already starts with it
            sp = self.sessions.prompt(msg.session, ids, self._cache_salt(msg), msg.rid)
            check_logprob_start(msg.sampling, len(sp.ids))
            check_fits_context(len(sp.ids), msg.sampling.max_new_tokens, self.tm.max_context_len)
        except BadRequest as exc:
            self._refuse(identity, msg.rid, exc)
            return
        self._admit(identity, msg, sp.ids, arrival)
        if self._has_request(key):  # (the backend may refuse it at once)
            self.sessions.start(key, sp)
            for gone in sp.abort:  # `replace` forgot them
                self._abort(*gone)

    def _on_session(
        self, identity: bytes, msg: OpenSessionRequest | CloseSessionRequest | DemoteRequest
    ) -> None:
        """Open or close a session (a closed one's paths are demoted in the cache), or demote
        paths a router's closed session left here."""
        assert self.tm is not None
        salt = self._cache_salt(msg)
        try:
            if isinstance(msg, DemoteRequest):
                if len(msg.paths) != len(msg.shared):
                    raise BadRequest("paths and shared differ in length", "shared")
                for path in msg.paths:
                    check_token_ids(path, self.tm.vocab_size)
                self._demote(msg.paths, list(msg.shared), salt)
                return
            if isinstance(msg, OpenSessionRequest):
                sid = self.sessions.open(msg.session_id, msg.capacity_of_str_len, salt)
            else:
                closed = self.sessions.close(msg.session_id, salt)
                sid = msg.session_id
                if closed:
                    self._demote([p for p, _ in closed], [n for _, n in closed], salt)
        except BadRequest as exc:
            self._error(identity, msg.rid, str(exc), param=exc.param)
            return
        self._reply(identity, SessionReply(rid=msg.rid, session_id=sid))

    def _drop_tokenizing(self, key: tuple[bytes, str]) -> float | None:
        """Abort a request a worker is tokenizing: its result will be dropped."""
        arrival = self.tokenizing.pop(key, None)
        if arrival is not None and self.metrics is not None:
            self.metrics.observe_end("abort")  # it never reached the backend: counted here
        return arrival

    def _refuse(self, identity: bytes, rid: str, exc: BadRequest) -> None:
        self._error(identity, rid, str(exc), param=exc.param)
        if self.metrics is not None:
            self.metrics.observe_end("error")

    def _cache_salt(self, msg: Any) -> str | None:
        """The request's salt, keyed by its API key under --isolate-cache-per-key (the HTTP
        gateway's requests arrive salted by their caller's key already)."""
        if self.args.isolate_cache_per_key and msg.api_key != self.gateway_key:
            assert msg.api_key is not None  # checked on arrival
            return key_cache_salt(msg.api_key, msg.cache_salt)
        return msg.cache_salt

    def _fail_tokenizing(self, message: str, code: str) -> None:
        for identity, client_rid in self.tokenizing:
            self._error(identity, client_rid, message, code)
        self.tokenizing.clear()


def salvage_rid(payload: bytes) -> str:
    """The rid of a message that failed validation, if it is a map with a string rid."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return ""
    rid = raw.get("rid") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else ""
