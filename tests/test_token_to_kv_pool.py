from __future__ import annotations

import pytest
import torch

from radixkv.mem import KVLayout, TokenToKVPool

LAYOUT = KVLayout(num_layers=3, kv_heads=2, head_dim=4, dtype=torch.float32)


def test_buffers_have_one_padding_page_and_every_layer():
    pool = TokenToKVPool(LAYOUT, 32, page_size=4)
    assert len(pool.k_buffer) == len(pool.v_buffer) == 3
    assert pool.k_buffer[0].shape == (36, 2, 4)
    # stored head-major: a KV head's slots are one contiguous run (the kernels read them so)
    assert pool.k_buffer[0].stride() == pool.v_buffer[2].stride() == (4, 36 * 4, 1)
    assert pool.capacity == pool.available_size() == 32
    assert pool.memory_bytes == 36 * LAYOUT.bytes_per_token


def test_bytes_per_token_is_two_times_layers_heads_dim_dtype():
    assert LAYOUT.bytes_per_token == 2 * 3 * 2 * 4 * 4
    assert KVLayout(30, 3, 64, torch.bfloat16).bytes_per_token == 2 * 30 * 3 * 64 * 2


def test_alloc_never_hands_out_the_padding_slot_and_returns_none_when_short():
    pool = TokenToKVPool(LAYOUT, 8)
    slots = pool.alloc(8)
    assert slots is not None
    assert sorted(slots.tolist()) == list(range(1, 9))
    assert pool.available_size() == 0
    assert pool.alloc(1) is None
    assert pool.alloc(0) is not None


def test_free_is_batched_and_available_size_counts_parked_slots():
    pool = TokenToKVPool(LAYOUT, 8)
    a = pool.alloc(5)
    assert a is not None
    pool.free(a[:2])
    pool.free(a[2:])
    assert pool.available_size() == 8
    assert sorted(pool.free_slots().tolist()) == list(range(1, 9))
    assert pool.alloc(8) is not None


@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_alloc_returns_whole_consecutive_pages(page_size):
    pool = TokenToKVPool(LAYOUT, 4 * page_size, page_size=page_size)
    slots = pool.alloc(2 * page_size)
    assert slots is not None
    pages = slots.view(2, page_size)
    assert (pages[:, 0] % page_size == 0).all()
    assert (pages - pages[:, :1] == torch.arange(page_size)).all()
    assert (slots >= page_size).all()  # page 0 is padding
    with pytest.raises(ValueError, match="multiple of page_size"):
        pool.alloc(page_size + 1)


def test_alloc_extend_continues_the_partly_filled_last_page():
    pool = TokenToKVPool(LAYOUT, 16, page_size=4)
    first = pool.alloc_extend(0, 6, 0)  # two pages, second half used
    assert first is not None and len(first) == 6
    more = pool.alloc_extend(6, 11, int(first[-1]))
    assert more is not None
    assert more[:2].tolist() == [int(first[-1]) + 1, int(first[-1]) + 2]
    assert int(more[2]) % 4 == 0  # position 8 starts a fresh page
    assert pool.available_size() == 16 - 12
    assert pool.alloc_extend(11, 30, int(more[-1])) is None
    assert pool.available_size() == 4  # a failed alloc takes nothing


def test_alloc_decode_takes_a_page_only_at_page_boundaries():
    pool = TokenToKVPool(LAYOUT, 16, page_size=4)
    a = pool.alloc(4)
    b = pool.alloc(4)
    assert a is not None and b is not None
    seq_lens = torch.tensor([3, 4])
    last = torch.tensor([int(a[2]), int(b[3])])
    out = pool.alloc_decode(seq_lens, last)
    assert out is not None
    assert int(out[0]) == int(a[3])
    assert int(out[1]) % 4 == 0 and int(out[1]) not in b.tolist()
    assert pool.available_size() == 4


def test_free_of_paged_slots_frees_whole_pages():
    pool = TokenToKVPool(LAYOUT, 8, page_size=4)
    slots = pool.alloc_extend(0, 5, 0)
    assert slots is not None
    pool.free(slots)
    assert pool.available_size() == 8


def test_set_kv_writes_only_the_given_slots():
    pool = TokenToKVPool(LAYOUT, 8)
    k = torch.randn(2, 2, 4)
    v = torch.randn(2, 2, 4)
    pool.set_kv(1, torch.tensor([3, 5]), k, v)
    kb, vb = pool.get_kv_buffer(1)
    assert torch.equal(kb[[3, 5]], k) and torch.equal(vb[[3, 5]], v)
    assert pool.get_key_buffer(0).abs().sum() == 0
    assert pool.get_value_buffer(1)[4].abs().sum() == 0


def test_memory_budget_sizing_and_error():
    per_page = LAYOUT.bytes_per_token * 4
    pool = TokenToKVPool.from_memory_budget(LAYOUT, 10 * per_page, page_size=4)
    assert pool.capacity == 9 * 4
    assert pool.memory_bytes <= 10 * per_page
    with pytest.raises(ValueError, match="holds no page"):
        TokenToKVPool.from_memory_budget(LAYOUT, per_page, page_size=4)


def test_clear_returns_everything():
    pool = TokenToKVPool(LAYOUT, 8)
    pool.alloc(6)
    pool.clear()
    assert pool.available_size() == 8


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        TokenToKVPool(LAYOUT, 10, page_size=4)
    with pytest.raises(ValueError):
        TokenToKVPool(LAYOUT, 8, page_size=0)
