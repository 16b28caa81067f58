"""The HTTP server over plain HTTP with the fake scheduler (tests/fake_scheduler.py, which echoes
the prompt): auth, validation and OpenAI-style errors, body limits, disconnects that abort, the
native endpoints, start-up errors and shutdown."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import radixkv
from radixkv.tools.cli import build_parser
from radixkv.tools.flags import server_args

KEY = "s3cret"
FAKE = "fake_scheduler:run_fake_scheduler"
LONG = 4000  # tokens: ~16 s at the fake's 4 ms per step, far longer than any test waits


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(
        scheduler=FAKE,
        api_key=KEY,
        http_port=0,
        start_timeout=60,
        client_timeout=20,
        stream_stall_timeout=1.0,
    ) as rt:
        yield rt


@pytest.fixture
def http(rt):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=rt.http_url, headers=headers, timeout=20) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error object of a response that must have this status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    return error


def finished(client: radixkv.Client, reason: str) -> int:
    return client.stats().finished.get(reason, 0)


def wait_aborted(client: radixkv.Client, before: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while finished(client, "abort") <= before or client.stats().running:
        assert time.monotonic() < deadline, f"the request was not aborted: {client.stats()}"
        time.sleep(0.05)


def test_binds_loopback_and_lists_the_model(rt, http):
    assert rt.http_url.startswith("http://127.0.0.1:")
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
    assert models["data"][0]["max_model_len"] == 4096


def test_api_key_required_except_health(rt, http):
    assert httpx.get(f"{rt.http_url}/health").json()["status"] == "ok"
    wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
             {"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")})  # fmt: skip
    for headers in wrong:
        r = httpx.post(f"{rt.http_url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert error_of(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert error_of(httpx.get(f"{rt.http_url}/metrics"), 401)["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, "model"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "hi", "max_tokens": 100_000}, "prompt"),  # prompt + max_tokens > context
        ({"prompt": [1, 2, 99_999_999]}, "prompt"),  # outside the vocabulary
        # integers beyond 64 bits once reached the scheduler channel and came back as a 500
        ({"prompt": "hi", "max_tokens": 10**30}, "max_tokens"),
        ({"prompt": [1, 10**30]}, "prompt"),
        ({"prompt": "hi", "logit_bias": {str(10**30): 1}}, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [-(10**30)]}, "stop_token_ids"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_bodies_are_400(http, body, param):
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]}, "tools"),
    ],
)
def test_bad_chat_bodies_are_400(http, body, param):
    assert error_of(http.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_not_json_unknown_route_wrong_method(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "x"})
    assert error_of(r, 400)["code"] == "invalid_json"
    assert error_of(http.get("/v2/nothing"), 404)["code"] == "not_found"
    error_of(http.get("/v1/completions"), 405)


def test_oversized_bodies_are_413_with_or_without_a_length(http):
    big = json.dumps({"prompt": "x" * (9 * 2**20)}).encode()
    assert error_of(http.post("/v1/completions", content=big), 413)["code"] == "body_too_large"

    def chunks():
        for i in range(0, len(big), 2**20):
            yield big[i : i + 2**20]

    assert error_of(http.post("/v1/completions", content=chunks()), 413)["code"]


def test_deep_or_huge_values_anywhere_are_400(http):
    deep = "[" * 100_000 + "]" * 100_000
    huge = "1" + "0" * 30
    for path, body in [
        ("/v1/completions", '{"prompt": "hi", "user": ' + deep + "}"),
        ("/v1/chat/completions", '{"messages": ' + deep + "}"),
        ("/generate", '{"text": "hi", "sampling_params": {"max_new_tokens": ' + huge + "}}"),
        ("/generate", '{"input_ids": [1, -' + huge + "]}"),
    ]:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert error_of(r, 400)["type"] == "invalid_request_error"


def test_oversized_headers_are_refused(rt):
    host, _, port = rt.http_url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        status = sock.recv(200).split(b"\r\n")[0]
    assert status.split()[1] in (b"400", b"431"), status
    assert httpx.get(f"{rt.http_url}/health").status_code == 200  # and it goes on serving


def test_explicit_nulls_mean_the_defaults(http):
    names = ("temperature", "top_p", "top_k", "n", "stream", "seed", "stop",
             "presence_penalty", "frequency_penalty", "echo", "logprobs")  # fmt: skip
    nulls = dict.fromkeys(names)
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    del nulls["echo"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **nulls}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_aliases_and_ids_accepted(http):
    body = {"model": "smollm2-135m", "prompt": [72, 105, 33], "max_tokens": 4, "temperature": 0}
    r = http.post("/v1/completions", json=body).json()
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 1}}  # fmt: skip


def test_batch_of_prompts_one_choice_each(http):
    r = http.post("/v1/completions", json={"prompt": ["ab", "cd", "ef"], "max_tokens": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert [c["text"] for c in r["choices"]] == ["abab", "cdcd", "efef"]


def test_concurrent_requests_each_get_their_own_answer(rt):
    def one(i: int) -> str:
        body = {"prompt": f"<{i}>", "max_tokens": 6, "stream": i % 2 == 0}
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{rt.http_url}/v1/completions", json=body, headers=headers, timeout=20)
        if i % 2:
            return r.json()["choices"][0]["text"]
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
        return "".join(json.loads(line)["choices"][0]["text"] for line in lines)

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(32)))
    assert all(t.startswith(f"<{i}>") for i, t in enumerate(texts)), texts


def test_stream_is_sse_ending_with_done(http):
    body = {"prompt": "Hello", "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "HelloHelloHello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_refused_stream_gets_an_error_status(http):
    body = {"prompt": "hi", "max_tokens": 100_000, "stream": True}
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == "prompt"


def test_streaming_client_disconnect_aborts(rt, http):
    before = finished(rt.client, "abort")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_aborted(rt.client, before)


def test_stalled_stream_reader_is_aborted(rt):
    """A reader that stops reading (buffers full, writes waiting) loses its request within the
    stall timeout (1 s here), as a frozen ZMQ client does; a slow reader that keeps reading does
    not (the other streaming tests)."""
    host, _, port = rt.http_url.removeprefix("http://").rpartition(":")
    before = finished(rt.client, "abort")
    body = {"prompt": "stall " * 50, "max_tokens": LONG, "stream": True, "n": 8}  # 8 events a step
    body = json.dumps(body).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills fast
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        wait_aborted(rt.client, before, timeout=12)  # and never read again
        assert rt.client.stats().kv_used == 0


def test_non_streaming_client_disconnect_aborts(rt):
    before = finished(rt.client, "abort")
    body = json.dumps({"prompt": "hi", "max_tokens": LONG}).encode()
    host, port = rt.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 5
        while not rt.client.stats().running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    wait_aborted(rt.client, before)


def test_native_generate(http):
    r = http.post("/generate", json={"text": "ab", "sampling_params": {"max_new_tokens": 3}})
    out = r.json()
    assert out["text"] == "ababab" and len(out["output_ids"]) == 3
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert meta["completion_tokens"] == 3
    assert meta["cached_tokens"] == meta["prompt_tokens"] // 2
    assert 0 <= meta["ttft"] <= meta["e2e_latency"]
    ids = http.post(
        "/generate", json={"input_ids": [72, 105], "sampling_params": {"max_new_tokens": 2}}
    )
    assert ids.json()["output_ids"] == [72, 105]
    body = {"text": "ab", "sampling_params": {"max_new_tokens": 2}, "stream": True}
    with http.stream("POST", "/generate", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["text"] == "abab"
    error_of(http.post("/generate", json={"text": "a", "input_ids": [1]}), 400)
    error_of(http.post("/generate", json={"text": "a", "sampling_params": {"top_p": 2}}), 400)


def test_flush_cache_idle_and_busy(http):
    assert http.post("/flush_cache").json() == {"ok": True}
    body = {"prompt": "hi", "max_tokens": LONG, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # keep it: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        assert error_of(http.post("/flush_cache"), 409)["code"] == "busy"


def test_metrics_count_zmq_and_http_requests_and_aborts(rt, http):
    def scrape() -> dict[str, float]:
        text = http.get("/metrics").text
        return {s.name + json.dumps(s.labels, sort_keys=True): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    before = scrape()
    rt.client.generate("hello", max_new_tokens=3)
    http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    aborted = finished(rt.client, "abort")
    stream = rt.client.stream("hello", max_new_tokens=LONG)
    next(stream)
    stream.close()
    wait_aborted(rt.client, aborted)
    assert http.post("/v1/completions", json={"prompt": "", "max_tokens": 3}).status_code == 400
    after = scrape()
    count = "radixkv_e2e_request_latency_seconds_count{}"
    assert after[count] - before[count] == 2  # aborted and refused requests are not latencies
    for reason, n in (("length", 2), ("abort", 1), ("error", 1)):
        key = f'radixkv_requests_finished_total{{"reason": "{reason}"}}'
        assert after[key] - before.get(key, 0) == n
    assert after["radixkv_kv_capacity_tokens{}"] == 8192


def test_busy_port_fails_start_up_fast(rt):
    port = int(rt.http_url.rsplit(":", 1)[1])
    start = time.monotonic()
    with pytest.raises(radixkv.RuntimeStartError, match="choose another --http-port"):
        radixkv.Runtime(scheduler=FAKE, http_port=port, start_timeout=60)
    assert time.monotonic() - start < 10


def test_scheduler_death_is_503_never_500():
    crash = [0, 0, 0]
    kwargs = {"crash_on": tuple(crash)}
    with radixkv.Runtime(
        scheduler=FAKE, scheduler_kwargs=kwargs, http_port=0, max_scheduler_restarts=1
    ) as rt:
        url = rt.http_url
        r = httpx.post(f"{url}/generate", json={"input_ids": crash}, timeout=20)
        assert error_of(r, 503)["type"] == "service_unavailable"
        assert error_of(r, 503)["message"].endswith("a new scheduler is starting")
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").status_code != 200:  # 503 while it restarts
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}).status_code == 200
        r = httpx.post(f"{url}/generate", json={"input_ids": crash}, timeout=20)
        assert error_of(r, 503)["message"].endswith("the runtime exits")
        assert rt.process.wait(10) == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_cli_http_port():
    ns = build_parser().parse_args(["launch", "--http-port", "8000", "--api-key", "k"])
    args = server_args(ns)
    assert args.http_port == 8000 and args.host == "127.0.0.1" and args.api_key == "k"
    assert server_args(build_parser().parse_args(["launch"])).http_port is None
