"""The decoder's small per-layer ops fused into one pass each (CPU, a small C kernel).

Between its matmuls a layer runs RMSNorm (7 torch ops), the residual adds, rotary embedding
(slices, a cat, three multiplies and an add) and SiLU-mul: each op a pass over the activations
and a dispatch, ~12 % of a bf16 decode step at batch 64 and ~15 % of a 4 x 1024 prefill
(`bench/profile_step.py`). `fused_ops.c` does two groups in one pass each:

- `add_rmsnorm`: the residual add and the next RMSNorm (SGLang's fused_add_rmsnorm): `x += delta`
  in place, returns the normed rows;
- `rope`: rotary embedding in place on the q and k heads of the fused QKV output, reading the
  cos/sin tables by position (no per-batch gather of the tables).

Each rounds where torch's op sequence rounds: rope's results equal torch's bit for bit, and the
norm's except where its float32 sum of squares, taken in another order, puts a value across a
bf16 rounding boundary (~5 in 10^6 elements). SiLU-mul stays torch's: a C loop as fast needs a
vector expf, whose last-bit differences from torch's flip ~1 in 10^3 bf16 results, for no
measurable gain. Used for bf16 models on the CPU (`usable`); float32 models keep torch's ops,
which match `transformers` bit for bit. `RADIXKV_FUSED_OPS=0` turns the fused ops off;
`LlamaForCausalLM.fused_ops` switches them per model (`bench/cpu_switches.py` alternates
both).
Compiled on first use like the decode kernel (`cbuild.py`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from radixkv.model import cbuild

MAX_HEAD_DIM = 1024  # the rope kernel's per-head buffers


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cbuild.load("fused_ops", ("cpu_kernels.h", "fused_ops.c"), "RADIXKV_FUSED_OPS",
                      "torch's ops")  # fmt: skip
    if lib is None:
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.add_rmsnorm.restype = lib.rope.restype = None
    lib.add_rmsnorm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i32, ctypes.c_float, i32]
    lib.rope.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32]
    return lib


def usable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model of this dtype on this device runs the fused ops: bf16 on the CPU, with
    the kernel compiled."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _library() is not None


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused CPU ops are not available")
    return lib


def _check(*tensors: torch.Tensor) -> int:
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused ops take float32 or bfloat16, not {dtype}")
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu":
            raise ValueError("fused ops take CPU tensors of one dtype")
        if t.dim() == 2 and t.stride(1) != 1:
            raise ValueError("fused ops need rows of contiguous elements")
    return int(dtype == torch.bfloat16)


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """`x += delta` in place (when given), then `weight * rmsnorm(x)` as a new `[rows, dim]`
    tensor. x and delta `[rows, dim]` (rows may be strided)."""
    rows, dim = x.shape
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{dim}]")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta {tuple(delta.shape)} does not match x {tuple(x.shape)}")
    is_bf16 = _check(x, weight, *(() if delta is None else (delta,)))
    out = torch.empty(rows, dim, dtype=x.dtype)
    _lib().add_rmsnorm(
        x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
        0 if delta is None else delta.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim,
        eps, is_bf16,
    )  # fmt: skip
    return out


def rope(
    x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor,
) -> None:  # fmt: skip
    """Rotate in place the first `heads` heads of each row of `x` `[rows, >= heads * head_dim]`
    (rows may be strided) by the angles of `positions` (int64 `[rows]`), from the tables
    `cos`, `sin` `[max_positions, head_dim]` (HF rotate_half). The positions are trusted to
    index the tables (the model checks them once per forward: `RotaryEmbedding.check`), as
    the decode kernel trusts its slots."""
    rows = x.shape[0]
    if head_dim % 2 or head_dim > MAX_HEAD_DIM or x.shape[1] < heads * head_dim:
        raise ValueError(f"cannot rotate {heads} heads of {head_dim} in rows of {x.shape[1]}")
    if cos.shape != sin.shape or cos.shape[1] != head_dim or not cos.is_contiguous():
        raise ValueError("cos and sin must be contiguous [positions, head_dim] tables")
    if not sin.is_contiguous():
        raise ValueError("cos and sin must be contiguous [positions, head_dim] tables")
    if positions.dtype != torch.int64 or positions.shape != (rows,):
        raise ValueError("positions must be int64 [rows]")
    is_bf16 = _check(x, cos, sin)
    positions = positions.contiguous()
    _lib().rope(
        x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows,
        heads, head_dim, is_bf16,
    )  # fmt: skip
