"""Writing a batch's new K and V into the KV pool in one pass (CPU, a small C kernel).

`TokenToKVPool.set_kv` is torch: an index_put per buffer, and in a quantized pool a dozen ops
more (amax, divisions, clamps, roundings, conversions, then four index_puts), each a dispatch
over a few KB at decode: ~0.35 ms a layer, ~10 ms of a 64 x 1k int8 decode step
(`bench/profile_step.py`). `kv_store.c` does the same per (token, KV head) in one pass, bit for
bit: the codes and bf16 scales equal `kv_quant.quantize`'s (`tests/test_cpu_store.py`). The
torch backend uses it on the CPU where the K/V come in the pool's dtype, or in float32 / bf16 for
a quantized pool (`usable`); `RADIXKV_CPU_STORE=0` keeps `set_kv`. Compiled on first use like the
other kernels (`cbuild.py`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model import cbuild, cpu_attention
from radixkv.model.cpu_attention import CODE_KINDS

MAX_HEAD_DIM = 1024  # the kernel's per-head buffer


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cbuild.load("kv_store", ("cpu_kernels.h", "kv_store.c"), "RADIXKV_CPU_STORE",
                      "TokenToKVPool.set_kv")  # fmt: skip
    if lib is None:
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.store_kv.restype = i32
    lib.store_kv.argtypes = [ptr, i64, ptr, i64, i32, ptr, i64, i32, i32, i32, ptr, ptr, i64, i64,
                             ptr, ptr]  # fmt: skip
    return lib


def usable(pool: TokenToKVPool, dtype: torch.dtype) -> bool:
    """Whether K/V of `dtype` can be stored into `pool` by the kernel: a CPU pool of `dtype`
    (float32 or bf16), or a quantized one and K/V in float32 or bf16."""
    layout = pool.layout
    return (
        pool.device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and (layout.dtype == dtype or layout.dtype in CODE_KINDS)
        and layout.head_dim <= MAX_HEAD_DIM
        and _library() is not None
    )


def heads_adjacent(x: torch.Tensor) -> bool:
    """A `[tokens, kv_heads, head_dim]` tensor whose rows hold their heads' values contiguously
    (the rows themselves may be strided)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def check_slots(pool: TokenToKVPool, slots: torch.Tensor) -> None:
    """Slots must be int64 rows of the pool's buffers: checked once per batch, since the kernel
    writes where it is told (an index_put would raise instead)."""
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError(f"slots must be 1-D int64, got {slots.dtype} {tuple(slots.shape)}")
    rows = pool.k_buffer[0].shape[0]
    if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < rows:
        raise ValueError(f"slots outside the pool's {rows} rows")


def store_kv(
    pool: TokenToKVPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """`pool.set_kv(layer, slots, k, v)` in one pass: `k`, `v` `[len(slots), kv_heads,
    head_dim]` (each head's values contiguous, heads adjacent; rows may be strided, as slices of
    a fused QKV output are). `slots` as `check_slots` wants them (checked by the caller)."""
    lib = _library()
    layout = pool.layout
    n = slots.shape[0]
    if lib is None or not usable(pool, k.dtype):
        raise ValueError(f"the CPU KV store cannot write {k.dtype} K/V into a {layout.dtype} pool")
    for x in (k, v):
        if x.dtype != k.dtype or x.shape != (n, layout.kv_heads, layout.head_dim):
            raise ValueError(f"K/V must be {k.dtype} [{n}, {layout.kv_heads}, {layout.head_dim}]")
        if not heads_adjacent(x):
            raise ValueError("each K/V row's heads must be contiguous")
    cpu_attention.check_pool_strides(*pool.get_kv_buffer(layer))
    if n == 0:
        return
    k_buf, v_buf = pool.get_kv_buffer(layer)
    k_scale, v_scale = pool.get_kv_scales(layer)
    quant = layout.quantized
    slots = slots.contiguous()
    done = lib.store_kv(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), int(k.dtype == torch.bfloat16),
        slots.data_ptr(), n, layout.kv_heads, layout.head_dim, CODE_KINDS.get(layout.dtype, 0),
        k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(0), k_buf.stride(1),
        k_scale.data_ptr() if quant else None, v_scale.data_ptr() if quant else None,
    )  # fmt: skip
    if not done:
        raise RuntimeError("the CPU KV store kernel refused the call")
