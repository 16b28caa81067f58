"""Decode attention that reads K/V straight from the paged pool (CPU, a small C kernel).

The torch path gathers every request's K and V into a workspace and then runs SDPA over it: the
context's K/V cross memory three times (read pool, write workspace, read workspace). This kernel
reads each request's K and V rows through its slot list once, with one online softmax per query
head; the grouped query heads of a KV head share each K/V row read (GQA). It is the CPU
counterpart of `radixkv.kernels`' Triton decode kernel, and what closes most of the gap between
fp32 decode and the memory roofline (docs/model.md).

The C source (`decode_attention.c`, beside this file) is compiled on first use (~6 s, once per
source and CPU; `cbuild.py`) and loaded with ctypes. Without a compiler (or with
`RADIXKV_CPU_KERNEL=0`) the backend keeps the gather + SDPA path; `available()` says which.
Where the compiler targets AVX512-BF16, bf16 K/V take the kernel's vector path (`fast_bf16()`);
`RADIXKV_CPU_KERNEL_AVX512=0` keeps them on the portable C loops (for A/B runs).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from radixkv.model import cbuild

MAX_HEADS = 64  # query heads the kernel supports
MAX_HEAD_DIM = 256
BLOCK = 32  # keys scored per block of the online softmax

_FILES = ("cpu_kernels.h", "decode_attention.c", "extend_attention.c")


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cbuild.load("attention", _FILES, "RADIXKV_CPU_KERNEL", "gather + SDPA")
    if lib is None:
        return None
    fn = lib.decode_attention
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # q, k, v
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # scales, kv kind
                   ctypes.c_int64, ctypes.c_int64,  # the pool's slot and head strides
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]  # fmt: skip
    lib.has_avx512_bf16.restype = ctypes.c_int
    lib.has_avx512_bf16.argtypes = []
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.extend_workspace.restype = i64
    lib.extend_workspace.argtypes = [ptr, ptr, i32, i32, i32]
    lib.extend_attention.restype = i32
    lib.extend_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, i32, i64, i64, ptr, i64, ptr, ptr,
                                     ptr, i32, i32, i32, i32, ctypes.c_float, ptr, ptr,
                                     ptr]  # fmt: skip
    return lib


def available() -> bool:
    """True when the compiled kernel can be used on this machine."""
    return _library() is not None


@functools.cache
def _avx512_enabled() -> bool:
    return os.environ.get("RADIXKV_CPU_KERNEL_AVX512", "1") != "0"


def fast_bf16() -> bool:
    """True when bf16 K/V with a head dim that is a multiple of 32 take the AVX512-BF16 path."""
    lib = _library()
    return lib is not None and bool(lib.has_avx512_bf16()) and _avx512_enabled()


# one-byte codes of a quantized pool, by the kernel's kv_kind (decode_attention.c)
CODE_KINDS = {torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


def supports(
    dtype: torch.dtype, num_heads: int, head_dim: int, kv_dtype: torch.dtype | None = None
) -> bool:
    """Shapes and dtypes the kernel handles (its per-thread buffers are sized for these): q in
    float32 or bf16, K/V in q's dtype (`kv_dtype` None) or one-byte codes with scales."""
    return (
        dtype in (torch.float32, torch.bfloat16)
        and kv_dtype in (None, dtype, *CODE_KINDS)
        and num_heads <= MAX_HEADS
        and (head_dim <= MAX_HEAD_DIM)
    )


def check_pool_strides(k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """The C kernels read a pool buffer `[slots, kv_heads, d]` through its slot and head strides
    (any order: slot-major, or the pool's head-major `[kv_heads, slots, d]` seen permuted) with
    each head's d values contiguous, K and V alike."""
    if k_buf.stride() != v_buf.stride() or k_buf.stride(2) != 1:
        raise ValueError(f"K/V buffers with strides {k_buf.stride()} and {v_buf.stride()}: "
                         "the kernels need equal strides and contiguous head dims")  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    kv_index: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    split: int = 0,
    rows: torch.Tensor | None = None,
    portable: bool = False,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`q [bs, heads, d]` attends to `kv_index[b, :seq_lens[b]]` rows of the pool buffers
    `[slots, kv_heads, d]`; returns `[bs, heads, d]` in q's dtype. All on the CPU; K/V in q's
    dtype, or one-byte codes (int8, fp8) with `scales` (the pool's bf16 `[slots, kv_heads]` K
    and V scales); `kv_index` and `seq_lens` int64. The slots themselves are trusted (they come
    from `ReqToTokenPool` rows). `split` (tests): 1 = a task per request, kv_heads = a task per
    (request, KV head), 0 = chosen by batch size and threads. With `rows` (int64 `[bs]`), query b
    reads `kv_index[rows[b]]`: the queries of an extend, each with its own causal length, share
    their request's row (deterministic mode: every attention is this kernel's). `portable`
    keeps the portable C loops where the AVX512-BF16 path would run (tests, A/B)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU decode attention kernel is not available")
    bs, heads, d = q.shape
    kvh = k_buf.shape[1]
    group = heads // kvh
    kind = CODE_KINDS.get(k_buf.dtype, 0)
    if not (
        supports(q.dtype, heads, d, k_buf.dtype)
        and k_buf.dtype == v_buf.dtype
        and (scales is not None) == bool(kind)
    ):
        raise ValueError(f"unsupported decode attention: q {q.dtype} {tuple(q.shape)}, K/V "
                         f"{k_buf.dtype} {tuple(k_buf.shape)}, scales given: "
                         f"{scales is not None}")  # fmt: skip
    k_scale = v_scale = None
    if scales is not None:
        k_scale, v_scale = scales
        if k_scale.dtype != torch.bfloat16 or k_scale.shape != k_buf.shape[:2]:
            raise ValueError(f"scales must be bf16 {tuple(k_buf.shape[:2])}")
        assert k_scale.is_contiguous() and v_scale.is_contiguous()
    if heads % kvh:
        raise ValueError(f"{heads} query heads do not group evenly over {kvh} KV heads")
    if kv_index.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("kv_index and seq_lens must be int64")
    longest = int(seq_lens.max()) if bs else 0
    if longest > kv_index.shape[1]:
        raise ValueError(f"a sequence of {longest} keys but rows of {kv_index.shape[1]} slots")
    q = q.contiguous()
    kv_index = kv_index.contiguous()
    seq_lens = seq_lens.contiguous()
    check_pool_strides(k_buf, v_buf)
    if rows is None:
        assert kv_index.shape[0] == bs
        rows_ptr = None
    else:
        rows = rows.contiguous()
        if rows.dtype != torch.int64 or rows.shape != (bs,):
            raise ValueError("rows must be int64 [bs]")
        if bs and not 0 <= int(rows.min()) <= int(rows.max()) < kv_index.shape[0]:
            raise ValueError(f"rows must index the {kv_index.shape[0]} rows of kv_index")
        rows_ptr = rows.data_ptr()
    out = torch.empty_like(q)
    lib.decode_attention(
        q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(),
        None if k_scale is None else k_scale.data_ptr(),
        None if v_scale is None else v_scale.data_ptr(), kind, k_buf.stride(0), k_buf.stride(1),
        kv_index.data_ptr(),
        kv_index.shape[1], rows_ptr, seq_lens.data_ptr(), out.data_ptr(), bs, kvh, group, d,
        scale, int(q.dtype == torch.bfloat16), split, int(portable or not _avx512_enabled()),
    )  # fmt: skip
    return out
