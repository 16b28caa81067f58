"""KV store: scatter a batch's new K and V into one layer of the paged pool at `out_cache_loc`.

One program per (new token, KV head) copies `head_dim` contiguous elements of K and of V into the
slot `loc[token]` of the pool; the cast to the pool dtype happens in registers, so a bf16 pool fed
by an fp32 model needs no temporary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    loc_ptr,
    k_buf_ptr,
    v_buf_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_buf_slot,
    stride_buf_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    slot = tl.load(loc_ptr + token).to(tl.int64)
    k = tl.load(k_ptr + token * stride_k_tok + head * stride_k_head + offs_d, mask=mask_d)
    v = tl.load(v_ptr + token * stride_v_tok + head * stride_v_head + offs_d, mask=mask_d)
    dst = slot * stride_buf_slot + head * stride_buf_head + offs_d
    tl.store(k_buf_ptr + dst, k.to(k_buf_ptr.dtype.element_ty), mask=mask_d)
    tl.store(v_buf_ptr + dst, v.to(v_buf_ptr.dtype.element_ty), mask=mask_d)


def store_kv(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write `k`, `v` `[num_tokens, kv_heads, head_dim]` into rows `loc` `[num_tokens]` of the
    layer buffers `k_buffer`, `v_buffer` `[num_slots + page_size, kv_heads, head_dim]`.

    `k` and `v` may be strided views (e.g. slices of a fused QKV output) as long as their last
    dimension is contiguous. Slots in `loc` must be distinct (padding may repeat slot 0: its
    content is never read unmasked).
    """
    num_tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_buffer.shape[1:] != (kv_heads, head_dim):
        raise ValueError(
            f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)} and pool rows "
            f"{tuple(k_buffer.shape[1:])} must agree on [kv_heads, head_dim]"
        )
    if v_buffer.stride() != k_buffer.stride():
        raise ValueError("store_kv: K and V pool buffers must be laid out alike")
    if num_tokens == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _store_kv_kernel[(num_tokens, kv_heads)](
        k,
        v,
        loc,
        k_buffer,
        v_buffer,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
