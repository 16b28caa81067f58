from __future__ import annotations

import pytest
import torch

from radixkv.mem import (
    IntegrityError,
    KVCacheManager,
    KVLayout,
    RadixCache,
    ReqToTokenPool,
    TokenToKVPool,
)

LAYOUT = KVLayout(num_layers=1, kv_heads=1, head_dim=2)


def make(page_size: int = 1, capacity: int = 64, rows: int = 4, disable: bool = False):
    pool = TokenToKVPool(LAYOUT, capacity, page_size=page_size)
    tree = RadixCache(pool, disable=disable)
    return KVCacheManager(pool, ReqToTokenPool(rows, 128), tree)


def run_to_end(mgr: KVCacheManager, prompt: list[int], output: list[int]):
    seq = mgr.admit(prompt)
    assert seq is not None
    assert mgr.alloc_extend(seq, len(prompt)) is not None
    for _ in output[:-1]:
        assert mgr.alloc_decode([seq]) is not None
    mgr.cache_finished(seq, prompt + output)
    return seq


def test_admit_locks_the_matched_prefix_and_fills_the_row():
    mgr = make()
    run_to_end(mgr, [1, 2, 3, 4], [5, 6])
    seq = mgr.admit([1, 2, 3, 4, 5, 9])
    assert seq is not None and seq.cached_len == 5 and seq.kv_len == 5
    assert mgr.tree.protected_size() == 5
    row = mgr.req_pool.read(seq.row, 0, 5)
    assert row.tolist() == mgr.tree.match_full([1, 2, 3, 4, 5]).indices.tolist()
    mgr.check_integrity([seq])


def test_admit_returns_none_without_a_free_row():
    mgr = make(rows=1)
    assert mgr.admit([1, 2]) is not None
    assert mgr.admit([1, 2]) is None


def test_cache_finished_keeps_prompt_and_output_minus_last_and_frees_the_rest():
    mgr = make()
    run_to_end(mgr, [1, 2, 3, 4], [5, 6, 7])
    assert mgr.tree.total_size() == 6  # the last output token never had KV
    assert mgr.token_pool.available_size() == 64 - 6
    assert mgr.req_pool.available_size() == 4
    mgr.check_integrity([])


def test_cache_finished_frees_duplicates_of_a_concurrent_request():
    mgr = make()
    a = mgr.admit([1, 2, 3, 4])
    b = mgr.admit([1, 2, 3, 4])
    assert a is not None and b is not None
    mgr.alloc_extend(a, 4)
    mgr.alloc_extend(b, 4)
    mgr.cache_finished(a, [1, 2, 3, 4, 9])
    mgr.cache_finished(b, [1, 2, 3, 4, 9])
    assert mgr.tree.total_size() == 4
    assert mgr.token_pool.available_size() == 60
    mgr.check_integrity([])


def test_cache_unfinished_repoints_the_row_before_freeing_duplicates():
    mgr = make()
    a = mgr.admit([1, 2, 3, 4, 5, 6])
    b = mgr.admit([1, 2, 3, 4, 5, 6])
    assert a is not None and b is not None
    mgr.alloc_extend(a, 4)
    mgr.alloc_extend(b, 4)
    mgr.cache_unfinished(a, [1, 2, 3, 4, 5, 6])
    own_b = mgr.req_pool.read(b.row, 0, 4)
    mgr.cache_unfinished(b, [1, 2, 3, 4, 5, 6])
    tree_slots = mgr.tree.match_full([1, 2, 3, 4]).indices
    assert mgr.req_pool.read(b.row, 0, 4).tolist() == tree_slots.tolist()
    assert set(own_b.tolist()) <= set(mgr.token_pool.free_slots().tolist())
    assert b.cached_len == 4 and b.last_node is a.last_node
    assert mgr.tree.protected_size() == 4 and a.last_node.lock_ref == 2
    mgr.check_integrity([a, b])
    for seq in (a, b):
        mgr.alloc_extend(seq, 6)
        mgr.cache_finished(seq, [1, 2, 3, 4, 5, 6, 7])
    mgr.check_integrity([])
    assert mgr.tree.total_size() == 6


@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_chunk_keeps_the_unaligned_tail_with_the_request(page_size):
    mgr = make(page_size=page_size, capacity=8 * page_size)
    prompt = list(range(1, 3 * page_size + 1))
    seq = mgr.admit(prompt)
    assert seq is not None
    mgr.alloc_extend(seq, page_size + 2)
    mgr.cache_unfinished(seq, prompt)
    assert seq.cached_len == page_size and seq.kv_len == page_size + 2
    mgr.check_integrity([seq])
    mgr.alloc_extend(seq, len(prompt))
    mgr.alloc_decode([seq])
    mgr.check_integrity([seq])
    mgr.cache_finished(seq, [*prompt, 0, 0])
    assert mgr.tree.total_size() == 3 * page_size
    mgr.check_integrity([])
    assert mgr.token_pool.available_size() == 5 * page_size


def test_alloc_extend_evicts_and_fails_cleanly_when_memory_is_short():
    mgr = make(capacity=8)
    run_to_end(mgr, [1, 2, 3, 4, 5, 6], [7])
    assert mgr.token_pool.available_size() == 2 and mgr.available_size() == 8
    seq = mgr.admit([9, 9, 9, 9, 9])
    assert seq is not None
    assert mgr.alloc_extend(seq, 5) is not None  # evicted the cached request
    assert mgr.tree.total_size() == 0 or mgr.tree.total_size() <= 3
    assert mgr.alloc_extend(seq, 12) is None
    assert seq.kv_len == 5
    mgr.check_integrity([seq])


def test_alloc_decode_is_batched():
    mgr = make()
    seqs = [mgr.admit([i, i, i]) for i in (1, 2, 3)]
    assert all(s is not None for s in seqs)
    for s in seqs:
        mgr.alloc_extend(s, 3)  # type: ignore[arg-type]
    slots = mgr.alloc_decode(seqs)  # type: ignore[arg-type]
    assert slots is not None and len(set(slots.tolist())) == 3
    assert all(s.kv_len == 4 for s in seqs)  # type: ignore[union-attr]
    mgr.check_integrity(seqs)  # type: ignore[arg-type]


def test_release_frees_own_slots_and_unlocks():
    mgr = make()
    run_to_end(mgr, [1, 2, 3, 4], [5])
    seq = mgr.admit([1, 2, 3, 4, 8, 8])
    assert seq is not None
    mgr.alloc_extend(seq, 6)
    mgr.release(seq)
    assert mgr.tree.protected_size() == 0
    assert mgr.token_pool.available_size() == 64 - 4
    mgr.check_integrity([])


def test_disabled_cache_frees_everything_at_finish():
    mgr = make(disable=True)
    run_to_end(mgr, [1, 2, 3], [4, 5])
    seq = mgr.admit([1, 2, 3, 4])
    assert seq is not None and seq.cached_len == 0
    mgr.alloc_extend(seq, 2)
    mgr.cache_unfinished(seq, [1, 2, 3, 4])
    assert seq.cached_len == 0 and seq.kv_len == 2
    mgr.release(seq)
    assert mgr.token_pool.available_size() == 64
    mgr.check_integrity([])


def test_integrity_check_finds_a_leaked_slot_and_a_leaked_row():
    mgr = make()
    seq = mgr.admit([1, 2, 3])
    assert seq is not None
    mgr.alloc_extend(seq, 3)
    with pytest.raises(IntegrityError, match="capacity"):
        mgr.check_integrity([])
    mgr.token_pool.alloc(1)
    with pytest.raises(IntegrityError):
        mgr.check_integrity([seq])


def test_reset_refuses_while_requests_run():
    mgr = make()
    seq = mgr.admit([1, 2])
    with pytest.raises(IntegrityError):
        mgr.reset()
    assert seq is not None
    mgr.release(seq)
    run_to_end(mgr, [1, 2, 3], [4])
    mgr.reset()
    assert mgr.token_pool.available_size() == 64


def test_too_long_sequence_is_a_clear_error():
    mgr = make()
    seq = mgr.admit([1])
    assert seq is not None
    with pytest.raises(ValueError, match="max_context_len"):
        mgr.alloc_extend(seq, 1000)
    assert torch.equal(mgr.token_pool.free_slots(), torch.arange(1, 65))
