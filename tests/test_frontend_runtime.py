"""The front end over real processes and sockets, with the fake scheduler (tests/fake_scheduler.py):
clients (sync, async, streaming, batches), bad inputs and frames, API key, aborts, disconnects."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
import psutil
import pytest
import zmq

import radixkv
from radixkv.frontend.intake import INLINE_TOKENIZE_CHARS
from radixkv.protocol import (
    MAX_FRAME_BYTES,
    ErrorReply,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    reply_codec,
)

KEY = "s3cret"
FAKE = "fake_scheduler:run_fake_scheduler"


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(scheduler=FAKE, api_key=KEY, start_timeout=60, client_timeout=20) as rt:
        yield rt


@pytest.fixture
def client(rt):
    with radixkv.Client(rt.endpoint, api_key=KEY, timeout=20) as c:
        yield c


def wait_idle(client, aborted_before: int, timeout: float = 5.0) -> radixkv.Stats:
    """Stats once the scheduler has no running request and one more abort was counted."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats.running == 0 and stats.finished.get("abort", 0) > aborted_before:
            return stats
        assert time.monotonic() < deadline, f"request was not aborted: {stats}"
        time.sleep(0.05)


def assert_all_gone(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Every process has exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        assert time.monotonic() < deadline, f"still running: {alive}"
        time.sleep(0.05)


def test_ready_info_and_endpoint(rt):
    assert rt.endpoint.startswith("tcp://127.0.0.1:")
    assert rt.ready_info.max_context_len == 4096 and rt.ready_info.kv_capacity == 8192


def test_generate_text_result_and_accounting(client):
    r = client.generate("Hello 😀 世界", max_new_tokens=12)
    assert isinstance(r, radixkv.Result)
    assert r.text.startswith("Hello 😀 世界Hello") and "\ufffd" not in r.text
    assert r.finish_reason == "length" and r.completion_tokens == len(r.token_ids) == 12
    assert r.prompt_tokens > 0 and r.cached_tokens == r.prompt_tokens // 2
    assert 0 <= r.ttft <= r.latency < 5


def test_batch_is_gathered_in_order(client):
    prompts = [f"prompt number {i}" for i in range(6)]
    results = client.generate(prompts, max_new_tokens=4)
    assert all((p * 2).startswith(r.text) for p, r in zip(prompts, results, strict=True))
    assert [r.text[:8] for r in results] == ["prompt n"] * 6
    assert all(r.completion_tokens == 4 for r in results)


def test_generate_ids_and_chat(client):
    r = client.generate_ids([19556, 905], max_new_tokens=3)
    assert r.token_ids == [19556, 905, 19556] and r.text == "Hello worldHello"
    [a, b] = client.generate_ids([[19556], [905]], max_new_tokens=2)
    assert a.text == "HelloHello" and b.text == " world world"
    chat = client.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert chat.prompt_tokens > 10  # the template's system prompt and role markers were added


def test_stream_yields_text_then_result(client):
    prompt = "Hi 😀 你好 there"
    n = client.generate(prompt, max_new_tokens=1).prompt_tokens
    pieces = list(client.stream(prompt, max_new_tokens=2 * n))  # ends on a whole character
    *chunks, result = pieces
    assert isinstance(result, radixkv.Result) and all(isinstance(c, str) for c in chunks)
    assert len(chunks) > 3 and "".join(chunks) == result.text
    assert all("\ufffd" not in c for c in chunks) and result.text == prompt * 2
    assert list(client.generate("ab", max_new_tokens=2, stream=True))[-1].text == "abab"


def test_stop_string_across_chunks_ends_and_frees_the_request(client):
    before = client.stats().finished.get("abort", 0)
    *chunks, result = client.stream("one two STOP three", max_new_tokens=500, stop="STOP")
    assert result.finish_reason == "stop" and result.text == "one two "
    assert "".join(chunks) == "one two "
    wait_idle(client, before)  # the runtime aborted it at the scheduler


def test_abort_mid_stream_frees_the_request(client):
    before = client.stats().finished.get("abort", 0)
    stream = client.stream("a long story", max_new_tokens=3000)
    assert isinstance(next(stream), str)
    stream.close()
    stats = wait_idle(client, before)
    assert stats.running == 0
    assert client.generate("still fine", max_new_tokens=2).text == "still fine"


def test_client_disconnect_aborts_its_requests(rt, client):
    before = client.stats().finished.get("abort", 0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(rt.endpoint)
    req = GenerateRequest(
        rid="gone", text="x y z", stream=True, api_key=KEY,
        sampling=SamplingParams(max_new_tokens=3000),
    )  # fmt: skip
    sock.send(msgspec.msgpack.encode(req))
    assert isinstance(reply_codec().decode(sock.recv()), TokenChunk)
    sock.close(linger=0)  # no AbortRequest: the runtime must notice the connection closed
    ctx.term()
    wait_idle(client, before)


def test_timeout_raises_and_aborts(client):
    before = client.stats().finished.get("abort", 0)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="no reply from the runtime"):
        client.generate("slow", max_new_tokens=3000, timeout=0.3)
    assert time.monotonic() - t < 2
    wait_idle(client, before)


BAD = [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"prompt": "hi", "max_new_tokens": 5000}, "exceeds the context length 4096"),
    ({"prompt": "hi", "temperature": -1.0}, "temperature must be"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.01}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_k": -3}, "top_k must be -1 or 0"),
]


@pytest.mark.parametrize(("kwargs", "expect"), BAD)
def test_bad_input_errors_that_request_only(client, kwargs, expect):
    prompt = kwargs.pop("prompt")
    with pytest.raises(radixkv.RequestError) as err:
        client.generate(prompt, **kwargs)
    assert expect in str(err.value) and err.value.code == "bad_request"
    assert client.generate("ok", max_new_tokens=1).text == "ok"


def test_large_prompts_are_tokenized_off_the_loop(rt, client):
    """Prompts over INLINE_TOKENIZE_CHARS go through the worker thread: results, refusals,
    aborts and duplicate ids behave as for small ones, and small requests are served meanwhile."""
    big = "word " * 3500  # 17,500 characters, 3,501 tokens
    assert len(big) > INLINE_TOKENIZE_CHARS
    with radixkv.Client(rt.endpoint, api_key=KEY, timeout=20) as other:
        stream = other.stream(big, max_new_tokens=3)
        assert client.generate("small", max_new_tokens=2).text == "smallsmall"
        assert big.startswith("".join(x for x in stream if isinstance(x, str)))
        assert stream.result is not None and stream.result.prompt_tokens == 3501
    with pytest.raises(radixkv.RequestError, match="the context length is 4096") as err:
        client.generate(big * 2, max_new_tokens=1)
    assert err.value.param == "prompt"
    chat = [radixkv.ChatMessage("user", big)]  # templated on the worker too
    assert client.chat(chat, max_new_tokens=1).prompt_tokens > 3501
    aborted = client.stats().finished.get("abort", 0)
    stream = client.stream(big, max_new_tokens=3000)
    stream.close()  # probably still being tokenized: dropped there, or aborted at the scheduler
    assert client.generate("after", max_new_tokens=1).text == "after"
    assert client.stats().running == 0 and client.stats().finished.get("abort", 0) >= aborted


def test_cache_salt_reaches_the_scheduler(client):
    """(The fake reports nothing cached for a salted request; the isolation itself is
    tests/test_scheduler_model.py's.)"""
    prompt = "a salted prompt"
    assert client.generate(prompt, max_new_tokens=1).cached_tokens > 0
    assert client.generate(prompt, max_new_tokens=1, cache_salt="t").cached_tokens == 0
    assert client.complete(prompt, cache_salt="t").cached_tokens == 0
    assert client.stream(prompt, max_new_tokens=2, cache_salt="t").__next__()
    with pytest.raises(radixkv.RequestError, match="cache_salt must be a non-empty") as err:
        client.generate(prompt, cache_salt="")
    assert err.value.param == "cache_salt"


def test_prompt_longer_than_context_and_scheduler_refusal(client):
    with pytest.raises(radixkv.RequestError, match="5000 tokens; the context length is 4096"):
        client.generate_ids([5] * 5000, max_new_tokens=1)
    with pytest.raises(radixkv.RequestError, match="fake: never fits"):
        client.generate_ids([7, 7, 7])  # the fake scheduler refuses this one (ReqError)
    with pytest.raises(radixkv.RequestError, match="prompt 1 of 2: the prompt is empty"):
        client.generate(["fine", ""], max_new_tokens=1)
    with pytest.raises(TypeError, match="unknown sampling argument"):
        client.generate("x", temprature=1.0)


def test_wrong_or_missing_api_key(rt):
    for key in ("wrong", None):
        with radixkv.Client(rt.endpoint, api_key=key, timeout=5) as bad:
            with pytest.raises(radixkv.RequestError, match="API key") as err:
                bad.generate("hi", max_new_tokens=1)
            assert err.value.code == "unauthorized"
            with pytest.raises(radixkv.RequestError, match="API key"):
                bad.stats()


@pytest.fixture
def raw(rt):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(rt.endpoint)
    yield sock
    sock.close(linger=0)
    ctx.term()


def raw_reply(sock, *frames: bytes) -> ErrorReply:
    sock.send_multipart(list(frames))
    reply = reply_codec().decode(sock.recv())
    assert isinstance(reply, ErrorReply)
    return reply


def test_bad_frames_get_error_replies(raw, client):
    enc = msgspec.msgpack.encode
    r = raw_reply(raw, enc({"type": "teleport", "rid": "t1", "api_key": KEY}))
    assert r.rid == "t1" and "malformed or unknown message" in r.message and "teleport" in r.message
    r = raw_reply(raw, b"\xc1\x00garbage")
    assert r.rid == "" and r.code == "bad_request"
    r = raw_reply(raw, enc({"type": "generate", "rid": "t2", "text": 5}))
    assert r.rid == "t2" and "Expected `str | null`" in r.message
    r = raw_reply(raw, b"a", b"b")
    assert "expected one frame per message, got 2" in r.message
    r = raw_reply(raw, b"\x00" * (MAX_FRAME_BYTES + 1))
    assert r.code == "too_large" and str(MAX_FRAME_BYTES) in r.message
    dup = enc(GenerateRequest(rid="d", text="abc", api_key=KEY,
                              sampling=SamplingParams(max_new_tokens=3000)))  # fmt: skip
    raw.send(dup)
    r = raw_reply(raw, dup)
    assert "already in flight" in r.message
    assert client.generate("alive", max_new_tokens=1).text  # still serving


def test_flush_cache_and_stats(client):
    client.flush_cache()
    stream = client.stream("busy", max_new_tokens=3000)
    next(stream)
    with pytest.raises(radixkv.RequestError, match="in flight"):
        client.flush_cache()
    stream.close()
    stats = client.stats()
    assert stats.requests > 0 and 0 < stats.hit_rate <= 0.5


def test_interleaved_streams_on_one_client(client):
    a = client.stream([19556], max_new_tokens=3)
    b = client.stream([905], max_new_tokens=3)
    assert next(b) == " world" and next(a) == "Hello"
    assert list(a)[-1].text == "HelloHelloHello" and list(b)[-1].text == " world world world"


def test_async_client(rt):
    async def main():
        async with radixkv.AsyncClient(rt.endpoint, api_key=KEY, timeout=20) as ac:
            one, many = await asyncio.gather(
                ac.generate("async 😀", max_new_tokens=4),
                ac.generate(["x1", "y2", "z3"], max_new_tokens=2),
            )
            pieces = [p async for p in await ac.stream("s t r e a m", max_new_tokens=8)]
            chat = await ac.chat([{"role": "user", "content": "hi"}], max_new_tokens=1)
            with pytest.raises(radixkv.RequestError, match="top_p"):
                await ac.generate("x", top_p=2.0)
            stats = await ac.stats()
            return one, many, pieces, chat, stats

    one, many, pieces, chat, stats = asyncio.run(main())
    assert one.completion_tokens == 4 and [r.text for r in many] == ["x1", "y2", "z3"]
    assert "".join(pieces[:-1]) == pieces[-1].text and pieces[-1].completion_tokens == 8
    assert chat.prompt_tokens > 10 and stats.requests > 0


def test_shutdown_leaves_no_process_or_socket(rt):
    runtime = psutil.Process(rt.process.pid)
    children = runtime.children(recursive=True)
    assert children, "the scheduler child should be running"
    ipc_dirs = {c.laddr for c in runtime.net_connections(kind="unix") if c.laddr}
    rt.shutdown()
    assert rt.process.returncode == 0
    assert_all_gone([runtime, *children])

    assert ipc_dirs and not any(os.path.exists(path) for path in ipc_dirs)
