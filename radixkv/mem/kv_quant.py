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
