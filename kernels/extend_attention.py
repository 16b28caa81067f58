"""Extend (prefill) attention: new tokens attend to their cached prefix and causally to themselves.

Request b owns packed query rows `[extend_start[b], + extend_lens[b])`. Its cached prefix (positions
`[0, prefix_lens[b])`) is read through the slot list `kv_indices[kv_start[b] + j]` (a
`ReqToTokenPool` row or a packed `kv_indices` range); its new tokens' K/V are read straight from the
contiguous `k`/`v` of this step, rounded through the pool dtype so the result equals reading them
back from the pool.

Grid `(bs, heads, cdiv(max_extend_len, BLOCK_M))`: one program per (request, query head, block of
BLOCK_M new tokens). It keeps one online softmax (running max, sum, accumulator in fp32) across two
key loops: the prefix tiles (gathered by slot, no mask but the length) and the new-token tiles up to
the block's causal frontier (key j visible to query i iff j <= i). Blocks past a short request's
length do nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixkv.kernels.decode_attention import (
    LOG2E,
    dot_operand,
    load_kv,
    pool_scales,
    tile_dot,
    use_f32_dot,
)

BLOCK_M = 64  # new tokens (queries) per program


@triton.jit
def _extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    k_buf_ptr,
    v_buf_ptr,
    kv_indices_ptr,
    kv_start_ptr,
    prefix_lens_ptr,
    extend_start_ptr,
    extend_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    stride_buf_slot,
    stride_buf_head,
    stride_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_start = tl.program_id(2) * BLOCK_M
    kv_head = head // GROUP
    ext_len = tl.load(extend_lens_ptr + b).to(tl.int32)
    if m_start < ext_len:
        ext_start = tl.load(extend_start_ptr + b).to(tl.int64)
        prefix_len = tl.load(prefix_lens_ptr + b).to(tl.int32)
        kv_start = tl.load(kv_start_ptr + b).to(tl.int64)
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < ext_len
        mask_d = offs_d < HEAD_DIM
        rows = ext_start + offs_m
        q = tl.load(
            q_ptr + rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        kv_dtype = k_buf_ptr.dtype.element_ty
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Cached prefix, through the slot indirection. Every query sees every prefix key, so each
        # tile has a valid column for every row and the running max turns finite at once.
        for start in range(0, prefix_len, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < prefix_len
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

        # New tokens, contiguous in this step's k/v, causal. The first tile holds key 0, which
        # every query sees, so no row is ever fully masked while its max is still -inf.
        causal_end = tl.minimum(ext_len, m_start + BLOCK_M)
        for start in range(0, causal_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < ext_len
            kv_rows = ext_start + offs_n
            kv_mask = mask_n[:, None] & mask_d[None, :]
            if QUANT:  # as stored (the new tokens' slots follow the prefix in the slot list)
                slots = tl.load(
                    kv_indices_ptr + kv_start + prefix_len + offs_n, mask=mask_n, other=0
                ).to(tl.int64)
                k = load_kv(
                    k_buf_ptr, k_scale_ptr, slots, kv_head, offs_d, kv_mask, stride_buf_slot,
                    stride_buf_head, stride_scale, QUANT,
                )  # fmt: skip
            else:
                k = tl.load(
                    k_ptr + kv_rows[:, None] * stride_k_tok + kv_head * stride_k_head
                    + offs_d[None, :], mask=kv_mask, other=0.0,
                ).to(kv_dtype)  # fmt: skip
            k = dot_operand(k, q, DOT_F32)
            qk = tile_dot(q, tl.trans(k), DOT_F32) * qk_scale
            visible = mask_n[None, :] & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            if QUANT:
                v = load_kv(
                    v_buf_ptr, v_scale_ptr, slots, kv_head, offs_d, kv_mask, stride_buf_slot,
                    stride_buf_head, stride_scale, QUANT,
                )  # fmt: skip
            else:
                v = tl.load(
                    v_ptr + kv_rows[:, None] * stride_v_tok + kv_head * stride_v_head
                    + offs_d[None, :], mask=kv_mask, other=0.0,
                ).to(kv_dtype)  # fmt: skip
            v = dot_operand(v, q, DOT_F32)
            acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, DOT_F32)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            out_ptr + rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_start: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_start: torch.Tensor,
    extend_lens: torch.Tensor,
    max_extend_len: int,
    *,
    scale: float,
    out: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of a packed batch of new tokens over their prefixes and themselves.
    A quantized pool (one-byte codes, its bf16 K and V `scales`) is read as stored for every
    key, the new tokens' too (they were stored first): the same values a cached prefix gives.

    `q` `[num_tokens, heads, head_dim]`, `k`/`v` `[num_tokens, kv_heads, head_dim]` (this step's
    new K/V, packed like `q`; last dims contiguous); `k_buffer`/`v_buffer` the layer's pool;
    `kv_indices` the slot lists read flat from `kv_start[b]`; `prefix_lens`, `extend_start`,
    `extend_lens` `[bs]`; `max_extend_len` a host int (sizes the grid). Returns `out`
    `[num_tokens, heads, head_dim]` in `q`'s dtype.
    """
    num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads or k_buffer.shape[1:] != k.shape[1:] or k.shape != v.shape:
        raise ValueError(
            f"extend_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and "
            f"pool rows {tuple(k_buffer.shape[1:])} disagree on heads or head_dim"
        )
    if v_buffer.stride() != k_buffer.stride():
        raise ValueError("extend_attention: K and V pool buffers must be laid out alike")
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = q.new_empty((num_tokens, heads, head_dim))
    bs = extend_lens.shape[0]
    if bs == 0 or num_tokens == 0:
        return out
    block_n = 64 if head_dim <= 64 else 32  # keep the K/V tiles of a 128-dim head in registers
    grid = (bs, heads, triton.cdiv(max_extend_len, BLOCK_M))
    k_scale, v_scale, quant = pool_scales(k_buffer, v_buffer, scales)
    _extend_kernel[grid](
        q, k, v, out, k_buffer, v_buffer, kv_indices, kv_start, prefix_lens, extend_start,
        extend_lens, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), k_buffer.stride(0), k_buffer.stride(1), k_scale.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, DOT_F32=use_f32_dot(q.dtype, q.device), QUANT=quant,
    )  # fmt: skip
    return out
