"""The scheduler in-process with the real SmolLM2 weights: sharing, pressure, aborts, limits."""

from __future__ import annotations

import pytest

from radixkv.config import ServerArgs
from radixkv.model.loader import load_model
from radixkv.protocol import SamplingParams
from radixkv.scheduler.process import build_scheduler
from radixkv.scheduler.scheduler import RequestRejected, Scheduler

pytestmark = pytest.mark.slow

NEW = 12


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2-135m", dtype="float32")


def make(model, **kw) -> Scheduler:
    return build_scheduler(ServerArgs(dtype="float32", **{"max_total_tokens": 4096, **kw}), model)


def prompts() -> list[list[int]]:
    """Two groups of four requests, each group sharing a 150-token system prompt."""
    systems = [[(i * 37 + g * 11) % 500 + 100 for i in range(150)] for g in range(2)]
    return [systems[g] + [600 + 7 * q + g, 601 + q, 700] for g in range(2) for q in range(4)]


def run(s: Scheduler, reqs: list[list[int]], max_new: int = NEW) -> dict[str, tuple]:
    for i, ids in enumerate(reqs):
        s.add_request(f"r{i}", ids, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    meta: dict[str, tuple] = {}
    while s.has_work():
        for out in s.step():
            tokens.setdefault(out.rid, []).extend(out.token_ids)
            if out.finish_reason:
                meta[out.rid] = (out.finish_reason, out.cached_tokens)
    s.step()  # idle: runs the invariant check
    s.check_idle()
    return {rid: (tokens.get(rid, []), *meta[rid]) for rid in meta}


@pytest.fixture(scope="module")
def alone(model):
    """Each request run alone with the radix cache disabled: the reference outputs."""
    out = {}
    for i, ids in enumerate(prompts()):
        s = make(model, disable_radix_cache=True)
        out[f"r{i}"] = run(s, [ids])["r0"][0]
    return out


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs"])
def test_shared_prefix_batch_matches_requests_run_alone(model, alone, policy):
    s = make(model, schedule_policy=policy)
    results = run(s, prompts())
    assert {rid: r[0] for rid, r in results.items()} == alone
    assert all(r[1] == "length" for r in results.values())
    cached = sorted(r[2] for r in results.values())
    if policy != "fcfs":
        # in-batch sharing: the first of each group runs alone, the other three hit its cache
        assert cached[:2] == [0, 0] and all(c >= 150 for c in cached[2:])
    stats = s.get_stats()
    assert stats.cached_tokens == sum(cached) and stats.protected == 0


@pytest.mark.parametrize(
    ("kv_cache_dtype", "mixed"),
    [("auto", False), ("int8", False), ("auto", True), ("auto", "paced")],
)
def test_memory_pressure_evicts_chunks_and_retracts_with_identical_outputs(
    model, kv_cache_dtype, mixed
):
    """Also with a quantized KV cache, in deterministic mode: every attention reads K/V as
    stored, so chunked, evicted-and-recomputed and retracted requests give the tokens of the
    unpressured run. (Without it a projection's last-bit batch variance can move a K value across
    a code boundary, one int8 step: logprobs then differ by ~1e-3 and a near tie can flip.) And
    with decoding requests riding in the prefill batches (mixed chunk), which take their slots
    before admission and retract to get them; "paced": also with --ttft-target so short that
    every step after the first small one is late, so budgets switch between 64 and 128."""
    quantized = {"kv_cache_dtype": kv_cache_dtype, "deterministic": kv_cache_dtype != "auto"}
    if mixed:
        quantized["enable_mixed_chunk"] = True
    if mixed == "paced":
        quantized["ttft_target"] = 1e-6
    unpressured = run(make(model, **quantized), prompts(), max_new=40)
    # ~650 distinct tokens in 420 slots, and a decode reserve far too small: the scheduler must
    # evict, chunk every prompt and retract running requests to finish them all
    s = make(
        model,
        max_total_tokens=420,
        chunked_prefill_size=64,
        max_prefill_tokens=128,
        new_token_ratio=0.02,
        min_new_token_ratio=0.0,
        **quantized,
    )
    results = run(s, prompts(), max_new=40)
    assert {rid: r[0] for rid, r in results.items()} == {
        rid: r[0] for rid, r in unpressured.items()
    }
    stats = s.get_stats()
    assert stats.retractions > 0 and stats.evicted_tokens > 0
    assert stats.kv_used == 0 and stats.protected == 0 and stats.running == 0


def test_mixed_chunk_decodes_while_a_long_prompt_is_prefilled(model, alone):
    """With --enable-mixed-chunk a running request gets a token in every chunk step of a later
    long prompt (without it, none until that prefill ends), and every output is unchanged."""
    results = run(make(model, enable_mixed_chunk=True, chunked_prefill_size=64,
                       max_prefill_tokens=64), prompts())  # fmt: skip
    assert {rid: r[0] for rid, r in results.items()} == alone
    long_prompt = [(i * 13) % 900 + 50 for i in range(400)]
    for mixed in (True, False):
        s = make(model, enable_mixed_chunk=mixed, chunked_prefill_size=64, max_prefill_tokens=64)
        s.add_request("a", prompts()[0][:40], SamplingParams(max_new_tokens=60, ignore_eos=True))
        s.step()  # a's prefill (one chunk) and first token: a is decoding
        s.add_request("b", long_prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
        per_step = []
        while not any(r.rid == "b" and r.seq is not None and not r.prefilling
                      for r in s.running):  # fmt: skip
            per_step.append(sum(len(o.token_ids) for o in s.step() if o.rid == "a"))
        # 400 tokens in chunks of 64: 7 steps; a decodes in each only when mixed
        assert len(per_step) == 7 and per_step == [int(mixed)] * 7
        while s.has_work():
            s.step()
        s.check_idle()


@pytest.mark.parametrize(("target", "steps"), [(1e6, 7), (1e-6, 2)])
def test_ttft_target_chunks_small_while_on_time_and_big_when_late(model, target, steps):
    """--ttft-target: a long prompt arriving while a request decodes is prefilled in small
    chunks while it would still be on time (a target of 11 days: 7 chunks of 64), and in one
    step for the rest once it cannot be (a 1 µs target: one small step, to time the pace, then
    the other 336 tokens at once); the decoding request rides in every step; outputs unchanged.
    With nothing decoding a prompt is prefilled in one step whatever its length."""
    long_prompt = [(i * 13) % 900 + 50 for i in range(400)]
    s = make(model, enable_mixed_chunk=True, chunked_prefill_size=64, max_prefill_tokens=4096,
             ttft_target=target)  # fmt: skip
    s.add_request("a", prompts()[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
    s.step()  # nothing decoding: a's 153 tokens in one step
    assert [r.rid for r in s.running] == ["a"] and s.chunked is None
    s.add_request("b", long_prompt, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    per_step, b_tokens = [], []
    while s.has_work():
        outs = s.step()
        b_tokens += [t for o in outs if o.rid == "b" for t in o.token_ids]
        if not b_tokens:  # b is still being prefilled
            per_step.append(sum(len(o.token_ids) for o in outs if o.rid == "a"))
    s.check_idle()
    assert per_step == [1] * (steps - 1)  # and b's last prefill step, with b's first token
    stats = s.get_stats()  # a's one step, then b's
    assert (stats.prefill_steps, stats.raised_prefill_steps) == (1 + steps, int(steps == 2))
    assert b_tokens == run(make(model), [long_prompt])["r0"][0]


def test_page_size_16_gives_the_same_outputs(model, alone):
    results = run(make(model, page_size=16), prompts())
    assert {rid: r[0] for rid, r in results.items()} == alone
    assert all(r[2] % 16 == 0 for r in results.values())


def test_abort_frees_a_running_request(model):
    s = make(model)
    s.add_request("a", prompts()[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    s.add_request("b", prompts()[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    for _ in range(3):
        s.step()
    [out] = s.abort("a")
    assert out.finish_reason == "abort"
    assert s.abort("nope") == []
    while s.has_work():
        s.step()
    s.check_idle()
    assert s.get_stats().finished == {"abort": 1, "length": 1}


def test_request_priority_orders_eviction_under_the_priority_policy_and_is_refused_otherwise(
    model,
):
    with pytest.raises(RequestRejected, match="--radix-eviction-policy priority"):
        make(model).add_request("p", [1, 2, 3], SamplingParams(max_new_tokens=2, priority=1))
    s = make(model, radix_eviction_policy="priority", max_total_tokens=256)

    def finish(rid: str, ids: list[int], priority: int = 0) -> int:
        s.add_request(rid, ids, SamplingParams(max_new_tokens=2, ignore_eos=True,
                                               priority=priority))  # fmt: skip
        cached = 0
        while s.has_work():
            for out in s.step():
                cached = out.cached_tokens if out.finish_reason else cached
        return cached

    important = [100 + i for i in range(100)]
    finish("important", important, priority=3)
    finish("ordinary", [300 + i for i in range(100)])  # used later, but lower priority
    finish("pressure", [500 + i for i in range(100)])  # 300 tokens > 256: one must go
    assert finish("again", [*important, 1]) == 100  # kept; under LRU it would have gone
    s.check_idle()


def test_requests_that_can_never_be_served_are_rejected_clearly(model):
    # Empty prompts and prompts over the context are refused by the front end (validation.py,
    # tests/test_frontend_detokenizer.py); the scheduler checks what only it knows.
    s = make(model, max_total_tokens=256, max_context_len=512)
    with pytest.raises(RequestRejected, match="KV cache holds 256"):
        s.add_request("big", [1] * 300, SamplingParams(max_new_tokens=20))
    s.add_request("ok", [1, 2, 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(RequestRejected, match="already in use"):
        s.add_request("ok", [1, 2, 3], SamplingParams(max_new_tokens=2))
    ok, message = s.flush_cache()
    assert not ok and "in flight" in message
    while s.has_work():
        s.step()
    assert s.flush_cache() == (True, "")


def test_shared_prefix_decode_reads_the_prefix_once_with_the_same_tokens(model, alone, monkeypatch):
    from radixkv.model import cascade

    plans = []
    real_plan = cascade.plan_shared_prefixes

    def counting_plan(*args):
        plan = real_plan(*args)
        plans.append(plan)
        return plan

    monkeypatch.setattr(cascade, "MIN_SAVED", 1)
    monkeypatch.setattr("radixkv.model.torch_plan.CASCADE_OVER_KERNEL", True)
    monkeypatch.setattr("radixkv.model.torch_plan.plan_shared_prefixes", counting_plan)
    results = run(make(model), prompts())
    assert {rid: r[0] for rid, r in results.items()} == alone
    assert any(p is not None and p.prefix_index.shape[1] >= 150 for p in plans)


def generate(s: Scheduler, ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    s.add_request("p", ids, params)
    tokens, reason = [], ""
    while s.has_work():
        for out in s.step():
            tokens.extend(out.token_ids)
            reason = out.finish_reason or reason
    s.check_idle()
    return tokens, reason


def test_logit_bias_and_min_new_tokens_steer_real_generation(model, alone):
    """A ban of the greedy first token changes it; a stop id equal to the greedy first token
    ends the request at once, unless min_new_tokens holds it back; penalties change repeats."""
    s = make(model)
    ids, greedy = prompts()[0], alone["r0"]
    first = greedy[0]
    banned, _ = generate(s, ids, SamplingParams(max_new_tokens=3, logit_bias={first: -100.0}))
    assert banned[0] != first
    stopped, reason = generate(s, ids, SamplingParams(max_new_tokens=6, stop_token_ids=[first]))
    assert stopped == [first] and reason == "stop"
    held = SamplingParams(max_new_tokens=6, stop_token_ids=[first], min_new_tokens=4)
    tokens, _ = generate(s, ids, held)
    assert len(tokens) >= 4 and first not in tokens[:3]
    plain, _ = generate(s, ids, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert plain == greedy
    strict = SamplingParams(max_new_tokens=NEW, ignore_eos=True, frequency_penalty=2.0)
    penalized, _ = generate(s, ids, strict)
    assert len(set(penalized)) >= len(set(plain)) and penalized != plain


def test_a_full_waiting_queue_refuses_new_requests_and_keeps_the_queued(model):
    s = make(model, max_queued_requests=2)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    s.add_request("a", [5, 6, 7], params)
    s.add_request("b", [5, 6, 8], params)
    with pytest.raises(RequestRejected, match="max-queued-requests") as err:
        s.add_request("c", [5, 6, 9], params)
    assert err.value.code == "overloaded"
    s.step()  # admits the queued: room again
    s.add_request("c", [5, 6, 9], params)
    done = set()
    while s.has_work():
        done |= {o.rid for o in s.step() if o.finish_reason}
    assert done == {"a", "b", "c"}
    s.check_idle()


def test_cache_salt_isolates_prefixes_and_keeps_the_tokens(model, alone):
    """Requests share cached KV only with the same salt (or with no salt both), across
    retraction-free runs; the outputs are the unsalted ones: only the tree key is salted."""
    s = make(model)
    p = prompts()[0]
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)

    def one(rid: str, salt: str | None) -> tuple[list[int], int]:
        s.add_request(rid, p, sp, salt)
        tokens, cached = [], -1
        while s.has_work():
            for out in s.step():
                tokens.extend(out.token_ids)
                if out.finish_reason:
                    cached = out.cached_tokens
        return tokens, cached

    assert one("plain", None) == (alone["r0"], 0)
    assert one("alice", "alice") == (alone["r0"], 0)  # the unsalted copy is not shared
    assert one("bob", "bob") == (alone["r0"], 0)  # nor alice's
    assert one("alice2", "alice") == (alone["r0"], len(p) - 1)  # alice's own is (but the last)
    assert one("plain2", None) == (alone["r0"], len(p) - 1)
    s.step()
    s.check_idle()
