"""Decode attention over the paged KV pool: split-K over the sequence, then a log-sum-exp merge.

Each request has one query token. Its keys are read through a slot list: `kv_indices[kv_start[b]
+ j]` for `j < kv_lens[b]` is the pool slot of token j. The same kernel serves both layouts:

    ReqToTokenPool rows   kv_indices = req_to_token (flat), kv_start = req_rows * row stride
    packed slot lists     kv_indices = kv_indices,          kv_start = kv_indptr[:-1]

Stage 1, grid `(bs, kv_heads * head_blocks, num_splits)`: a program takes one request, one block
of up to BLOCK_H query heads that share a KV head (GQA: the K/V tile is loaded once for the whole
group) and one contiguous chunk of the sequence; it runs an online softmax over its chunk and
writes the normalised partial output and its log-sum-exp (base 2) to fp32 scratch.
Stage 2, grid `(bs, heads)`: merges the splits, weighting each by `2^(lse_s - max lse)`.
Splits that received no keys (short requests) store lse = -inf and weigh nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixkv.mem.kv_quant import is_quantized

LOG2E = 1.4426950408889634
BLOCK_H = 16  # query heads per program: tl.dot needs M >= 16 on GPUs; unused rows are masked
BLOCK_N = 64  # keys per inner step
MIN_SPLIT_LEN = 256  # do not split below this many keys per chunk: merge cost would dominate


@triton.jit
def tile_dot(a, b, DOT_F32: tl.constexpr):
    """`a @ b` with fp32 accumulation. With DOT_F32 the operands are first widened to fp32 (exact)
    and multiplied in IEEE fp32: used for fp32 models (no TF32 rounding) and under the Triton
    interpreter, whose `tl.dot` multiplies the raw uint16 bit patterns of bf16 operands
    (triton-lang/triton#11584). Otherwise the native bf16/fp16 tensor-core dot."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def load_kv(
    buf_ptr, scale_ptr, slots, kv_head, offs_d, mask, stride_slot, stride_head, stride_scale,
    QUANT: tl.constexpr,
):  # fmt: skip
    """A `[keys, head_dim]` tile of one KV head from the pool; from a quantized pool, the codes
    times each key's scale (float32)."""
    off = slots[:, None] * stride_slot + kv_head * stride_head + offs_d[None, :]
    if QUANT:  # (no `other=` for fp8 pointers: zero the masked entries after the load)
        scale = tl.load(scale_ptr + slots * stride_scale + kv_head).to(tl.float32)
        x = tl.where(mask, tl.load(buf_ptr + off, mask=mask).to(tl.float32) * scale[:, None], 0.0)
    else:
        x = tl.load(buf_ptr + off, mask=mask, other=0.0)
    return x


def pool_scales(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The scale tensors a kernel is given, and whether the pool is quantized (codes need them;
    an unquantized pool passes its own buffers, never read)."""
    quant = is_quantized(k_buffer.dtype)
    if quant != (scales is not None):
        raise ValueError(f"a {k_buffer.dtype} pool needs its scales exactly when quantized")
    return (*(scales if scales is not None else (k_buffer, v_buffer)), quant)


@triton.jit
def dot_operand(x, q, DOT_F32: tl.constexpr):
    """A K or V tile as a dot operand: float32 where dots run in fp32 (exact from any pool
    dtype, decoded codes included), else q's dtype (tensor cores)."""
    return x.to(tl.float32) if DOT_F32 else x.to(q.dtype)


def use_f32_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether kernels must widen dot operands to fp32 (see `tile_dot`)."""
    return dtype == torch.float32 or device.type != "cuda"


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_buf_ptr,
    v_buf_ptr,
    kv_indices_ptr,
    kv_start_ptr,
    kv_lens_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_buf_slot,
    stride_buf_head,
    stride_scale,
    stride_mid_b,
    stride_mid_h,
    stride_mid_s,
    stride_lse_b,
    stride_lse_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    blocks_per_kv_head: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
    kv_head = head_block // blocks_per_kv_head
    in_group = (head_block % blocks_per_kv_head) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = in_group < GROUP
    heads = kv_head * GROUP + in_group
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    kv_start = tl.load(kv_start_ptr + b).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    # Chunks are whole BLOCK_N tiles, so a short request leaves its last splits empty.
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    q = tl.load(
        q_ptr + b * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slots = tl.load(kv_indices_ptr + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = load_kv(
            k_buf_ptr, k_scale_ptr, slots, kv_head, offs_d, kv_mask, stride_buf_slot,
            stride_buf_head, stride_scale, QUANT,
        )  # fmt: skip
        k = dot_operand(k, q, DOT_F32)
        qk = tile_dot(q, tl.trans(k), DOT_F32) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        v = load_kv(
            v_buf_ptr, v_scale_ptr, slots, kv_head, offs_d, kv_mask, stride_buf_slot,
            stride_buf_head, stride_scale, QUANT,
        )  # fmt: skip
        v = dot_operand(v, q, DOT_F32)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, DOT_F32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    mid = b * stride_mid_b + heads * stride_mid_h + split * stride_mid_s
    mask_hd = mask_h[:, None] & mask_d[None, :]
    tl.store(mid_o_ptr + mid[:, None] + offs_d[None, :], out, mask=mask_hd)
    tl.store(mid_lse_ptr + b * stride_lse_b + heads * stride_lse_h + split, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    num_splits,
    stride_mid_b,
    stride_mid_h,
    stride_mid_s,
    stride_lse_b,
    stride_lse_h,
    stride_out_tok,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mid = b * stride_mid_b + head * stride_mid_h + offs_s * stride_mid_s
    lse_off = b * stride_lse_b + head * stride_lse_h + offs_s
    lse = tl.load(mid_lse_ptr + lse_off, mask=mask_s, other=float("-inf"))
    # Split 0 always holds keys (every request has at least one), so the max is finite.
    weight = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(
        mid_o_ptr + mid[:, None] + offs_d[None, :],
        mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(o * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(
        out_ptr + b * stride_out_tok + head * stride_out_head + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def choose_num_kv_splits(
    batch_size: int, kv_heads: int, max_seq_len: int, num_sms: int = 132, max_splits: int = 16
) -> int:
    """Splits per request so that `bs * kv_heads * splits` programs fill about two waves of
    `num_sms` SMs, without chunks shorter than `MIN_SPLIT_LEN` keys."""
    by_length = triton.cdiv(max_seq_len, MIN_SPLIT_LEN)
    by_occupancy = triton.cdiv(2 * num_sms, max(1, batch_size * kv_heads))
    return max(1, min(max_splits, by_length, by_occupancy))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_start: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    scale: float,
    num_kv_splits: int,
    out: torch.Tensor | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one query token per request to its keys in the pool (one-byte codes with
    their bf16 `[slots, kv_heads]` K and V `scales` when the pool is quantized).

    `q` `[bs, heads, head_dim]` (last dim contiguous); `k_buffer`/`v_buffer` `[slots, kv_heads,
    head_dim]`; `kv_indices` int32/int64 (any shape, read flat); `kv_start`, `kv_lens` `[bs]`
    (every `kv_lens[b] >= 1`). Returns `out` `[bs, heads, head_dim]` in `q`'s dtype. `mid_o`
    `[bs, heads, num_kv_splits, head_dim]` and `mid_lse` `[bs, heads, num_kv_splits]` (fp32)
    may be passed to reuse scratch across layers.
    """
    bs, heads, head_dim = q.shape
    kv_heads = k_buffer.shape[1]
    if heads % kv_heads or k_buffer.shape[2] != head_dim or v_buffer.stride() != k_buffer.stride():
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} does not fit the pool {tuple(k_buffer.shape)} "
            "(heads must be a multiple of kv_heads, head dims equal, K and V laid out alike)"
        )
    group = heads // kv_heads
    if q.stride(2) != 1:
        q = q.contiguous()
    if mid_lse is None:
        mid_lse = torch.empty((bs, heads, num_kv_splits), dtype=torch.float32, device=q.device)
    if mid_o is None:
        mid_o = mid_lse.new_empty((bs, heads, num_kv_splits, head_dim))
    if out is None:
        out = q.new_empty((bs, heads, head_dim))
    if bs == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    grid = (bs, kv_heads * triton.cdiv(group, BLOCK_H), num_kv_splits)
    k_scale, v_scale, quant = pool_scales(k_buffer, v_buffer, scales)
    _decode_split_kernel[grid](
        q, k_buffer, v_buffer, kv_indices, kv_start, kv_lens, mid_o, mid_lse, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), k_scale.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        DOT_F32=use_f32_dot(q.dtype, q.device), QUANT=quant,
    )  # fmt: skip
    _decode_merge_kernel[(bs, heads)](
        mid_o, mid_lse, out, num_kv_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_kv_splits),
    )  # fmt: skip
    return out
