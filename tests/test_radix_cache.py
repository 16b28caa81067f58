from __future__ import annotations

import pytest
import torch

from radixkv.mem import IntegrityError, KVLayout, RadixCache, TokenToKVPool

LAYOUT = KVLayout(num_layers=1, kv_heads=1, head_dim=2)


def make(page_size: int = 1, capacity: int = 256, disable: bool = False):
    pool = TokenToKVPool(LAYOUT, capacity, page_size=page_size)
    return pool, RadixCache(pool, disable=disable)


def put(pool: TokenToKVPool, tree: RadixCache, tokens: list[int]) -> torch.Tensor:
    """Allocate slots for `tokens`, insert them, free what the tree did not take."""
    slots = pool.alloc_extend(0, len(tokens), 0)
    assert slots is not None
    present = tree.insert(tokens, slots)
    aligned = len(tokens) // tree.page_size * tree.page_size
    pool.free(slots[:present])
    pool.free(slots[aligned:])
    return slots


def test_empty_tree_matches_nothing():
    _, tree = make()
    indices, node = tree.match_prefix([1, 2, 3])
    assert len(indices) == 0 and node is tree.root
    assert len(tree.match_prefix([]).indices) == 0


def test_insert_returns_length_already_present_and_match_returns_slots():
    pool, tree = make()
    slots = put(pool, tree, [1, 2, 3, 4])
    assert tree.total_size() == 4
    indices, _ = tree.match_prefix([1, 2, 3, 4, 5])
    assert indices.tolist() == slots.tolist()
    other = pool.alloc(6)
    assert other is not None
    assert tree.insert([1, 2, 3, 4, 5, 6], other) == 4
    assert tree.insert([1, 2, 9], other[:3]) == 2


def test_match_never_covers_the_last_token():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    assert len(tree.match_prefix([1, 2, 3, 4]).indices) == 3
    assert len(tree.match_full([1, 2, 3, 4]).indices) == 4


def test_match_splits_an_edge_mid_way():
    pool, tree = make()
    slots = put(pool, tree, [1, 2, 3, 4, 5, 6])
    indices, node = tree.match_prefix([1, 2, 3, 9])
    assert indices.tolist() == slots[:3].tolist()
    assert node.key == [1, 2, 3] and next(iter(node.children.values())).key == [4, 5, 6]
    tree.check_integrity()


def test_insert_splits_an_edge_and_branches():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4, 5, 6])
    put(pool, tree, [1, 2, 3, 7, 8])
    assert tree.total_size() == 8
    assert sorted(c.key[0] for c in tree.root.children[1].children.values()) == [4, 7]
    assert len(tree.match_prefix([1, 2, 3, 7, 8, 0]).indices) == 5
    tree.check_integrity()


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_keys_are_page_aligned(page_size):
    pool, tree = make(page_size)
    tail = page_size // 2  # an unaligned tail the tree must not take (none when page_size == 1)
    tokens = list(range(100, 100 + 3 * page_size + tail))
    put(pool, tree, tokens)
    assert tree.total_size() == 3 * page_size
    assert all(len(n.key) % page_size == 0 for n in tree._nodes())
    # a query diverging inside the second page matches only whole pages before it
    query = [*tokens[: page_size + tail], -1, *tokens[page_size + tail + 1 :]]
    assert len(tree.match_prefix(query).indices) == (page_size + tail) // page_size * page_size
    # the last token is never matched: a query of exactly two pages matches 2P - 1 rounded down
    expected = (2 * page_size - 1) // page_size * page_size
    assert len(tree.match_prefix(tokens[: 2 * page_size]).indices) == expected
    tree.check_integrity()


def test_disabled_mode_caches_nothing():
    pool, tree = make(disable=True)
    slots = pool.alloc(4)
    assert slots is not None
    assert tree.insert([1, 2, 3, 4], slots) == 4  # the caller keeps (and frees) every slot
    assert tree.total_size() == 0
    assert len(tree.match_prefix([1, 2, 3, 4, 5]).indices) == 0


def test_lock_moves_sizes_between_evictable_and_protected():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    put(pool, tree, [1, 2, 5, 6])
    _, node = tree.match_prefix([1, 2, 3, 4, 0])
    tree.lock(node)
    assert tree.protected_size() == 4 and tree.evictable_size() == 2
    tree.lock(node)
    tree.unlock(node)
    assert tree.protected_size() == 4
    tree.unlock(node)
    assert tree.protected_size() == 0 and tree.evictable_size() == 6
    with pytest.raises(IntegrityError, match="not locked"):
        tree.unlock(node)


def test_evict_frees_least_recently_used_leaves_first():
    pool, tree = make(capacity=32)
    put(pool, tree, [1, 1, 1])
    put(pool, tree, [2, 2, 2])
    put(pool, tree, [3, 3, 3])
    tree.match_prefix([1, 1, 1, 0])  # touch 1 → 2 is now the oldest
    free_before = pool.available_size()
    assert tree.evict(2) == 3  # whole leaf
    assert pool.available_size() == free_before + 3
    assert len(tree.match_prefix([2, 2, 2, 0]).indices) == 0
    assert len(tree.match_prefix([1, 1, 1, 0]).indices) == 3
    assert tree.evict(3) == 3
    assert len(tree.match_prefix([3, 3, 3, 0]).indices) == 0
    tree.check_integrity()


def test_evict_is_leaf_first_and_a_parent_becomes_evictable():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    put(pool, tree, [1, 2, 5, 6])
    assert tree.num_evictable_leaves() == 2
    assert tree.evict(1) == 2
    assert tree.num_evictable_leaves() == 1
    assert tree.evict(3) == 4  # the other leaf, then the parent [1, 2]
    assert tree.total_size() == 0 and pool.available_size() == pool.capacity
    tree.check_integrity()


def test_locked_prefix_is_never_evicted():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    put(pool, tree, [9, 9])
    indices, node = tree.match_prefix([1, 2, 3, 4, 0])
    tree.lock(node)
    assert tree.evict(100) == 2
    assert tree.match_prefix([1, 2, 3, 4, 0]).indices.tolist() == indices.tolist()
    tree.unlock(node)
    assert tree.evict(100) == 4


def test_lock_of_a_child_keeps_the_parent_out_of_the_lru():
    pool, tree = make()
    put(pool, tree, [1, 2, 3, 4])
    _, node = tree.match_prefix([1, 2, 0])  # split: [1, 2] -> [3, 4]
    _, leaf = tree.match_full([1, 2, 3, 4])
    tree.lock(leaf)
    assert tree.evict(10) == 0
    tree.unlock(leaf)
    tree.check_integrity()
    assert node.lock_ref == 0


def test_reset_frees_every_slot_and_refuses_while_locked():
    pool, tree = make()
    put(pool, tree, [1, 2, 3])
    put(pool, tree, [4, 5])
    _, node = tree.match_prefix([1, 2, 3, 0])
    tree.lock(node)
    with pytest.raises(IntegrityError):
        tree.reset()
    tree.unlock(node)
    tree.reset()
    assert tree.total_size() == 0 and pool.available_size() == pool.capacity
    assert len(tree.cached_slots()) == 0


def test_access_clock_is_a_counter_so_runs_are_deterministic():
    def run():
        pool, tree = make()
        put(pool, tree, [1, 2])
        put(pool, tree, [3, 4])
        tree.match_prefix([1, 2, 0])
        return tree.pretty_print()

    assert run() == run()
    assert "t=" in run()


def test_check_integrity_catches_broken_accounting():
    pool, tree = make()
    put(pool, tree, [1, 2, 3])
    tree.check_integrity()
    tree._evictable += 1
    with pytest.raises(IntegrityError, match="evictable"):
        tree.check_integrity()


def test_pretty_print_shows_edges_lengths_and_locks():
    pool, tree = make()
    put(pool, tree, list(range(20)))
    put(pool, tree, [0, 1, 2, 99])
    text = tree.pretty_print(max_tokens=4)
    assert "root (evictable=21, protected=0)" in text
    assert "[0 1 2] len=3 lock=0" in text
    assert "[3 4 5 6 ...] len=17" in text


def test_accepts_tensor_and_tuple_tokens():
    pool, tree = make()
    put(pool, tree, [5, 6, 7])
    assert len(tree.match_prefix(torch.tensor([5, 6, 7, 8])).indices) == 3
    assert len(tree.match_prefix((5, 6, 7, 8)).indices) == 3


def test_long_edges_compare_correctly_past_the_fast_path():
    pool, tree = make(capacity=1024)
    base = list(range(300))
    put(pool, tree, base)
    for cut in (0, 1, 63, 64, 65, 200, 299):
        query = [*base[:cut], -1, *base[cut + 1 :]]
        assert len(tree.match_prefix(query).indices) == cut
    tree.check_integrity()


@pytest.mark.parametrize("page", [1, 4])
def test_insert_resumed_at_a_locked_node_equals_insert_from_the_root(page):
    """A request's prefix is cached and locked; inserting its longer sequence from that node gives
    the tree, the return values and the slots a walk from the root gives."""
    trees = []
    for resume in (False, True):
        pool, tree = make(page)
        put(pool, tree, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        put(pool, tree, [1, 2, 3, 4, 20, 21, 22, 23])  # the path splits after 4 tokens
        cached, node = tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0])
        tree.lock(node)
        seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 30, 31, 32, 33, 34, 35]
        slots = torch.cat([cached, pool.alloc_extend(8, len(seq), int(cached[-1]))])
        start = (node, len(cached)) if resume else None
        present, tail, end = tree.insert_and_match(seq, slots, start)
        expected_tail, expected_end = tree.match_full(seq)
        skipped = len(cached) if resume else 0
        assert end is expected_end and tail.tolist() == expected_tail[skipped:].tolist()
        assert present == 8 + (2 // page) * page  # tokens 9, 10 were cached (page-aligned)
        tree.lock(end)
        tree.unlock(node)
        pool.free(slots[len(cached) : present])
        tree.check_integrity()
        trees.append(tree.pretty_print())
    assert trees[0] == trees[1]


def test_insert_start_must_be_a_page_boundary():
    pool, tree = make(4)
    slots = pool.alloc_extend(0, 8, 0)
    with pytest.raises(ValueError, match="page boundary"):
        tree.insert(list(range(8)), slots, (tree.root, 2))


# ---- eviction policies ---------------------------------------------------------------------------


def evicted_first(policy: str, script: list[tuple[str, list[int]]]) -> list[int]:
    """Run `script` ("put" or "hit" a token run) on a tree, evict one leaf; its first token."""
    pool = TokenToKVPool(LAYOUT, 4096)
    tree = RadixCache(pool, eviction_policy=policy)
    for op, tokens in script:
        if op == "put":
            put(pool, tree, tokens)
        else:
            tree.match_prefix([*tokens, 0])
    before = {n.key[0] for n in tree._lru}
    tree.evict(1)
    tree.check_integrity()
    return sorted(before - {n.key[0] for n in tree._lru})


def test_each_eviction_policy_picks_its_own_leaf():
    a, b = [1] * 4, [2] * 4
    old_but_hot = [("put", a), ("hit", a), ("hit", a), ("put", b)]  # a: older, hit 3 times
    assert evicted_first("lru", old_but_hot) == [1]
    assert evicted_first("lfu", old_but_hot) == [2]  # fewest hits
    assert evicted_first("slru", old_but_hot) == [2]  # b is still on probation
    assert evicted_first("fifo", old_but_hot) == [1]  # created first
    assert evicted_first("filo", old_but_hot) == [2]
    assert evicted_first("mru", old_but_hot) == [2]  # used last
    recent_touch = [("put", a), ("put", b), ("hit", a)]
    assert evicted_first("lru", recent_touch) == [2]
    assert evicted_first("fifo", recent_touch) == [1]
    # gdsf: a few more hits outweigh a little recency (hits x cost x 2^(clock / half-life))
    assert evicted_first("gdsf", old_but_hot) == [2]
    # a deeper leaf (costlier to recompute: attention over 2000 tokens) outlives a newer shallow
    stem = [7] * 2000
    script = [("put", [*stem, 9]), ("put", [*stem, 3, 3]), ("put", [4] * 2)]
    assert evicted_first("gdsf", script) == [4]
    assert evicted_first("lru", script) == [9]


def test_priority_eviction_keeps_what_important_requests_cached():
    """SGLang's `priority` policy: the lowest priority goes first, LRU within one; a node's
    priority is the highest of the requests that cached through it."""
    pool = TokenToKVPool(LAYOUT, 4096)
    tree = RadixCache(pool, eviction_policy="priority")
    stem = [5] * 4

    def put_with(tokens: list[int], priority: int) -> None:
        slots = pool.alloc(len(tokens))
        assert slots is not None
        pool.free(slots[: tree.insert(tokens, slots, priority=priority)])

    put_with([*stem, 1, 1], 2)  # an important request
    put_with([*stem, 2, 2], 0)  # then two ordinary ones, used later
    put_with([3] * 4, 0)
    tree.match_prefix([3] * 4 + [0])
    tree.evict(2)  # the older of the two ordinary leaves goes, not the important one
    assert len(tree.match_prefix([*stem, 2, 2, 0]).indices) == 4
    assert len(tree.match_prefix([*stem, 1, 1, 0]).indices) == 6
    tree.evict(2)
    assert len(tree.match_prefix([3] * 4 + [0]).indices) == 0
    tree.evict(2)  # only the important leaf is left to go; its stem stays, a leaf now
    stem_match = tree.match_prefix([*stem, 1, 1, 0])
    assert len(stem_match.indices) == 4
    assert stem_match.last_node.priority == 2  # the highest request that cached through it
    tree.check_integrity()


def test_gdsf_ages_leaves_that_stop_being_hit():
    pool = TokenToKVPool(LAYOUT, 64)
    tree = RadixCache(pool, eviction_policy="gdsf")
    put(pool, tree, [1] * 8)
    for _ in range(5):
        tree.match_prefix([1] * 8 + [0])  # once hot
    for i in range(2, 40):  # then a stream of new prefixes, each hit twice
        put(pool, tree, [i] * 8)
        tree.match_prefix([i] * 8 + [0])
        if pool.available_size() < 8:
            tree.evict(8)
        tree.check_integrity()
    assert len(tree.match_prefix([1] * 8 + [0]).indices) == 0  # aged out, not kept forever


def test_unknown_eviction_policy_is_refused():
    with pytest.raises(ValueError, match="unknown eviction policy 'lifo'"):
        RadixCache(TokenToKVPool(LAYOUT, 8), eviction_policy="lifo")
