"""The whole runtime with the real model and real processes: Runtime → runtime → scheduler."""

from __future__ import annotations

import json

import pytest

import radixkv
from radixkv.config import ServerArgs
from radixkv.model.loader import load_model
from radixkv.protocol import SamplingParams
from radixkv.scheduler.process import build_scheduler

pytestmark = pytest.mark.slow

SYSTEM_LEN = 96
NEW = 6


def shared_prefix_prompts() -> list[list[int]]:
    """4 groups x 16 requests; each group shares a 96-token system prompt (ids < 49152)."""
    systems = [[(i * 53 + g * 101) % 3000 + 200 for i in range(SYSTEM_LEN)] for g in range(4)]
    return [systems[g] + [4000 + 16 * g + q, 4100 + q, 4200] for g in range(4) for q in range(16)]


@pytest.fixture(scope="module")
def rt():
    with radixkv.Runtime(
        "smollm2-135m", dtype="float32", max_total_tokens=16384, max_running_requests=64
    ) as runtime:
        yield runtime


def alone_with_cache_disabled(prompts: list[list[int]]) -> list[list[int]]:
    model = load_model("smollm2-135m", dtype="float32")
    outputs = []
    for ids in prompts:
        s = build_scheduler(ServerArgs(dtype="float32", disable_radix_cache=True), model)
        s.add_request("r", ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
        tokens: list[int] = []
        while s.has_work():
            for out in s.step():
                tokens.extend(out.token_ids)
        outputs.append(tokens)
    return outputs


def test_64_concurrent_shared_prefix_requests_equal_running_alone(rt):
    prompts = shared_prefix_prompts()
    results = rt.client.generate_ids(prompts, max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in results] == alone_with_cache_disabled(prompts)
    firsts = {}
    for ids, r in zip(prompts, results, strict=True):
        assert r.prompt_tokens == len(ids) and r.completion_tokens == NEW
        firsts.setdefault(tuple(ids[:SYSTEM_LEN]), []).append(r.cached_tokens)
    for cached in firsts.values():
        # in-batch sharing: one request of the group computes the prefix, the others hit it
        assert sorted(cached)[1:] == [c for c in sorted(cached)[1:] if c >= SYSTEM_LEN]
    stats = rt.client.stats()
    assert stats.protected == 0 and stats.running == 0
    assert stats.cached_tokens >= sum(sum(c) for c in firsts.values())


def test_multi_turn_reuses_the_whole_history(rt):
    system = {"role": "system", "content": "You are a terse assistant. " * 8}
    convs = [[system, {"role": "user", "content": f"Name a fruit number {i}."}] for i in range(3)]
    previous: list[tuple[int, int] | None] = [None] * 3
    for _ in range(3):
        results = rt.client.chat(convs, max_new_tokens=12)
        for i, r in enumerate(results):
            if previous[i] is not None:
                prompt_len, completion = previous[i]
                # the whole history is served from the cache: the previous prompt and reply,
                # all but the reply's last token (it never went through the model)
                assert r.cached_tokens >= prompt_len + completion - 1
            previous[i] = (r.prompt_tokens, r.completion_tokens)
            convs[i] = [
                *convs[i],
                {"role": "assistant", "content": r.text},
                {"role": "user", "content": "And another one?"},
            ]


def test_a_session_continues_in_token_ids_as_the_whole_prompt_sent_again_would(rt):
    """A session's request is the history (prompt and output as generated) plus the new input:
    greedy output equal to sending that whole prompt plainly, all of the history but the last
    output token served from the cache; closing the session demotes its path in the cache."""
    client, greedy = rt.client, SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    prompt = shared_prefix_prompts()[5]
    before = client.stats().demoted_tokens
    sid = client.open_session()
    first = client.generate_ids(prompt, params=greedy, session={"id": sid})
    turn = [4300, 4301, 4302]
    second = client.generate_ids(turn, params=greedy, session={"id": sid, "rid": first.rid})
    history = prompt + first.token_ids
    assert second.prompt_tokens == len(history) + len(turn)
    assert second.cached_tokens >= len(history) - 1
    assert second.token_ids == client.generate_ids(history + turn, params=greedy).token_ids
    client.close_session(sid)
    assert client.stats().demoted_tokens > before  # (the runtime's loop sent it before replying)


def test_memory_pressure_through_the_processes_keeps_outputs_and_invariants():
    """KV capacity far below the working set: eviction, chunking and retraction all happen, every
    request finishes with its unpressured output, and nothing leaks afterwards."""
    prompts = shared_prefix_prompts()[::4]  # 16 requests, 4 per group
    with radixkv.Runtime("smollm2-135m", dtype="float32", max_total_tokens=16384) as roomy:
        expected = [r.token_ids for r in roomy.client.generate_ids(prompts, max_new_tokens=24)]
    with radixkv.Runtime(
        "smollm2-135m",
        dtype="float32",
        max_total_tokens=640,
        chunked_prefill_size=64,
        max_prefill_tokens=128,
        new_token_ratio=0.02,
        min_new_token_ratio=0.0,
    ) as tight:
        results = tight.client.generate_ids(prompts, max_new_tokens=24)
        assert [r.token_ids for r in results] == expected
        stats = tight.client.stats()
    assert stats.retractions > 0 and stats.evicted_tokens > 0
    assert stats.running == stats.waiting == stats.protected == stats.kv_used == 0


def test_radixkv_bench_against_a_running_runtime(rt, tmp_path, capsys):
    from radixkv.tools.cli import main

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--endpoint", rt.endpoint, "--workload", "multi-turn", "--chats", "4",
            "--turns", "3", "--system-len", "64", "--user-len", "8", "--output-len", "4",
            "--seed", "7", "--out", str(out), "--plot", str(png)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["requests"] == len(report["requests"]) == 12
    assert summary["prompt_tokens"] == sum(r["prompt_ids"] for r in report["requests"])
    assert summary["cached_tokens"] == sum(r["cached_tokens"] for r in report["requests"])
    # later turns reuse the whole history and the chats share the system prompt
    assert summary["hit_rate"] >= 0.95 * summary["best_hit_rate"] > 0.5
    # streamed: a gap between chunks for each token after the first (fewer where a partial
    # character held a token back)
    gaps = [len(r["itl"]) for r in report["requests"]]
    assert all(0 < n <= r["output_ids"] - 1 for n, r in zip(gaps, report["requests"], strict=True))
    assert summary["itl_s"]["p50"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "best possible" in capsys.readouterr().out


def test_isolate_cache_per_key_over_zmq_and_http():
    """Two tenants' keys: each shares cached prefixes with itself only, and a tenant's ZMQ and
    HTTP requests share with each other (the gateway salts by its caller's key as the runtime
    does); a request's own cache_salt splits a tenant further."""
    import httpx2 as httpx

    prompt = shared_prefix_prompts()[0]
    with radixkv.Runtime(
        "smollm2-135m", dtype="float32", max_total_tokens=4096, api_key="alice-key, bob-key",
        isolate_cache_per_key=True, http_port=0,
    ) as rt:  # fmt: skip
        alice = rt.client  # the first key
        with radixkv.Client(rt.endpoint, api_key="bob-key") as bob:

            def cached(client: radixkv.Client, **kw: str) -> int:
                return client.generate_ids(prompt, max_new_tokens=1, **kw).cached_tokens

            def cached_http(key: str) -> int:
                r = httpx.post(f"{rt.http_url}/v1/completions", timeout=60,
                               headers={"Authorization": f"Bearer {key}"},
                               json={"prompt": prompt, "max_tokens": 1})  # fmt: skip
                assert r.status_code == 200, r.text
                return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

            full = len(prompt) - 1
            assert cached(alice) == 0 and cached(alice) == full
            assert cached(bob) == 0  # alice's prefix is not bob's
            assert cached_http("alice-key") == full and cached_http("bob-key") == full
            assert cached(bob, cache_salt="project-x") == 0
            with pytest.raises(radixkv.RequestError, match="API key"):
                radixkv.Client(rt.endpoint, api_key="mallory").generate("hi", max_new_tokens=1)
            assert httpx.get(f"{rt.http_url}/v1/models").status_code == 401
