"""Quantized KV cache: one-byte codes with a scale per token and KV head.

`--kv-cache-dtype int8 | fp8_e4m3 | fp8_e5m2` stores each token's K (and V) head as `head_dim`
one-byte codes plus one bf16 scale, `amax(|x|) / QMAX` over that head's values, so the largest
value of every head maps to the code range's edge:

    codes = round(x / scale) (int8, clamped to +-127) or x / scale cast to fp8 (clamped to +-QMAX)
    x ~= codes * scale

Why per token and head: a token's K/V are written once (decode writes one token per step) and
never change, so a scale computed from the token's own values needs no state and no re-coding,
and an outlier in one token or head does not coarsen the others (a per-page scale would have to
be fixed before the page's later tokens are seen). The cost is 2 bytes per head: 66 bytes per
64-value head against 128 in bf16 (1.94x the tokens in the same memory; docs/model.md measures
the accuracy). The scale is stored in bf16 and the codes are computed with the stored (rounded)
value, so the rounding of the scale adds no error.

fp8 pools store keys in a rotated basis (`key_rotation`): the model maps each query and key
through one fixed orthogonal matrix after rope, which leaves every score q.k unchanged, and the
pool quantizes the rotated keys (QuaRot's online Hadamard rotation of K). This is measured, not
derived: on SmolLM2-135M (`bench/kv_quant.py`) it takes the perplexity cost of e4m3 keys from
+2.17 % to +0.41 % (e5m2: +7.6 % to +2.6 %), lower in every 1000-token stretch of the text,
although the RMS error of the scores falls only ~10 %. For int8 it made no consistent
difference (bf16 model +0.16 % plain, +0.34 % rotated; fp32 model +0.17 %, +0.11 %): int8 keys
are stored as they are. Values are never rotated (docs/quantization.md).
"""

from __future__ import annotations

import torch

# code dtype and the largest code magnitude used, per --kv-cache-dtype name
QUANTIZED = {
    "int8": (torch.int8, 127.0),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": (torch.float8_e5m2, 57344.0),
}
CODE_DTYPES = {dtype: qmax for dtype, qmax in QUANTIZED.values()}
SCALE_DTYPE = torch.bfloat16
_TINY = 2.0**-100  # the scale of an all-zero head: any positive value decodes its zeros exactly


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in CODE_DTYPES


def rotates_keys(dtype: torch.dtype) -> bool:
    """Whether a pool of `dtype` stores keys through `key_rotation` (the fp8 pools)."""
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def key_rotation(head_dim: int) -> torch.Tensor:
    """The orthogonal `[head_dim, head_dim]` float32 matrix fp8 pools store keys through:
    normalized Walsh-Hadamard blocks down the diagonal, one per power of two in `head_dim`
    (64 -> one block of 64; 96 -> 64 and 32), so any head size has one."""
    out = torch.zeros(head_dim, head_dim)
    start, size = 0, 1 << (head_dim.bit_length() - 1)
    while start < head_dim:
        if head_dim - start >= size:
            h = torch.ones(1, 1)
            while h.shape[0] < size:  # Sylvester's construction
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
            out[start : start + size, start : start + size] = h / size**0.5
            start += size
        size //= 2
    return out


def quantize(x: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., head_dim]` -> (codes `[..., head_dim]` of `code_dtype`, bf16 scales `[...]`)."""
    qmax = CODE_DTYPES[code_dtype]
    xf = x.float()
    scale = (xf.abs().amax(-1) / qmax).clamp_(min=_TINY).to(SCALE_DTYPE)
    scaled = (xf / scale.float()[..., None]).clamp_(-qmax, qmax)
    if code_dtype == torch.int8:
        return scaled.round_().to(torch.int8), scale
    return scaled.to(code_dtype), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes `[..., head_dim]` and scales `[...]` -> values in `dtype` (float32 math)."""
    return (codes.float() * scale.float()[..., None]).to(dtype)
