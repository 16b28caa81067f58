"""KV store: scatter a batch's new K and V into one layer of the paged pool at `out_cache_loc`.

One program per (new token, KV head) copies `head_dim` contiguous elements of K and of V into the
slot `loc[token]` of the pool; the cast to the pool dtype happens in registers, so a bf16 pool fed
by an fp32 model needs no temporary. A quantized pool (`radixkv/mem/kv_quant.py`) gets one-byte
codes and the head's bf16 scale, computed in registers exactly as `kv_quant.quantize` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixkv.mem.kv_quant import CODE_DTYPES, is_quantized

# fp8 formats: mantissa bits and the smallest normal exponent
_FP8_GRID = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    odd = r - 2.0 * tl.floor(r * 0.5)
    return tl.where((r - y == 0.5) & (odd != 0.0), r - 1.0, r)


@triton.jit
def _quantize_head(x, QMAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """One head's values -> (codes, scale; float32, the scale bf16-exact): `kv_quant.quantize`
    in registers.
    fp8 (MANT_BITS 3 or 2, MIN_EXP its smallest normal exponent): the value is rounded to the
    format's grid here (half to even, as torch's cast), so the cast to fp8 is exact. Triton
    3.9's interpreter rounds fp32 -> fp8 without carrying into the exponent (31.8 -> 16 in
    e4m3), which this also avoids."""
    xf = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(xf), 0) / QMAX, 2.0**-100)
    # to bf16 by round-half-even on the bits (the interpreter's cast truncates), then exact
    bits = scale.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    scale = bits.to(tl.float32, bitcast=True)
    y = tl.minimum(tl.maximum(xf / scale, -QMAX), QMAX)
    if MANT_BITS == 0:  # int8
        return _round_half_even(y), scale
    exponent = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased float32 exponent
    exponent = tl.maximum(exponent, MIN_EXP + 127)  # subnormal codes: the smallest step
    step = ((exponent - MANT_BITS) << 23).to(tl.float32, bitcast=True)  # 2^(e - MANT_BITS)
    return _round_half_even(y / step) * step, scale


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    loc_ptr,
    k_buf_ptr,
    v_buf_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_buf_slot,
    stride_buf_head,
    stride_scale_slot,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    slot = tl.load(loc_ptr + token).to(tl.int64)
    k = tl.load(k_ptr + token * stride_k_tok + head * stride_k_head + offs_d, mask=mask_d, other=0)
    v = tl.load(v_ptr + token * stride_v_tok + head * stride_v_head + offs_d, mask=mask_d, other=0)
    dst = slot * stride_buf_slot + head * stride_buf_head + offs_d
    if QUANT:
        k_codes, k_scale = _quantize_head(k, QMAX, MANT_BITS, MIN_EXP)
        v_codes, v_scale = _quantize_head(v, QMAX, MANT_BITS, MIN_EXP)
        tl.store(k_buf_ptr + dst, k_codes.to(k_buf_ptr.dtype.element_ty), mask=mask_d)
        tl.store(v_buf_ptr + dst, v_codes.to(v_buf_ptr.dtype.element_ty), mask=mask_d)
        tl.store(k_scale_ptr + slot * stride_scale_slot + head, k_scale.to(tl.bfloat16))
        tl.store(v_scale_ptr + slot * stride_scale_slot + head, v_scale.to(tl.bfloat16))
    else:
        tl.store(k_buf_ptr + dst, k.to(k_buf_ptr.dtype.element_ty), mask=mask_d)
        tl.store(v_buf_ptr + dst, v.to(v_buf_ptr.dtype.element_ty), mask=mask_d)


def store_kv(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write `k`, `v` `[num_tokens, kv_heads, head_dim]` into rows `loc` `[num_tokens]` of the
    layer buffers `k_buffer`, `v_buffer` `[num_slots + page_size, kv_heads, head_dim]`; for a
    quantized pool (one-byte code buffers), `scales` are its bf16 `[slots, kv_heads]` K and V
    scales, written beside the codes.

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
    quant = is_quantized(k_buffer.dtype)
    if quant != (scales is not None):
        raise ValueError(f"store_kv: a {k_buffer.dtype} pool needs scales exactly when quantized")
    k_scale, v_scale = scales if scales is not None else (k_buffer, v_buffer)  # unused otherwise
    _store_kv_kernel[(num_tokens, kv_heads)](
        k,
        v,
        loc,
        k_buffer,
        v_buffer,
        k_scale,
        v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        k_scale.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT=quant,
        QMAX=CODE_DTYPES.get(k_buffer.dtype, 0.0),
        MANT_BITS=_FP8_GRID.get(k_buffer.dtype, (0, 0))[0],
        MIN_EXP=_FP8_GRID.get(k_buffer.dtype, (0, 0))[1],
    )
