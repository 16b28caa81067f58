"""Radix-cache traces (generation, replay) and the radix-ops benchmark script, on small traces."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from radixkv.tools import traces
from radixkv.tools.workloads import GeneratedSharedPrefix, MultiTurnChat

SMALL = {
    "shared-prefix": GeneratedSharedPrefix(4, 5, 64, 16, 8),
    "multi-turn": MultiTurnChat(chats=6, turns=3, system_len=32, user_len=8, output_len=8),
    "multi-turn-varied": MultiTurnChat(
        chats=6, turns=4, system_len=32, user_len=8, output_len=8, min_turns=1
    ),
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_traces_are_deterministic_and_round_trip(kind, tmp_path):
    a = traces.generate(SMALL[kind], concurrency=3, seed=7)
    b = traces.generate(SMALL[kind], concurrency=3, seed=7)
    assert a == b
    assert a != traces.generate(SMALL[kind], concurrency=3, seed=8)
    path = tmp_path / "t.jsonl"
    traces.write_trace(path, {"version": 1, "concurrency": 3, "capacity": 100}, a)
    header, events = traces.read_trace(path)
    assert events == a and header["capacity"] == 100
    arrivals = [e["rid"] for e in a if e["op"] == "arrive"]
    finishes = [e["rid"] for e in a if e["op"] == "finish"]
    assert sorted(arrivals) == sorted(finishes) == list(range(len(arrivals)))


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("page_size", [1, 4])
def test_unbounded_replay_reaches_the_best_hit_rate(kind, page_size):
    events = traces.generate(SMALL[kind], concurrency=3, seed=1)
    best, total = traces.best_hit_rate(events)
    big = traces.unique_tokens(events) + 4096
    stats = traces.replay(events, big, page_size, concurrency=3)
    assert stats.prompt_tokens == total and stats.evicted_tokens == 0
    if page_size == 1:
        assert stats.matched_tokens == best
    else:  # page-aligned matches lose at most one partial page per request
        requests = sum(e["op"] == "arrive" for e in events)
        assert best - requests * (page_size - 1) <= stats.matched_tokens <= best


def test_bounded_replay_evicts_and_keeps_the_invariants():
    events = traces.generate(SMALL["shared-prefix"], concurrency=3, seed=1)
    best, _ = traces.best_hit_rate(events)
    stats = traces.replay(events, 300, 1, concurrency=3)  # replay checks integrity at the end
    assert stats.evicted_tokens > 0 and stats.rejected == 0
    assert 0 < stats.matched_tokens < best
    assert stats.peak_kv_slots <= 300


def test_eviction_cost_table():
    bench = Path(__file__).resolve().parents[1] / "bench" / "radix_ops.py"
    out = subprocess.run(
        [sys.executable, str(bench), "evict-cost", "--sizes", "200", "800"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("200", "800"))]
    assert [r[0] for r in rows] == ["200", "800"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("frac", [0.2, 0.4])
def test_the_offline_optimum_bounds_every_policy(kind, frac):
    """Belady's rule on the tree hits at least what every online policy hits, at most what an
    unbounded cache does, and keeps the hierarchy's invariants (replay checks them)."""
    from radixkv.mem.eviction import EVICTION_POLICIES

    events = traces.generate(SMALL[kind], concurrency=3, seed=2)
    unique = traces.unique_tokens(events)
    capacity = int(unique * frac)
    optimum = traces.replay(events, capacity, 1, 3, "belady")
    unbounded = traces.replay(events, unique + 4096, 1, 3)
    rates = {p: traces.replay(events, capacity, 1, 3, p).hit_rate for p in EVICTION_POLICIES}
    assert optimum.evicted_tokens > 0
    assert all(rate <= optimum.hit_rate + 1e-12 for rate in rates.values()), rates
    assert optimum.hit_rate <= unbounded.hit_rate
    # LRU knowing which paths are never used again: between LRU and the optimum
    ends = traces.replay(events, capacity, 1, 3, "ends-known").hit_rate
    assert rates["lru"] - 1e-12 <= ends <= optimum.hit_rate + 1e-12
    # depth odds (the trace's own continuation rates) + recency: under the optimum too
    assert traces.replay(events, capacity, 1, 3, "depth-odds:64").hit_rate <= optimum.hit_rate
    # conversations as sessions, closed after their last turn: online, under the optimum, and
    # what lru gains from it is what knowing the ends gives (the same fact, told by the client)
    for policy in ("lru", "gdsf"):
        closed = traces.replay(events, capacity, 1, 3, policy, sessions=True).hit_rate
        assert closed <= optimum.hit_rate + 1e-12
    assert traces.replay(events, capacity, 1, 3, "lru", sessions=True).hit_rate >= rates["lru"]


def test_continuation_log_odds_counts_the_requests_that_went_on():
    a, b = list(range(300)), list(range(1000, 1300))
    events = [
        {"op": "arrive", "rid": 0, "tokens": a},
        {"op": "finish", "rid": 0, "output": [7, 8]},  # cached 301: bin 1, continued by rid 1
        {"op": "arrive", "rid": 1, "tokens": [*a, 7, 8, 9]},
        {"op": "finish", "rid": 1, "output": [5]},  # cached 303: bin 1, never continued
        {"op": "arrive", "rid": 2, "tokens": b},
        {"op": "finish", "rid": 2, "output": [6]},  # cached 300: bin 1, never continued
    ]
    odds = traces.continuation_log_odds(events, traces.FutureUses(events))
    assert odds == {1: pytest.approx(math.log(1.5 / 2.5))}  # 1 of 3 went on, +0.5 each side


def test_future_uses_finds_the_next_arrival_through_a_position():
    events = [
        {"op": "arrive", "rid": 0, "tokens": [1, 2, 3, 4]},
        {"op": "arrive", "rid": 1, "tokens": [1, 2, 9]},
        {"op": "arrive", "rid": 2, "tokens": [1, 2, 3, 4, 5]},
        {"op": "arrive", "rid": 3, "tokens": [7]},
    ]
    future = traces.FutureUses(events)
    path = [1, 2, 3, 4, 5, 6]
    assert future.next_use(path, 0, 0) == 1  # arrival 1 reuses token 1
    assert future.next_use(path, 2, 0) == 2  # position 2 (token 3): arrival 2, not 1
    assert future.next_use(path, 4, 0) == 2
    assert future.next_use(path, 5, 0) == float("inf")  # nobody reaches token 6
    assert future.next_use(path, 0, 2) == float("inf")
    assert future.next_use([7], 0, -1) == 3
