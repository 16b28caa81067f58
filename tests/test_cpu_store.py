"""The C KV store (`cpu_store.py`) against `TokenToKVPool.set_kv`: the same bytes in the pool."""

from __future__ import annotations

import pytest
import torch

from radixkv.mem import KVLayout, TokenToKVPool
from radixkv.mem.kv_quant import QUANTIZED
from radixkv.model import cpu_store

pytestmark = pytest.mark.skipif(
    not cpu_store.usable(TokenToKVPool(KVLayout(1, 1, 32, torch.int8), 4), torch.float32),
    reason="no C compiler: the backend uses TokenToKVPool.set_kv",
)

POOLS = ["float32", "bfloat16", *QUANTIZED]


def pool_dtype(name: str) -> torch.dtype:
    return QUANTIZED[name][0] if name in QUANTIZED else getattr(torch, name)


def hard_values(n: int, kvh: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Heads spanning many magnitudes: normal values with 1 % outliers, heads scaled from 1e-30
    to 1e4, all-zero heads, values exactly halfway between int8 codes, signed zeros."""
    x = torch.randn(n, kvh, d, generator=gen)
    x = torch.where(torch.rand(n, kvh, d, generator=gen) < 0.01, 10 * x, x)
    x = x * 10.0 ** torch.randint(-30, 5, (n, kvh, 1), generator=gen).float()
    x[0, 0] = 0.0
    x[1, 0, :2] = -0.0
    x[2, 0] = torch.arange(d) - d / 2 + 0.5  # int8: scale 1, every value halfway between codes
    x[2, 0, 0] = 127.0
    return x


@pytest.mark.parametrize("pool_name", POOLS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_the_same_bytes_as_set_kv(pool_name, in_dtype):
    dtype = pool_dtype(pool_name)
    layout = KVLayout(num_layers=2, kv_heads=3, head_dim=64, dtype=dtype)
    if not cpu_store.usable(TokenToKVPool(layout, 8), in_dtype):
        assert not layout.quantized and dtype != in_dtype  # only a dtype change is refused
        return
    gen = torch.Generator().manual_seed(5)
    n = 700  # past the kernel's threshold for threads
    wide = hard_values(n, 6, 64, gen).to(in_dtype)  # as a fused QKV output: rows 6 x 64 apart
    k, v = wide[:, :3], hard_values(n, 3, 64, gen).to(in_dtype)
    slots = torch.randperm(2048, generator=gen)[:n] + 1
    want, got = TokenToKVPool(layout, 2048), TokenToKVPool(layout, 2048)
    want.set_kv(1, slots, k, v)
    cpu_store.check_slots(got, slots)
    cpu_store.store_kv(got, 1, slots, k, v)
    for a, b in ((want.k_buffer[1], got.k_buffer[1]), (want.v_buffer[1], got.v_buffer[1])):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if layout.quantized:
        assert torch.equal(want.k_scale[1], got.k_scale[1])
        assert torch.equal(want.v_scale[1], got.v_scale[1])
    assert not got.k_buffer[0].view(torch.uint8).any()  # other layers untouched


def test_bad_calls_are_refused():
    pool = TokenToKVPool(KVLayout(1, 2, 32, torch.int8), 16)
    k = torch.zeros(2, 2, 32)
    slots = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="outside"):
        cpu_store.check_slots(pool, torch.tensor([1, 17]))
    with pytest.raises(ValueError, match="outside"):
        cpu_store.check_slots(pool, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="int64"):
        cpu_store.check_slots(pool, slots.int())
    with pytest.raises(ValueError, match=r"\[2, 2, 32\]"):
        cpu_store.store_kv(pool, 0, slots, k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match="contiguous"):
        cpu_store.store_kv(pool, 0, slots, k.transpose(0, 1).contiguous().transpose(0, 1), k)
    with pytest.raises(ValueError, match="cannot write"):
        cpu_store.store_kv(pool, 0, slots, k.half(), k.half())
    plain = TokenToKVPool(KVLayout(1, 2, 32, torch.bfloat16), 16)
    with pytest.raises(ValueError, match="cannot write"):
        cpu_store.store_kv(plain, 0, slots, k, k)  # float32 K/V into a bf16 pool: set_kv's job
