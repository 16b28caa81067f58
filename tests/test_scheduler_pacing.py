"""`--ttft-target`: the prefill budget of a step (`PrefillPacer`), without a model."""

from __future__ import annotations

import time

import pytest

from radixkv.config import ServerArgs
from radixkv.mem import KVLayout, RadixCache, TokenToKVPool
from radixkv.protocol import SamplingParams
from radixkv.scheduler.pacing import PrefillPacer, _shared_len
from radixkv.scheduler.req import Req

CHUNK, MAX = 32, 4096


def make_tree() -> RadixCache:
    return RadixCache(TokenToKVPool(KVLayout(1, 1, 2), 4096))


def req(rid: str, ids: list[int], waited: float = 0.0) -> Req:
    r = Req(rid, ids, SamplingParams(max_new_tokens=8))
    r.queued_at = time.monotonic() - waited
    return r


def pacer(per_token: float | None = 0.002, target: float = 1.0) -> PrefillPacer:
    p = PrefillPacer(target, CHUNK, MAX, page=1)
    p.small_s = per_token
    return p


def test_nothing_decoding_takes_the_full_budget():
    p = pacer()
    assert p.budget(make_tree(), None, [req("a", list(range(1000)))], decoding=False) == MAX
    assert p.raised and not p.late


def test_small_steps_until_one_is_timed():
    p = pacer(per_token=None)
    late = req("a", list(range(1000)), waited=10.0)
    assert p.budget(make_tree(), None, [late], decoding=True) == CHUNK and not p.raised


def test_on_time_prompts_get_small_steps():
    # 1000 tokens at 2 ms each: 2 s, within a 5 s target
    p = pacer(target=5.0)
    assert p.budget(make_tree(), None, [req("a", list(range(1000)))], decoding=True) == CHUNK
    assert not p.raised and not p.urgent


def test_a_late_prompt_gets_every_token_up_to_it_at_once():
    # by arrival: a (waited 0.95 of a 1 s target), b (0.5), c (new); 2 ms a token at small steps
    p = pacer()
    a = req("a", list(range(100)), waited=0.95)  # 0.2 s of tokens, 0.05 s left: late
    b = req("b", list(range(5000, 6000)), waited=0.5)  # late too (after a: 2.2 s)
    c = req("c", list(range(9000, 9050)))
    assert p.budget(make_tree(), None, [c, b, a], decoding=True) == 100 and p.late
    assert p.urgent == {id(a)}  # a's step; b gets the next, not a share of this one
    p = pacer(target=2.5)  # a on time (0.2 s of 1.55 s left); b, after a, 2.2 s of 2.0: late
    assert p.budget(make_tree(), None, [c, b, a], decoding=True) == 1100
    assert p.urgent == {id(a), id(b)}  # a's tokens come before b's: in the step, first
    p = pacer(target=5.0)  # everyone on time
    assert p.budget(make_tree(), None, [c, b, a], decoding=True) == CHUNK and not p.urgent


def test_a_retracted_request_has_no_deadline_but_delays_the_next():
    resumed = req("r", list(range(500)), waited=100.0)
    resumed.output_ids = [7, 8]  # retracted after two tokens: waiting to resume
    p = pacer()
    assert p.budget(make_tree(), None, [resumed], decoding=True) == CHUNK and not p.late
    fresh = req("f", list(range(1000, 1100)), waited=0.0)
    # alone, f's 100 tokens take 0.2 s of its 1 s; behind r's 500 (+2 outputs), 1.2 s
    assert p.budget(make_tree(), None, [fresh], decoding=True) == CHUNK
    assert p.budget(make_tree(), None, [resumed, fresh], decoding=True) == 602
    assert p.urgent == {id(resumed), id(fresh)}


def test_the_budget_is_capped_and_page_aligned():
    p = PrefillPacer(1.0, CHUNK, 512, page=16)
    p.small_s = 0.002
    assert p.budget(make_tree(), None, [req("a", list(range(2000)), 5.0)], decoding=True) == 512
    p.small_s = 0.002
    assert p.budget(make_tree(), None, [req("a", list(range(100)), 5.0)], decoding=True) == 112


def test_cached_and_chunked_tokens_are_not_counted_again():
    tree = make_tree()
    system = list(range(1000))
    slots = tree.kv_pool.alloc(600)
    assert slots is not None
    tree.insert(system[:600], slots)
    question = req("q", [*system, 7, 8, 9], waited=0.5)
    # 600 cached: 403 to compute, 0.8 s at 2 ms, late for a 1 s target after 0.5 s
    assert pacer().budget(tree, None, [question], decoding=True) == 403
    # a chunked request is computing the whole system prompt: the question adds 3 tokens to it
    sys_req = req("s", [*system, 1], waited=0.0)
    sys_req.seq = type("Seq", (), {"kv_len": 600})()  # type: ignore[assignment]
    sys_req.extend_target = 1001
    p = pacer(target=10.0)
    assert p.budget(tree, sys_req, [question], decoding=True) == CHUNK  # 404 tokens: on time
    assert _shared_len(question.tree_ids, sys_req.tree_ids) == 1000


def test_only_full_small_steps_set_the_pace():
    p = pacer(per_token=None)
    p.raised = True
    p.timed(1.0, 1000)  # a raised step: not the small pace
    assert p.small_s is None
    p.raised = False
    p.timed(0.5, 8)  # a leftover of 8 tokens: too few to say
    assert p.small_s is None
    p.timed(0.064, 32)
    assert p.small_s == pytest.approx(0.002)
    p.timed(0.128, 32)  # moving average: an eighth of the way to 4 ms
    assert p.small_s == pytest.approx(0.002 + 0.002 / 8)


def test_shared_len():
    assert _shared_len([1, 2, 3, 4], [1, 2, 3, 5]) == 3
    assert _shared_len([1, 2], [1, 2, 3]) == 2
    assert _shared_len([], [1]) == 0 and _shared_len([9], [1]) == 0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ttft_target": 1.0}, "needs --enable-mixed-chunk"),
        ({"ttft_target": 0.0, "enable_mixed_chunk": True}, "must be > 0"),
        ({"ttft_target": float("inf"), "enable_mixed_chunk": True}, "must be > 0"),
    ],
)
def test_ttft_target_refuses_what_it_cannot_honour(kw, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(**kw)
