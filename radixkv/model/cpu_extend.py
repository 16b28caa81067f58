"""Extend (prefill) attention that reads K/V straight from the paged pool (CPU, AVX512-BF16).

The torch backend attended an extend batch with SDPA: one `is_causal` call for prompts of one
length with nothing cached, two calls merged by log-sum-exp over a gathered prefix, or a padded
call with a `[bs, extend, seq]` mask; CPU SDPA's flash kernel ran a 4 x 1024 causal prefill at
~100 GFLOP/s, a quarter of this machine's bf16 matmul peak. `extend_attention.c` (compiled into
the decode kernel's library, `cpu_attention.py`) handles every extend alike: each request's
queries attend to its row of slots up to their own positions, with no padding, mask or gather
into the batch's shape. It packs each request's K and V once per layer into the layouts its
VDPBF16PS loops stream, then computes blocks of 32 query tokens x 32 keys with an online
softmax (design in the C file; figures in docs/model.md, from `bench/cpu_switches.py --switch
extend_kernel`). A request with one new token (a decoding request riding in a prefill batch) is
not packed: its row attends from the pool on the decode kernel's path.

Used by the torch backend for bf16 models over a bf16 or quantized (int8, fp8) KV pool where the
library has the AVX512-BF16 path (`usable`): codes are turned into bf16 values (code x scale, as
the pool's `dequantize`) by the packing; `RADIXKV_EXTEND_KERNEL=0` keeps SDPA (A/B runs).
"""

from __future__ import annotations

import os

import torch

from radixkv.model import cpu_attention

MAX_HEAD_DIM = 256
MAX_GROUP = 128  # query heads per KV head (a task's rows: tokens x group <= 128)


def usable(dtype: torch.dtype, kv_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
           head_dim: int) -> bool:  # fmt: skip
    """Whether extend batches of this shape can take the kernel here."""
    return (
        os.environ.get("RADIXKV_EXTEND_KERNEL", "1") != "0"
        and dtype == torch.bfloat16
        and (kv_dtype == torch.bfloat16 or kv_dtype in cpu_attention.CODE_KINDS)
        and head_dim % 32 == 0
        and head_dim <= MAX_HEAD_DIM
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_GROUP
        and num_heads <= cpu_attention.MAX_HEADS  # one-token requests take the decode path
        and cpu_attention.fast_bf16()
    )


def extend_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    kv_index: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
    workspace: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`q [tokens, heads, d]` (request b's `extend_lens[b]` queries packed in order, at positions
    `prefix_lens[b] + i`) attends causally to `kv_index[b, :prefix_lens[b] + extend_lens[b]]`
    rows of the pool buffers `[slots, kv_heads, d]` (the new tokens' K/V already written);
    returns `[tokens, heads, d]`. q bf16, K/V bf16 or one-byte codes with `scales` (the pool's
    bf16 `[slots, kv_heads]` K and V scales), on the CPU; index tensors int64; the slots trusted
    (they come from `ReqToTokenPool` rows). `workspace`: a bf16 tensor reused across calls
    (grown here when short; a fresh one per layer costs page faults), else one is made."""
    lib = cpu_attention._library()
    tokens, heads, d = q.shape
    kvh = k_buf.shape[1]
    bs = prefix_lens.shape[0]
    if lib is None or not usable(q.dtype, k_buf.dtype, heads, kvh, d):
        raise ValueError(f"unsupported extend attention: q {q.dtype} {tuple(q.shape)}, K/V "
                         f"{k_buf.dtype} {tuple(k_buf.shape)}")  # fmt: skip
    if v_buf.dtype != k_buf.dtype or v_buf.shape != k_buf.shape or k_buf.shape[2] != d:
        raise ValueError(f"K/V buffers {tuple(k_buf.shape)}, {tuple(v_buf.shape)} do not hold "
                         f"heads of {d}")  # fmt: skip
    kind = cpu_attention.CODE_KINDS.get(k_buf.dtype, 0)
    if (scales is not None) != bool(kind):
        raise ValueError("scales go with a quantized pool, and only with one")
    if scales is not None and any(
        x.dtype != torch.bfloat16 or x.shape != k_buf.shape[:2] or not x.is_contiguous()
        for x in scales
    ):
        raise ValueError(f"scales must be contiguous bf16 {tuple(k_buf.shape[:2])}")
    for name, t in (("kv_index", kv_index), ("prefix_lens", prefix_lens),
                    ("extend_lens", extend_lens)):  # fmt: skip
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64")
    if extend_lens.shape != (bs,) or kv_index.shape[0] != bs:
        raise ValueError("one prefix length, extend length and kv_index row per request")
    if bs and (int(prefix_lens.min()) < 0 or int(extend_lens.min()) < 0):
        raise ValueError("lengths cannot be negative")
    seq_lens = (prefix_lens + extend_lens).contiguous()
    if int(extend_lens.sum()) != tokens or (bs and int(seq_lens.max()) > kv_index.shape[1]):
        raise ValueError("the queries or the sequences do not fit the lengths given")
    q = q.contiguous()
    kv_index = kv_index.contiguous()
    prefix_lens, extend_lens = prefix_lens.contiguous(), extend_lens.contiguous()
    cpu_attention.check_pool_strides(k_buf, v_buf)
    q_start = (torch.cumsum(extend_lens, 0) - extend_lens).contiguous()
    need = lib.extend_workspace(seq_lens.data_ptr(), extend_lens.data_ptr(), bs, kvh, d)
    if workspace is None or workspace.numel() < 2 * need or workspace.dtype != torch.bfloat16:
        workspace = torch.empty(2 * need, dtype=torch.bfloat16)
    ws_k, ws_v = workspace[:need], workspace[need : 2 * need]
    out = torch.empty_like(q)
    done = lib.extend_attention(
        q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(),
        None if scales is None else scales[0].data_ptr(),
        None if scales is None else scales[1].data_ptr(), kind, k_buf.stride(0), k_buf.stride(1),
        kv_index.data_ptr(),
        kv_index.shape[1], prefix_lens.data_ptr(), extend_lens.data_ptr(), q_start.data_ptr(),
        bs, kvh, heads // kvh, d, scale, ws_k.data_ptr(), ws_v.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if not done:
        raise RuntimeError("the attention library was built without AVX512-BF16")
    return out
