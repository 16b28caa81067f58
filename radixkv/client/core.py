"""What `Client` and `AsyncClient` share: the public API, building requests, reading replies.

`ClientAPI` writes every public method once. A method turns its arguments into a `Call` (the
`GenerateRequest`s to send, whether they are a batch, whether to stream) and hands it to the
transport's `_run`; the sync client runs it and returns the value, the async client returns a
coroutine of it. Only sending, waiting and aborting differ between the two.
"""

from __future__ import annotations

import abc
import itertools
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from radixkv.client.results import Lost, RequestError, Result, reply_error
from radixkv.protocol import (
    MAX_FRAME_BYTES,
    AbortRequest,
    ChatMessage,
    CloseSessionRequest,
    DetokenizeReply,
    DetokenizeRequest,
    ErrorReply,
    FlushCacheRequest,
    FlushReply,
    GenerateRequest,
    GenerateResult,
    GetServerInfoRequest,
    GetStatsRequest,
    OpenSessionRequest,
    Ready,
    SamplingParams,
    ServerInfoReply,
    SessionParams,
    SessionReply,
    Stats,
    StatsReply,
    TokenChunk,
    TokenizeReply,
    TokenizeRequest,
    reply_codec,
)

SAMPLING_FIELDS = tuple(SamplingParams.__struct_fields__)
DEFAULT_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 10.0  # a call fails this soon when no connection to the runtime exists
Message: TypeAlias = "ChatMessage | Mapping[str, str]"
Prompt: TypeAlias = "str | list[int] | list[Message]"  # text, token ids or chat messages


def make_sampling(params: SamplingParams | None, kwargs: dict[str, Any]) -> SamplingParams:
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
        return msgspec.convert(kwargs, SamplingParams)
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


def prompt_fields(prompt: Prompt) -> dict[str, Any]:
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


def _is_batch(items: Sequence[Any]) -> bool:
    return bool(items) and isinstance(items[0], (list, tuple))


@dataclass(frozen=True, slots=True)
class Call:
    """What one public call asks for: the prompts' request fields, sent at once."""

    prompts: list[dict[str, Any]]
    sampling: SamplingParams
    batch: bool  # a list of results (or streams) rather than one
    stream: bool
    timeout: float | None
    cache_salt: str | None = None  # share cached KV only with requests of the same salt
    session: SessionParams | None = None  # every prompt continues this session
    rid: str | None = None  # the request id of a single prompt (default: a new one)

    def context(self, index: int) -> str:
        """How an error of prompt `index` is introduced ("" for a single prompt)."""
        return f"prompt {index} of {len(self.prompts)}" if self.batch else ""


class ClientAPI(abc.ABC):
    """The public API of both clients, written once over the transport's `_run` and `_control`.

    `generate`, `generate_ids` and `chat` take one prompt (-> Result) or a list of them (-> a list
    of Results, sent at once so the scheduler batches them); with `stream=True`, a Stream (or a
    list of Streams) of text chunks, then the Result. `timeout` (seconds, None = forever) bounds
    the wait for a result, or for the next chunk of a stream; on expiry the request is aborted and
    TimeoutError raised. The async client returns awaitables of the same values.
    `cache_salt="..."` (any call) isolates the request's cached KV: it shares cached prefixes only
    with requests that carry the same salt (vLLM's `cache_salt`; docs/api.md).
    `session={"id": ..., "rid": ...}` (any call; `SessionParams`) continues request `rid` of a
    session opened with `open_session`: the prompt is that request's prompt and output, then the
    new input (`Result.rid` is a request's id; docs/api.md "Sessions").
    """

    endpoint: str
    api_key: str | None
    timeout: float | None

    def _init_core(
        self,
        endpoint: str,
        api_key: str | None,
        timeout: float | None,
        connect_timeout: float,
        ctx: Any,
    ) -> None:
        """Set the public attributes and connect a DEALER socket of `ctx` (a zmq or zmq.asyncio
        context) to the runtime, with a monitor that reports its connection and disconnection (so
        that waiting calls fail with ConnectionLost instead of hanging: at once when the
        connection closes, after `connect_timeout` seconds when none can be made)."""
        self.endpoint = endpoint
        self.api_key = api_key
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connected = False
        # while not connected: when the calls waiting now fail (set by each call sent meanwhile)
        self._connect_deadline: float | None = None
        self._codec = reply_codec()
        self._encoder = msgspec.msgpack.Encoder()
        self._ids = itertools.count()
        self._tag = secrets.token_hex(4)  # request ids differ between clients (sessions keep them)
        self._pending: dict[str, Any] = {}  # rid -> the replies not yet taken (a queue)
        self._ctx = ctx
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._sock.connect(endpoint)
        self._closed = False

    def _sending(self) -> None:
        """A call is being sent: without a connection, it may wait `connect_timeout` for one."""
        if not self._connected:
            self._connect_deadline = time.monotonic() + self.connect_timeout

    def _on_monitor_event(self, frames: list[bytes]) -> bool:
        """Track the connection; True when it closed (every waiting call has lost its reply)."""
        if parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._connected, self._connect_deadline = True, None
            return False
        self._connected = False
        return True

    def _connect_overdue(self) -> bool:
        """No connection, and the calls waiting for one have waited `connect_timeout`."""
        deadline = self._connect_deadline
        return not self._connected and deadline is not None and time.monotonic() >= deadline

    def _close_sockets(self) -> None:
        self._closed = True
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close()
        self._ctx.term()

    # ---- public API ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        stream: bool = False,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Complete a prompt or a list of prompts (see the class docstring)."""
        if isinstance(prompt, str):
            return self._run(
                self._call([{"text": prompt}], False, stream, params, sampling, timeout)
            )
        prompts = [{"text": p} for p in prompt]
        return self._run(self._call(prompts, True, stream, params, sampling, timeout))

    def generate_ids(
        self,
        input_ids: Sequence[int] | Sequence[Sequence[int]],
        *,
        stream: bool = False,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Like `generate`, from token ids (one list, or a list of lists for a batch)."""
        batch = _is_batch(input_ids)
        seqs = input_ids if batch else [input_ids]
        prompts = [{"input_ids": list(ids)} for ids in seqs]  # type: ignore[arg-type]
        return self._run(self._call(prompts, batch, stream, params, sampling, timeout))

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        *,
        stream: bool = False,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Like `generate`, from chat messages ({"role", "content"}) templated by the runtime;
        a list of conversations is a batch."""
        batch = _is_batch(messages)
        convs = messages if batch else [messages]
        prompts = [{"messages": to_messages(conv)} for conv in convs]  # type: ignore[arg-type]
        return self._run(self._call(prompts, batch, stream, params, sampling, timeout))

    def stream(
        self,
        prompt: Prompt,
        *,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Any:
        """Stream one prompt (text, token ids or chat messages): text chunks, then the Result.
        (`cache_salt=` here and in every call: see the class docstring.)"""
        call = self._call([prompt_fields(prompt)], False, True, params, sampling, timeout)
        return self._run(call)

    def complete(
        self,
        prompt: Prompt,
        *,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        cache_salt: str | None = None,
        session: SessionParams | Mapping[str, Any] | None = None,
        rid: str | None = None,
    ) -> Any:
        """One Result for a prompt of any kind (text, token ids or chat messages), sent as
        request `rid` when given."""
        extra = {"cache_salt": cache_salt, "session": session, "rid": rid}
        call = self._call([prompt_fields(prompt)], False, False, params, extra, timeout)
        return self._run(call)

    def open_session(
        self,
        session_id: str | None = None,
        *,
        capacity_of_str_len: int = 0,
        cache_salt: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Open a session (SGLang's `open_session`); its id (a new one when `session_id` is
        None). `capacity_of_str_len` caps its prompts, history included, in tokens (0: the
        context length). Its requests must carry the same `cache_salt`."""
        fields = {"session_id": session_id, "capacity_of_str_len": capacity_of_str_len,
                  "cache_salt": cache_salt}  # fmt: skip
        control = Control(OpenSessionRequest, fields, _session_id)
        return self._control(control, self._timeout(timeout))

    def close_session(
        self, session_id: str, *, cache_salt: str | None = None, timeout: float | None = None
    ) -> Any:
        """Close a session: its requests can no longer be continued, and the cache evicts the
        prefixes only it used before any other (what still runs finishes)."""
        fields = {"session_id": session_id, "cache_salt": cache_salt}
        control = Control(CloseSessionRequest, fields, _session_id)
        return self._control(control, self._timeout(timeout))

    def stats(self, timeout: float | None = None) -> Any:
        """The scheduler's counters and gauges (`Stats.hit_rate` = cached / prompt tokens)."""
        return self._control(Control(GetStatsRequest, {}, _stats_of), self._timeout(timeout))

    def server_info(self, timeout: float | None = None) -> Any:
        """What the runtime serves (`Ready`: model, KV capacity in tokens, page size, context
        length, dtype, EOS ids, and where it publishes cache events, if it does)."""
        control = Control(GetServerInfoRequest, {}, _ready_of)
        return self._control(control, self._timeout(timeout))

    def flush_cache(self, timeout: float | None = None) -> Any:
        """Empty the radix cache; raises RequestError while requests are in flight."""
        return self._control(Control(FlushCacheRequest, {}, _flushed), self._timeout(timeout))

    def tokenize(
        self,
        prompt: str | Sequence[Message],
        *,
        add_special_tokens: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """The token ids the runtime makes of a text, or of chat messages templated as for
        `chat` (with the generation prompt)."""
        if isinstance(prompt, str):
            fields = {"text": prompt, "add_special_tokens": add_special_tokens}
        else:
            fields = {"messages": to_messages(prompt)}
        return self._control(Control(TokenizeRequest, fields, _token_ids), self._timeout(timeout))

    def detokenize(
        self,
        token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The text of token ids."""
        fields = {"token_ids": list(token_ids), "skip_special_tokens": skip_special_tokens}
        return self._control(Control(DetokenizeRequest, fields, _text), self._timeout(timeout))

    # ---- what the transports use --------------------------------------------------------------

    def _call(
        self,
        prompts: list[dict[str, Any]],
        batch: bool,
        stream: bool,
        params: SamplingParams | None,
        sampling: dict[str, Any],
        timeout: float | None,
    ) -> Call:
        salt = sampling.pop("cache_salt", None)
        session, rid = sampling.pop("session", None), sampling.pop("rid", None)
        if session is not None and not isinstance(session, SessionParams):
            try:
                session = msgspec.convert(session, SessionParams)
            except msgspec.ValidationError as exc:
                raise TypeError(f"bad session argument: {exc}") from exc
        if rid is not None and (batch or not isinstance(rid, str) or not rid):
            raise TypeError("rid= names the one request of a single prompt: a non-empty string")
        sp = make_sampling(params, sampling)
        return Call(prompts, sp, batch, stream, self._timeout(timeout), salt, session, rid)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _requests(self, call: Call) -> list[tuple[str, bytes]]:
        """(rid, frame) of every prompt, all encoded before any is sent: what the runtime would
        refuse as too large is refused here, and then nothing of the call was sent."""
        out = []
        for fields in call.prompts:
            rid = call.rid or f"r{next(self._ids)}-{self._tag}"
            request = GenerateRequest(
                rid=rid, sampling=call.sampling, stream=call.stream, api_key=self.api_key,
                cache_salt=call.cache_salt, session=call.session, **fields,
            )  # fmt: skip
            frame = self._encoder.encode(request)
            if len(frame) > MAX_FRAME_BYTES:
                raise RequestError(
                    f"the request is {len(frame)} bytes; the runtime accepts at most "
                    f"{MAX_FRAME_BYTES}",
                    "too_large",
                    rid,
                    "prompt",
                )
            out.append((rid, frame))
        return out

    def _reserve(self, rid: str, queue: Any) -> None:
        """Register the reply queue of request `rid`; a rid already in flight is refused (it
        would take that request's replies: a caller-chosen rid, e.g. through the HTTP gateway's
        one client, must never reach another caller's request). Internal rids carry this
        client's random tag, so a caller cannot guess them."""
        if rid in self._pending:
            raise RequestError(f"request id {rid!r} is already in flight", "bad_request", rid,
                               "rid")  # fmt: skip
        self._pending[rid] = queue

    def _control_request(self, control: Control) -> tuple[str, bytes]:
        rid = f"c{next(self._ids)}-{self._tag}"
        return rid, self._encoder.encode(
            control.kind(rid=rid, api_key=self.api_key, **control.fields)
        )

    def _abort_frame(self, rid: str) -> bytes:
        return self._encoder.encode(AbortRequest(rid=rid, api_key=self.api_key))

    def _decode(self, frame: bytes) -> Any:
        """A reply, or None for a frame that does not decode (dropped)."""
        try:
            return self._codec.decode(frame)
        except (msgspec.DecodeError, ValueError):
            return None

    def _failure(self, reply: Any, context: str = "") -> Exception:
        return reply_error(reply, self.endpoint, context)

    def _settled(self, rid: str, reply: Any) -> Any:
        """`reply`, forgetting request `rid` if it ended it (a result or an error)."""
        if is_final(reply):
            self._pending.pop(rid, None)
        return reply

    def _result(self, reply: Any, call: Call, index: int) -> Result:
        """The Result of prompt `index` from its final reply; raises the request's error."""
        if not isinstance(reply, GenerateResult):
            raise self._failure(reply, call.context(index))
        return Result.from_reply(reply)

    def _control_result(self, control: Control, reply: Any) -> Any:
        if isinstance(reply, (ErrorReply, Lost)):
            raise self._failure(reply)
        return control.finish(reply)

    def _no_reply(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"no reply from the runtime at {self.endpoint} within {timeout} s; is it running? "
            "(raise the client's timeout for long generations)"
        )

    @abc.abstractmethod
    def _run(self, call: Call) -> Any:
        """Send the call's requests at once; its Result(s) or Stream(s) (the async client: an
        awaitable of them)."""

    @abc.abstractmethod
    def _control(self, control: Control, timeout: float | None) -> Any:
        """Send a control request; `control.finish(reply)` of its reply (the async client: an
        awaitable of it)."""


def is_final(reply: Any) -> bool:
    """Whether `reply` ends its request (a result or an error, not a chunk)."""
    return not isinstance(reply, TokenChunk)


@dataclass(frozen=True, slots=True)
class Control:
    """A request answered by the runtime at once (no generation): what to send, and how its
    reply becomes the call's value (`finish` raises on a reply of the wrong kind)."""

    kind: type[msgspec.Struct]
    fields: dict[str, Any]
    finish: Callable[[Any], Any]


def _expect(reply: Any, kind: type) -> Any:
    if not isinstance(reply, kind):
        raise RequestError(f"unexpected reply {type(reply).__name__}", "internal")
    return reply


def _stats_of(reply: Any) -> Stats:
    return _expect(reply, StatsReply).stats


def _ready_of(reply: Any) -> Ready:
    return _expect(reply, ServerInfoReply).ready


def _token_ids(reply: Any) -> list[int]:
    ids: list[int] = _expect(reply, TokenizeReply).token_ids
    return ids


def _text(reply: Any) -> str:
    text: str = _expect(reply, DetokenizeReply).text
    return text


def _session_id(reply: Any) -> str:
    sid: str = _expect(reply, SessionReply).session_id
    return sid


def _flushed(reply: Any) -> None:
    if not _expect(reply, FlushReply).ok:
        raise RequestError(f"cannot flush the cache: {reply.message}", "bad_request")
