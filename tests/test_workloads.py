from __future__ import annotations

from radixkv.workloads import SharedPrefixWorkload, best_hit_rate


def test_shared_prefix_workload_is_deterministic_and_shares_system_prompts():
    wl = SharedPrefixWorkload(groups=3, prompts_per_group=4, system_words=20, seed=5)
    a, b = wl.requests(), wl.requests()
    assert a == b and len(a) == 12
    assert a != SharedPrefixWorkload(groups=3, prompts_per_group=4, system_words=20).requests()
    systems = {r.group: r.messages[0]["content"] for r in a}
    assert len(set(systems.values())) == 3
    assert all(r.messages[0]["content"] == systems[r.group] for r in a)
    assert [r.group for r in a] != sorted(r.group for r in a)  # arrivals are shuffled


def test_best_hit_rate_counts_each_distinct_prefix_once():
    seqs = [([1, 2, 3, 4], [9, 9]), ([1, 2, 3, 5], [8]), ([1, 2, 3, 4, 9, 7], [])]
    # request 2 reuses [1, 2, 3]; request 3 reuses [1, 2, 3, 4, 9] (prompt + output[:-1] of 1)
    assert best_hit_rate(seqs) == (0 + 3 + 5) / (4 + 4 + 6)
    assert best_hit_rate(seqs, page_size=2) == (0 + 2 + 4) / 14
    assert best_hit_rate([]) == 0.0
    # the last prompt token is never reusable, even when the whole prompt was seen
    assert best_hit_rate([([1, 2], []), ([1, 2], [])]) == 1 / 4
