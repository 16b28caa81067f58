"""Nothing a client sends can stop the runtime: random bytes over plain TCP and random msgpack
structures over ZMQ, thrown at a live runtime (fake scheduler), which must still serve afterwards.

The corpus starts with the payloads that once killed it: 8 bytes of ZMTP/1.0 framing and random
bytes (whose frames have no source fd), and msgpack nested 100,000 levels deep (RecursionError).
"""

from __future__ import annotations

import json
import os
import socket
import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import radixkv
from radixkv.protocol import ErrorReply, reply_codec

KEY = "s3cret"
FAKE = "fake_scheduler:run_fake_scheduler"
DEEP = b"\x91" * 100_000 + b"\xc0"
CORPUS_TCP = [bytes.fromhex("0100050061626364"), os.urandom(4096), b"\xff" * 10 + b"\x7f", DEEP]
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(scheduler=FAKE, api_key=KEY, start_timeout=60, client_timeout=20) as rt:
        yield rt


@pytest.fixture(scope="module")
def dealer(rt):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(rt.endpoint)
    yield sock
    sock.close(linger=0)
    ctx.term()


def tcp_address(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def send_raw(address: tuple[str, int], payload: bytes) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.settimeout(0.2)
            sock.recv(64)  # whatever the greeting or the close is; we only need it delivered
        except OSError:
            pass  # the runtime dropped a peer that speaks no ZMTP: that is allowed


def assert_serves(rt) -> None:
    assert rt.process.poll() is None, "the runtime process exited"
    with radixkv.Client(rt.endpoint, api_key=KEY, timeout=20) as c:
        assert c.generate("still here", max_new_tokens=2).completion_tokens == 2


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
msgpack_values = st.recursive(
    scalars | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = ["type", "rid", "api_key", "text", "input_ids", "messages", "sampling", "stream"]
requestish = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "abort", "tokenize", "detokenize", "stats", "flush"])},
    optional={name: msgpack_values for name in FIELDS[1:]},
).map(lambda d: {**d, "api_key": d.get("api_key", KEY)})


def test_tcp_corpus_then_still_serving(rt):
    address = tcp_address(rt.endpoint)
    for payload in CORPUS_TCP:
        send_raw(address, payload)
    assert_serves(rt)


@FUZZ
@given(payload=st.binary(min_size=1, max_size=2048))
def test_random_tcp_bytes(rt, payload):
    send_raw(tcp_address(rt.endpoint), payload)


def reply_to(dealer, frame: bytes) -> None:
    """Every message that is not an abort gets exactly one reply; it must decode."""
    dealer.send(frame)
    message = msgspec.msgpack.decode(frame) if frame != DEEP else None
    if isinstance(message, dict) and message.get("type") == "abort":
        return
    reply = reply_codec().decode(dealer.recv())
    if isinstance(reply, ErrorReply):
        assert reply.code in ("bad_request", "too_large", "unauthorized"), reply
    else:  # a request that happened to be valid: drain what it streams
        while not getattr(reply, "finish_reason", "x") and dealer.poll(2000):
            reply = reply_codec().decode(dealer.recv())


def test_deep_msgpack_is_refused(dealer, rt):
    reply_to(dealer, DEEP)
    request = msgspec.msgpack.encode({"type": "generate", "rid": "r", "api_key": KEY})
    assert request[0] == 0x83  # a map of 3: make it 4, the 4th an unknown field nested deep
    dealer.send(b"\x84" + request[1:] + b"\xa1x" + DEEP)
    reply = reply_codec().decode(dealer.recv())
    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    assert_serves(rt)


@FUZZ
@given(message=msgpack_values | requestish)
def test_random_msgpack_messages(dealer, message):
    try:
        frame = msgspec.msgpack.encode(message)
    except (TypeError, OverflowError):
        return  # not encodable as msgpack (an integer over 64 bits): nothing to send
    reply_to(dealer, frame)


def test_still_serving_after_the_fuzz(rt, dealer):
    time.sleep(0.2)
    assert_serves(rt)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
HTTP_FIELDS = [
    "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop",
    "stream", "seed", "logprobs", "top_logprobs", "logit_bias", "response_format", "tools",
    "tool_choice", "best_of", "echo", "min_tokens", "stop_token_ids", "cache_salt", "text",
    "input_ids", "sampling_params", "return_logprob", "tokens", "regex", "json_schema",
]  # fmt: skip
http_bodies = (
    st.fixed_dictionaries({}, optional={name: json_values for name in HTTP_FIELDS}) | json_values
)


@pytest.fixture(scope="module")
def http_rt():
    with radixkv.Runtime(scheduler=FAKE, http_port=0, start_timeout=60) as rt:
        yield rt


BASES = {  # a valid body per endpoint, which the fuzz then breaks a field or two of
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}


@FUZZ
@given(
    path=st.sampled_from(sorted(BASES)),
    body=http_bodies,
    replace=st.booleans(),
)
def test_random_http_bodies_are_never_a_server_error(http_rt, path, body, replace):
    """Random JSON, or a valid body with random values in known fields: a 4xx or a 200."""
    import httpx2 as httpx

    if not replace and isinstance(body, dict):
        body = {**BASES[path], **body}
    try:
        content = json.dumps(body)
    except (ValueError, OverflowError):
        return
    r = httpx.post(f"{http_rt.http_url}{path}", content=content, timeout=30,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code < 500, (r.status_code, r.text[:300])
