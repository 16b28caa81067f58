"""Admission order of the scheduling policies, without a model or processes."""

from __future__ import annotations

import pytest

from radixkv.mem import KVLayout, RadixCache, TokenToKVPool
from radixkv.protocol import SamplingParams
from radixkv.scheduler.policy import SchedulePolicy
from radixkv.scheduler.req import Req


def make_tree(disable: bool = False) -> RadixCache:
    return RadixCache(TokenToKVPool(KVLayout(1, 1, 2), 1024), disable=disable)


def cache(tree: RadixCache, tokens: list[int]) -> None:
    slots = tree.kv_pool.alloc(len(tokens))
    assert slots is not None
    tree.kv_pool.free(slots[: tree.insert(tokens, slots)])


def reqs(*prompts: list[int], max_new: tuple[int, ...] = ()) -> list[Req]:
    out = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=max_new[i] if max_new else 16)
        r = Req(f"r{i}", p, params)
        r.wait_order = i
        out.append(r)
    return out


def rids(ordered: list[Req]) -> list[str]:
    return [r.rid for r in ordered]


def test_fcfs_is_arrival_order():
    waiting = reqs([1, 2], [3, 4], [5, 6])
    ordered, deferred = SchedulePolicy("fcfs", make_tree()).order(waiting[::-1])
    assert rids(ordered) == ["r0", "r1", "r2"] and not deferred


def test_lof_puts_longest_output_first():
    waiting = reqs([1], [2], [3], max_new=(4, 64, 16))
    ordered, _ = SchedulePolicy("lof", make_tree()).order(waiting)
    assert rids(ordered) == ["r1", "r2", "r0"]


def test_random_is_a_seeded_permutation():
    waiting = reqs(*[[i] for i in range(20)])
    a, _ = SchedulePolicy("random", make_tree(), seed=3).order(waiting)
    b, _ = SchedulePolicy("random", make_tree(), seed=3).order(waiting)
    assert rids(a) == rids(b) and sorted(rids(a)) == sorted(rids(waiting))
    assert rids(a) != rids(waiting)


def test_lpm_puts_longest_cached_prefix_first_and_does_not_split_edges():
    tree = make_tree()
    cache(tree, list(range(100, 140)))
    cache(tree, list(range(200, 210)))
    before = tree.pretty_print()
    waiting = reqs([7, 7, 7], list(range(200, 215)), list(range(100, 120)))
    ordered, _ = SchedulePolicy("lpm", tree, refresh_waiting=False).order(waiting)
    assert rids(ordered) == ["r2", "r1", "r0"]
    assert [r.match_len for r in ordered] == [19, 10, 0]
    assert tree.pretty_print() == before  # peeking neither splits edges nor touches times
    SchedulePolicy("lpm", tree).order(waiting)
    after = tree.pretty_print()
    assert after != before and after.count("len=") == before.count("len=")  # touched, not split


@pytest.mark.parametrize("eviction_policy", ["lru", "gdsf"])
def test_a_waiting_requests_prefix_is_evicted_after_the_others(eviction_policy):
    """Under memory pressure a prefix a queued request will reuse goes after the other leaves,
    however long ago it was cached; without the refresh it would go first (the oldest)."""
    for refresh in (True, False):
        tree = RadixCache(TokenToKVPool(KVLayout(1, 1, 2), 1024), eviction_policy=eviction_policy)
        wanted, other = list(range(100, 140)), list(range(200, 240))
        cache(tree, wanted)  # the older of the two
        cache(tree, other)
        waiting = reqs([*wanted, 1, 2, 3])
        SchedulePolicy("lpm", tree, refresh_waiting=refresh).order(waiting)
        assert tree.evict(40) == 40
        assert tree.peek_prefix([*wanted, 0])[0] == (40 if refresh else 0)
        assert tree.peek_prefix([*other, 0])[0] == (0 if refresh else 40)


def test_dfs_weight_visits_heavier_subtrees_first():
    tree = make_tree()
    a, b = [1] * 16, [2] * 16
    cache(tree, a)
    cache(tree, b)
    waiting = reqs([*a, 5, 5], [*b, 6, 6], [*b, 7, 7], [9, 9], [*b, 1, 1])
    ordered, _ = SchedulePolicy("dfs-weight", tree).order(waiting)
    # three requests under b, one under a, one matching nothing (at the root, first)
    assert rids(ordered) == ["r3", "r1", "r2", "r4", "r0"]


def test_aging_bounds_how_long_a_cold_request_is_passed_over():
    tree = make_tree()
    cache(tree, list(range(50)))
    cold, *hot = reqs([9, 9, 9], *[[*range(50), i] for i in range(3)])
    policy = SchedulePolicy("lpm", tree, max_skips=5)
    ordered, _ = policy.order([cold, *hot])
    assert ordered[-1] is cold
    cold.skips = 5
    ordered, _ = policy.order([cold, *hot])
    assert ordered[0] is cold


def test_in_batch_sharing_defers_requests_that_share_an_uncached_prefix():
    shared = list(range(1000, 1064))  # not in the tree
    waiting = reqs([*shared, 1], [*shared, 2], [5, 6, 7], [*shared, 3])
    ordered, deferred = SchedulePolicy("lpm", make_tree(), share_len=32).order(waiting)
    assert rids(ordered) == ["r0", "r2", "r1", "r3"]
    assert deferred == {id(waiting[1]), id(waiting[3])}


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_a_chunked_prefill_in_flight_defers_the_requests_that_share_its_prompt(policy):
    tree = make_tree()
    system = list(range(1000, 1200))
    cache(tree, system[:64])  # its first chunk, already computed and in the tree
    chunked, same, other = reqs([*system, 1], [*system, 2], [5, 6, 7] * 20)
    ordered, deferred = SchedulePolicy(policy, tree, share_len=32).order(
        [same, other], in_flight=[chunked]
    )
    assert deferred == {id(same)} and ordered[-1] is same
    # with the prompt fully cached, nothing is left to share: the request goes
    cache(tree, system)
    assert SchedulePolicy(policy, tree).order([same, other], in_flight=[chunked])[1] == set()


def test_window_limits_cache_aware_ordering_to_the_oldest_requests():
    tree = make_tree()
    cache(tree, list(range(30)))
    waiting = reqs([5, 5], [6, 6], list(range(31)), list(range(31)))
    ordered, _ = SchedulePolicy("lpm", tree, window=2).order(waiting)
    assert rids(ordered) == ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_cache_aware_policies_fall_back_to_fcfs_without_a_cache(policy):
    p = SchedulePolicy(policy, make_tree(disable=True))
    assert p.policy == "fcfs" and not p.cache_aware
