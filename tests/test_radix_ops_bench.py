"""The radix-ops benchmark's trace generator and replayer, on small traces."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "radix_ops", Path(__file__).resolve().parents[1] / "bench" / "radix_ops.py"
)
assert _SPEC is not None and _SPEC.loader is not None
radix_ops = importlib.util.module_from_spec(_SPEC)
sys.modules["radix_ops"] = radix_ops  # dataclasses look their module up
_SPEC.loader.exec_module(radix_ops)

SMALL = {
    "shared-prefix": radix_ops.SharedPrefix(4, 5, 64, 16, 8),
    "multi-turn": radix_ops.MultiTurn(6, 3, 32, 8, 8),
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_traces_are_deterministic_and_round_trip(kind, tmp_path):
    a = radix_ops.generate(kind, SMALL[kind], concurrency=3, seed=7)
    b = radix_ops.generate(kind, SMALL[kind], concurrency=3, seed=7)
    assert a == b
    assert a != radix_ops.generate(kind, SMALL[kind], concurrency=3, seed=8)
    path = tmp_path / "t.jsonl"
    radix_ops.write_trace(path, {"version": 1, "concurrency": 3, "capacity": 100}, a)
    header, events = radix_ops.read_trace(path)
    assert events == a and header["capacity"] == 100
    arrivals = [e["rid"] for e in a if e["op"] == "arrive"]
    finishes = [e["rid"] for e in a if e["op"] == "finish"]
    assert sorted(arrivals) == sorted(finishes) == list(range(len(arrivals)))


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("page_size", [1, 4])
def test_unbounded_replay_reaches_the_best_hit_rate(kind, page_size):
    events = radix_ops.generate(kind, SMALL[kind], concurrency=3, seed=1)
    best, total = radix_ops.best_hit_rate(events)
    big = radix_ops.unique_tokens(events) + 4096
    stats = radix_ops.replay(events, big, page_size, concurrency=3)
    assert stats.prompt_tokens == total and stats.evicted_tokens == 0
    if page_size == 1:
        assert stats.matched_tokens == best
    else:  # page-aligned matches lose at most one partial page per request
        requests = sum(e["op"] == "arrive" for e in events)
        assert best - requests * (page_size - 1) <= stats.matched_tokens <= best


def test_bounded_replay_evicts_and_keeps_the_invariants():
    events = radix_ops.generate("shared-prefix", SMALL["shared-prefix"], concurrency=3, seed=1)
    best, _ = radix_ops.best_hit_rate(events)
    stats = radix_ops.replay(events, 300, 1, concurrency=3)  # replay checks integrity at the end
    assert stats.evicted_tokens > 0 and stats.rejected == 0
    assert 0 < stats.matched_tokens < best
    assert stats.peak_kv_slots <= 300


def test_eviction_cost_rows():
    rows = radix_ops.evict_cost([200, 800], evictions=20)
    assert [r["leaves"] for r in rows] == [200, 800]
    assert all(r["evict_us"] > 0 and r["walk_heapify_us"] > 0 for r in rows)
