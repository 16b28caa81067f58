"""Sessions: a conversation whose requests continue one another in token ids (SGLang's
`open_session`, `close_session` and a generate request's `session_params`).

A request in a session names the earlier request it continues (`rid`); its prompt is that
request's prompt and output, exactly as generated (never re-tokenized from text, so the radix
cache matches all of it), followed by the new input. `offset` keeps only the first `offset` tokens
of that history, `drop_previous_output` only its prompt, and `replace` forgets the requests that
continued `rid` before (aborting any still running). Without `rid` the request starts a new branch
of the session (with `replace`: the session starts over).

Closing a session tells the cache its conversation is over: `close` returns each path the
session's requests cached and how much of it another open session shares, and the endpoint has
the scheduler demote the rest (`RadixCache.demote`: evicted before any other prefix, until used
again). Which conversations are over is what an eviction policy cannot know and what most of LRU's
gap to the offline optimum is made of (docs/cache.md "Sessions").

The store is plain data (no sockets): a client endpoint (one runtime, or a router) owns one.
Requests keep only their own tokens (the history is rebuilt from their parents), so a session
costs memory for what it added, not for every prompt it sent.
"""

from __future__ import annotations

import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from radixkv.frontend.validation import BadRequest
from radixkv.protocol import SessionParams

MAX_SESSIONS = 1024  # open at once (`--max-sessions`)
MAX_SESSION_REQUESTS = 1024  # requests one session remembers
MAX_SESSION_ID_CHARS = 256
# What closing a session may cost the loop: the paths it demotes (its latest branches), and the
# requests it looks at and paths it compares in the other open sessions; past that it demotes
# nothing (the cache's own policy decides, as without sessions).
MAX_DEMOTED_PATHS = 64
MAX_SHARED_WORK = 1 << 22
# Tokens all open sessions may hold (4 bytes each): past it, new requests in sessions are refused
# until sessions are closed.
MAX_SESSION_TOKENS = 1 << 25
LCP_BLOCK = 128

RequestKey = tuple[bytes, str]  # (client identity, client rid)


class SessionError(BadRequest):
    def __init__(self, message: str, param: str = "session_params") -> None:
        super().__init__(message, param)


@dataclass(eq=False, slots=True)
class _Request:
    """One request of a session: the request it continued (`parent`) and how many tokens of
    that one's prompt and output it kept (`cut`), its own new input, and its output once it
    finished."""

    key: RequestKey
    parent: _Request | None
    cut: int
    own: array  # its new input tokens
    output: array | None = None  # None while it runs
    children: list[_Request] = field(default_factory=list)
    whole_children: int = 0  # children that continue all of its prompt and output

    def prompt_ids(self) -> list[int]:
        """Its whole prompt, rebuilt from its ancestors' own tokens and outputs."""
        chain, node = [], self
        while node is not None:
            chain.append(node)
            node = node.parent  # type: ignore[assignment]
        ids: list[int] = []
        for node in reversed(chain):
            del ids[node.cut :]
            ids.extend(node.own)
            if node is not self:
                assert node.output is not None  # only finished requests are continued
                ids.extend(node.output)
        return ids

    def full_ids(self) -> list[int]:
        """Its prompt and output (a finished request's)."""
        assert self.output is not None
        return self.prompt_ids() + self.output.tolist()

    def covered(self) -> bool:
        """Whether a child continues all of its prompt and output (so the child's path has its
        path as a prefix)."""
        return self.whole_children > 0

    def size(self) -> int:
        """Tokens it holds: its own input, and its output once finished."""
        return len(self.own) + (len(self.output) if self.output is not None else 0)

    def length(self) -> int:
        """Tokens of its prompt and output (a finished request's)."""
        assert self.output is not None
        return self.cut + len(self.own) + len(self.output)

    def adopt(self, child: _Request) -> None:
        self.children.append(child)
        self.whole_children += child.cut == self.length()

    def disown(self, child: _Request) -> None:
        if child in self.children:
            self.children.remove(child)
            self.whole_children -= child.cut == self.length()

    def descendants(self) -> list[_Request]:
        out, stack = [], list(self.children)
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children)
        return out


@dataclass(eq=False, slots=True)
class Session:
    id: str
    capacity: int  # most prompt tokens a request of it may have, history included; 0: no cap
    salt: str | None  # the cache salt every request of it uses (the opener's)
    used: float  # the store's clock when it was opened or a request of it started or finished
    requests: dict[str, _Request] = field(default_factory=dict)  # by rid


@dataclass(eq=False, slots=True)
class SessionPrompt:
    """A request's place in its session, checked but not yet recorded (`SessionStore.start`)."""

    session: Session
    parent: _Request | None
    cut: int  # tokens of the parent's prompt and output kept
    own: list[int]  # the request's own input
    ids: list[int]  # its whole prompt: the kept history, then `own`
    replaced: list[_Request]  # what `replace` forgets
    abort: list[RequestKey]  # the running ones among them, for the caller to abort


class SessionStore:
    """The open sessions of one client endpoint."""

    def __init__(
        self, max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_sessions = max_sessions
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.running: dict[RequestKey, tuple[Session, _Request]] = {}
        self.tokens = 0  # held by every request of every open session (own input and output)

    def open(self, session_id: str | None, capacity: int, salt: str | None) -> str:
        """Open a session (a new id when `session_id` is None); raises SessionError."""
        if session_id is None:
            session_id = uuid.uuid4().hex
        elif not 0 < len(session_id) <= MAX_SESSION_ID_CHARS:
            raise SessionError(
                f"a session id has 1 to {MAX_SESSION_ID_CHARS} characters", "session_id"
            )
        if session_id in self.sessions:
            raise SessionError(f"session {session_id!r} is already open", "session_id")
        if capacity < 0:
            raise SessionError(
                f"capacity_of_str_len must be >= 0, got {capacity}", "capacity_of_str_len"
            )
        if len(self.sessions) >= self.max_sessions:
            raise SessionError(
                f"{len(self.sessions)} sessions are open, the most this runtime keeps "
                "(--max-sessions); close one first",
                "session_id",
            )
        self.sessions[session_id] = Session(session_id, capacity, salt, self.clock())
        return session_id

    def close(self, session_id: str, salt: str | None) -> list[tuple[list[int], int]]:
        """Forget a session; (path, shared) for each path its finished requests cached (prompt
        and output; one per branch: a request that a later one continued whole is inside that
        one's path), and how many leading tokens of it a request of another open session has
        too (the cache keeps those). Its running requests run on; raises SessionError."""
        session = self._session(session_id, salt, "session_id")
        del self.sessions[session_id]
        for request in session.requests.values():
            self.running.pop(request.key, None)
            self.tokens -= request.size()
        ends = [r for r in session.requests.values() if r.output is not None and not r.covered()]
        paths = [r.full_ids() for r in ends[-MAX_DEMOTED_PATHS:]]
        return list(zip(paths, self._shared_lens(paths, session.salt), strict=True))

    def expire(self, idle: float) -> list[tuple[str | None, list[tuple[list[int], int]]]]:
        """Close every session unused for `idle` seconds with nothing of it running (a client
        that never closed it), as `close` would; (salt, what `close` returned) for each."""
        now, out = self.clock(), []
        busy = {id(session) for session, _ in self.running.values()}
        for sid, session in list(self.sessions.items()):
            if now - session.used >= idle and id(session) not in busy:
                out.append((session.salt, self.close(sid, session.salt)))
        return out

    def prompt(
        self, params: SessionParams, ids: list[int], salt: str | None, rid: str
    ) -> SessionPrompt:
        """Where request `rid` with input `ids` goes in its session, and its whole prompt;
        checks everything and changes nothing (`start` records it); raises SessionError."""
        session = self._session(params.id, salt)
        parent = None
        if params.rid is not None:
            parent = session.requests.get(params.rid)
            if parent is None:
                raise SessionError(f"session {session.id!r} has no request {params.rid!r}")
            if parent.output is None:
                raise SessionError(
                    f"request {params.rid!r} of session {session.id!r} has not finished; a "
                    "request can continue only a finished one"
                )
        elif params.offset is not None or params.drop_previous_output:
            raise SessionError("offset and drop_previous_output need the rid they apply to")
        history: list[int] = []
        if parent is not None:
            history = parent.full_ids()
            if params.drop_previous_output:
                del history[len(history) - len(parent.output or ()) :]
            if params.offset:  # 0 (as null): the whole history, as in SGLang
                if not 0 < params.offset <= len(history):
                    raise SessionError(
                        f"offset {params.offset} is outside the {len(history)} tokens of request "
                        f"{params.rid!r} of session {session.id!r}"
                    )
                del history[params.offset :]
        prompt = history + ids
        if session.capacity and len(prompt) > session.capacity:
            raise SessionError(
                f"the prompt has {len(prompt)} tokens with the session's history; session "
                f"{session.id!r} was opened with capacity_of_str_len {session.capacity}"
            )
        replaced: list[_Request] = []
        if params.replace:
            replaced = (
                parent.descendants() if parent is not None else list(session.requests.values())
            )
        if rid in session.requests and session.requests[rid] not in replaced:
            raise SessionError(
                f"session {session.id!r} already has a request {rid!r}; request ids in a "
                "session must differ"
            )
        if len(session.requests) - len(replaced) >= MAX_SESSION_REQUESTS:
            raise SessionError(
                f"session {session.id!r} holds {MAX_SESSION_REQUESTS} requests, the most one "
                "may; continue with replace=true or open a new session"
            )
        if self.tokens + len(ids) > MAX_SESSION_TOKENS:
            raise SessionError(
                f"the open sessions hold {self.tokens} tokens, the most this runtime keeps "
                f"({MAX_SESSION_TOKENS}); close sessions first"
            )
        abort = [r.key for r in replaced if r.output is None]
        return SessionPrompt(session, parent, len(history), ids, prompt, replaced, abort)

    def start(self, key: RequestKey, sp: SessionPrompt) -> None:
        """Record request `key`, which `prompt` placed and the backend accepted, in its session
        (in the same loop turn as `prompt`): what `replace` forgets goes now."""
        session = sp.session
        session.used = self.clock()
        for gone in sp.replaced:
            session.requests.pop(gone.key[1], None)
            self.running.pop(gone.key, None)
            self.tokens -= gone.size()
            if gone.parent is not None:
                gone.parent.disown(gone)
        request = _Request(key, sp.parent, sp.cut, array("i", sp.own))
        if sp.parent is not None:
            sp.parent.adopt(request)
        session.requests[key[1]] = request
        self.running[key] = (session, request)
        self.tokens += request.size()

    def finish(self, key: RequestKey, output: list[int]) -> None:
        """A session's request finished with `output`; it can be continued now."""
        entry = self.running.pop(key, None)
        if entry is not None:
            entry[0].used = self.clock()
            entry[1].output = array("i", output)
            self.tokens += len(output)

    def drop(self, key: RequestKey) -> None:
        """A session's request failed: forget it (nothing can continue it)."""
        entry = self.running.pop(key, None)
        if entry is not None:
            session, request = entry
            session.requests.pop(request.key[1], None)
            self.tokens -= request.size()
            if request.parent is not None:
                request.parent.disown(request)

    # ---- helpers ------------------------------------------------------------------------------

    def _session(self, session_id: str, salt: str | None, param: str = "session_params") -> Session:
        """The open session `session_id` of this cache salt (under --isolate-cache-per-key, of
        this API key); another's is answered as if it did not exist."""
        session = self.sessions.get(session_id)
        if session is None or session.salt != salt:
            raise SessionError(
                f"no open session {session_id!r} for this cache_salt and API key", param
            )
        return session

    def _shared_lens(self, paths: list[list[int]], salt: str | None) -> list[int]:
        """For each path, the longest prefix of it that a request of an open session of the same
        cache salt (the same tree keys) has too; each whole path (nothing to demote) when that
        takes more than `MAX_SHARED_WORK` (requests looked at and tokens rebuilt) to find."""
        best = [0] * len(paths)
        work = 0
        for session in self.sessions.values():
            if session.salt != salt:
                continue
            for request in session.requests.values():
                work += 1
                if work > MAX_SHARED_WORK:
                    return [len(p) for p in paths]
                if request.parent is not None:
                    continue  # reached from its branch's first request
                for other in [request, *request.descendants()]:
                    if other.covered():
                        continue  # a child's path holds all of its
                    ids = other.prompt_ids() if other.output is None else other.full_ids()
                    work += len(ids) * len(paths)
                    for i, path in enumerate(paths):
                        best[i] = max(best[i], common_prefix_len(path, ids))
        return best


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share: compared a block at a time from the start (list
    slices compare in C; shared prefixes are usually much shorter than the paths), then token
    by token in the first block that differs."""
    n, i = min(len(a), len(b)), 0
    while i + LCP_BLOCK <= n and a[i : i + LCP_BLOCK] == b[i : i + LCP_BLOCK]:
        i += LCP_BLOCK
    while i < n and a[i] == b[i]:
        i += 1
    return i
