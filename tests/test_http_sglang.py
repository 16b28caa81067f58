"""What SGLang's and vLLM's clients and benchmarks read: `/generate` streams in SGLang's format,
`sglext` beside usage, the server-info, model-info, health, tokenize and cache-reset endpoints,
and `--context-length`. Fake scheduler (tests/fake_scheduler.py): the output echoes the prompt."""

from __future__ import annotations

import itertools
import json

import httpx2 as httpx
import pytest

import radixkv
from radixkv.tools.cli import build_parser
from radixkv.tools.flags import server_args

KEY = "s3cret-key"
FAKE = "fake_scheduler:run_fake_scheduler"


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(scheduler=FAKE, api_key=KEY, http_port=0, start_timeout=60) as rt:
        yield rt


@pytest.fixture
def http(rt):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=rt.http_url, headers=headers, timeout=20) as client:
        yield client


def events(r: httpx.Response) -> list[dict]:
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_generate_streams_cumulative_text_and_meta_info_in_every_event(http):
    body = {"text": "abc", "sampling_params": {"max_new_tokens": 6}, "stream": True}
    with http.stream("POST", "/generate", json=body) as r:
        evs = events(r)
    texts = [e["text"] for e in evs]
    assert texts[-1] == "abc" * 6  # "abc" is one token: the fake echoes it
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    counts = [e["meta_info"]["completion_tokens"] for e in evs]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert {e["meta_info"]["id"] for e in evs} == {evs[0]["meta_info"]["id"]}
    assert all(e["meta_info"]["finish_reason"] is None for e in evs[:-1])
    last = evs[-1]["meta_info"]
    assert last["finish_reason"] == {"type": "length", "length": 6}
    assert last["prompt_tokens"] == evs[0]["meta_info"]["prompt_tokens"] > 0
    assert last["cached_tokens_details"] == {"device": last["cached_tokens"], "host": 0}


def test_sglang_benchmark_request_is_accepted(http):
    """The body `python -m sglang.bench_serving --backend sglang` sends."""
    body = {"text": "hi there", "sampling_params": {"temperature": 0.0, "max_new_tokens": 4,
            "ignore_eos": True}, "stream": True, "lora_path": None, "return_logprob": False,
            "logprob_start_len": -1}  # fmt: skip
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert events(r)[-1]["meta_info"]["completion_tokens"] == 4


def test_sglext_beside_usage(http):
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).json()
    cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert r["sglext"]["cached_tokens_details"] == {"device": cached, "host": 0}
    assert r["sglext"]["cached_tokens_per_choice"] == [cached]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with http.stream("POST", "/v1/chat/completions", json=body) as s:
        last = events(s)[-1]
    assert last["choices"] == [] and "cached_tokens_details" in last["sglext"]


def test_server_and_model_info(http):
    info = http.get("/get_server_info").json()
    assert info == http.get("/server_info").json() | {"internal_states": info["internal_states"]}
    assert info["context_length"] == 4096 and info["model_path"] == "smollm2-135m"
    assert "api_key" not in info and KEY not in json.dumps(info)
    assert info["internal_states"][0]["kv_capacity"] > 0
    model = http.get("/get_model_info").json()
    assert model["model_path"] == "smollm2-135m" and model["is_generation"] is True


def test_reset_prefix_cache_and_health_generate(http):
    assert http.post("/reset_prefix_cache").json() == {"ok": True}
    assert http.get("/health_generate").json() == {"status": "ok"}


def test_tokenize_and_detokenize(rt, http):
    r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == rt.client.tokenize("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 4096
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["text"] == "Hello world"
    chat = [{"role": "user", "content": "hi"}]
    ids = http.post("/tokenize", json={"messages": chat}).json()["tokens"]
    assert ids == rt.client.tokenize(chat)
    assert rt.client.detokenize(ids).endswith("<|im_start|>assistant\n")
    done = rt.client.generate_ids(ids, max_new_tokens=1)
    assert done.prompt_tokens == len(ids)  # the same tokens a chat request is made of
    bad = http.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    both = http.post("/tokenize", json={"prompt": "a", "messages": chat})
    assert both.status_code == 400


def test_context_length_is_an_alias_and_port_says_it_is_not_http():
    ns = build_parser().parse_args(["launch", "--context-length", "1024"])
    assert server_args(ns).max_context_len == 1024
    assert (
        "NOT HTTP" in build_parser()._subparsers._group_actions[0].choices["launch"].format_help()
    )


def test_an_overloaded_runtime_answers_429():
    from radixkv.client.results import RequestError
    from radixkv.http.gateway import map_error

    error = map_error(RequestError("3 requests are waiting [overloaded]", "overloaded"))
    assert error.status == 429 and error.code == "overloaded"


def test_metrics_under_sglang_and_vllm_names(rt, http):
    from prometheus_client.parser import text_string_to_metric_families

    rt.client.generate("hello world", max_new_tokens=5)
    text = http.get("/metrics").text
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.labels
    }
    stats = rt.client.stats()
    assert samples["vllm:prefix_cache_queries_total"] == stats.prompt_tokens
    assert samples["vllm:prefix_cache_hits_total"] == stats.cached_tokens
    assert samples["sglang:cached_tokens_total"] == stats.cached_tokens
    assert samples["sglang:prompt_tokens_total"] == samples["vllm:prompt_tokens_total"]
    assert samples["sglang:generation_tokens_total"] == stats.generated_tokens
    assert "vllm:num_requests_waiting" in samples and "sglang:num_running_reqs" in samples
    assert samples["sglang:cache_hit_rate"] == pytest.approx(stats.hit_rate)
    for name in (
        "radixkv_inter_token_latency_seconds",
        "vllm:inter_token_latency_seconds",
        "sglang:queue_time_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:time_to_first_token_seconds",
        "sglang:e2e_request_latency_seconds",
    ):
        assert samples[f"{name}_count"] > 0, name  # fmt: skip


def test_deeply_nested_input_is_a_clear_error_and_the_runtime_serves_on(rt, http):
    """(Issue 12) 100,000 levels of nesting, over HTTP and raw ZMQ, in a field and at the top."""
    import zmq

    deep = "[" * 100_000 + "]" * 100_000
    for path, body in (
        ("/v1/completions", f'{{"prompt": "hi", "stop": {deep}}}'),
        ("/generate", f'{{"text": "hi", "image_data": {deep}}}'),
    ):  # an Any field
        r = http.post(path, content=body.encode())
        assert r.status_code == 400, r.text  # fmt: skip
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(rt.endpoint)
    try:
        nested = b"\x91" * 100_000 + b"\xc0"
        for frame in (nested, b"\x82\xa4type\xa8generate\xa3rid" + nested):
            sock.send(frame)
            assert b"malformed" in sock.recv()
    finally:
        sock.close(linger=0)
        ctx.term()
    assert rt.client.generate("still here", max_new_tokens=1).completion_tokens == 1


def test_flush_waits_for_idle_when_asked(rt, http):
    """SGLang's benchmark flushes with ?timeout=: wait for the requests in flight, then flush."""
    stream = rt.client.stream("busy", max_new_tokens=500)  # ~2 s at the fake's 4 ms a token
    next(stream)
    assert http.post("/flush_cache").status_code == 409
    assert http.post("/flush_cache", params={"timeout": 30}).json() == {"ok": True}
    assert list(stream)[-1].finish_reason == "length"  # it finished first, untouched
    for bad in ("nan", "-1", "inf", "soon"):
        assert http.post("/flush_cache", params={"timeout": bad}).status_code == 400


def test_streams_with_n_copies_interleave_by_index(http):
    body = {"prompt": "ab", "max_tokens": 4, "n": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as r:
        evs = events(r)
    texts: dict[int, str] = {}
    finished = set()
    for e in evs[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"]:
            finished.add(c["index"])
    assert texts == {0: "abababab", 1: "abababab", 2: "abababab"} and finished == {0, 1, 2}
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 12
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2,
            "stream": True}  # fmt: skip
    with http.stream("POST", "/v1/chat/completions", json=chat) as r:
        roles = [e["choices"][0]["index"] for e in events(r) if "role" in e["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1]
