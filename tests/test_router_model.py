"""Data-parallel workers on the real model behind the router: the same greedy tokens as one runtime,
prefixes kept on one worker, and the cache events a real scheduler publishes."""

from __future__ import annotations

import msgspec
import pytest
import zmq

import radixkv
from radixkv.protocol import CacheEvents

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer in one short sentence. " * 12


def conversation(group: int, question: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"Team {group}. {SYSTEM}"},
        {"role": "user", "content": f"What is {question} times {group + 2}?"},
    ]


def test_dp2_gives_one_runtimes_greedy_tokens_and_keeps_each_prefix_on_one_worker():
    order = [(g, q) for q in range(3) for g in range(2)]  # interleaved groups
    with radixkv.Runtime(dp=2, max_total_tokens=3000, log_level="warning") as rt:
        routed = [rt.client.chat(conversation(g, q), max_new_tokens=12) for g, q in order]
        stats = rt.client.stats()
    with radixkv.Runtime(max_total_tokens=3000, log_level="warning") as rt:
        alone = [rt.client.chat(conversation(g, q), max_new_tokens=12) for g, q in order]
    assert [r.token_ids for r in routed] == [r.token_ids for r in alone]
    # each group's prefix was computed once: its later requests hit it on the same worker
    assert all(r.cached_tokens == 0 for r in routed[:2])
    assert all(r.cached_tokens >= r.prompt_tokens - 20 for r in routed[2:])
    assert sorted(w.routed for w in stats.workers) == [3, 3]
    assert all(w.stats is not None and w.stats.cached_tokens > 0 for w in stats.workers)


def test_a_runtime_publishes_its_cache_events():
    with radixkv.Runtime(cache_events_port=0, max_total_tokens=600, log_level="warning") as rt:
        info = rt.client.server_info()
        assert info.cache_events is not None and info.cache_events.startswith("tcp://")
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(info.cache_events)
        try:
            rt.client.generate("warm up the subscription", max_new_tokens=1)
            while sub.poll(500):
                sub.recv()
            prompt = rt.client.tokenize("The quick brown fox jumps over the lazy dog")
            result = rt.client.generate_ids(prompt, max_new_tokens=4)
            events = []
            while sub.poll(2000):
                events += msgspec.msgpack.decode(sub.recv(), type=CacheEvents).events
            stored = [e.tokens for e in events if e.kind == "stored"]
            # the prompt (and the output but its last token) is cached when the request ends
            assert [*prompt, *result.token_ids[:-1]] in stored
            for i in range(6):  # a 600-token cache fills up: leaves are evicted
                rt.client.generate_ids([1000 + i] * 150, max_new_tokens=1)
            removed = []
            while sub.poll(2000):
                batch = msgspec.msgpack.decode(sub.recv(), type=CacheEvents)
                removed += [e for e in batch.events if e.kind == "removed"]
            assert removed and all(0 <= e.keep < len(e.tokens) for e in removed)
        finally:
            sub.close(linger=0)
            ctx.term()
