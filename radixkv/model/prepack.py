"""Linear layers with their weights reordered once for oneDNN (CPU).

torch's default CPU GEMM re-packs the weight on every call; for the small-M matmuls of decode
(M = batch size) that overhead dominates. oneDNN's `_reorder_linear_weight` does it once, at load,
into the blocked layout its kernels read. Measured here (2 threads, fp32, M = 32): gate/up
576->3072 1.0 -> 0.57 ms, LM head 576->49152 31 -> 11.6 ms; bf16 gains are smaller but real
(`docs/model.md`). Prefill shapes (M = 512) gain 5-20%.

The ops are torch-internal (`torch.ops.mkldnn`), so packing checks itself: each packed layer must
reproduce `F.linear` on a probe input, and any failure (no oneDNN, a torch that renamed the ops, an
unsupported dtype) leaves the model on plain `nn.Linear`. `RADIXKV_PREPACK=0` turns it off, for
A/B measurements.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("radixkv.model")

PACKABLE = (torch.float32, torch.bfloat16)


def _onednn_linear_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """`y = x W^T + b` with W held in oneDNN's blocked layout (an opaque tensor)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()
        # 2 in deterministic mode: oneDNN multiplies a single row by another kernel (a GEMV)
        # whose sums differ in the last bits from its GEMM's, which gives a row the same result
        # whatever the other rows (`row_invariant`); so one row is computed as two
        self.min_rows = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows < self.min_rows:
            x = torch.cat([x, x.new_zeros((self.min_rows - rows, *x.shape[1:]))])
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, "none", [], ""
        )
        return out[:rows] if rows < self.min_rows else out

    def row_invariant(self, trials: int = 3) -> bool:
        """Whether, with min_rows 2, a row's result is bit for bit the same in batches of 2 to
        512 rows (measured on random rows with a spread of magnitudes, as activations have)."""
        gen = torch.Generator().manual_seed(0)
        dtype = self.weight_dtype
        saved, self.min_rows = self.min_rows, 2
        try:
            for _ in range(trials):
                scale = torch.rand(512, 1, generator=gen) * 8
                x = (torch.randn(512, self.in_features, generator=gen) * scale).to(dtype)
                want = self(x[:1])
                for rows in (2, 3, 8, 17, 64, 512):
                    if not torch.equal(self(x[:rows])[:1], want):
                        return False
        finally:
            self.min_rows = saved
        return True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, oneDNN-packed"


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear | None:
    """A checked PackedLinear for this weight, or None where packing is unavailable or wrong."""
    if os.environ.get("RADIXKV_PREPACK", "1") == "0" or not _onednn_linear_available():
        return None
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE or weight.dim() != 2:
        return None
    try:
        layer = PackedLinear(weight, bias)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.dtype)
        with torch.inference_mode():
            got = layer(probe).float()
            want = F.linear(probe, weight, bias).float()
        tol = 1e-4 if weight.dtype == torch.float32 else 3e-2
        if not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
            log.warning("oneDNN packed linear disagrees with F.linear; using plain linear")
            return None
    except (RuntimeError, AttributeError, TypeError) as exc:
        log.info("oneDNN weight packing unavailable (%s); using plain linear", exc)
        return None
    return layer


def make_row_invariant(body: nn.Module, head: nn.Module | None) -> None:
    """Deterministic mode: every projection of `body` and the LM `head` give a row the same
    result in any batch. Raises RuntimeError where that cannot be had (a layer not packed, or
    oneDNN's kernels here not row-invariant), so that the mode is never claimed without holding."""
    layers = [m for m in body.modules() if isinstance(m, PackedLinear)]
    plain = [m for m in body.modules() if isinstance(m, nn.Linear)]
    if plain or not layers or not isinstance(head, PackedLinear):
        raise RuntimeError(
            "deterministic inference needs every projection packed for oneDNN (prepack.py), and "
            "packing is unavailable here"
        )
    checked: dict[tuple[int, int], bool] = {}
    for layer in [*layers, head]:
        shape = (layer.in_features, layer.out_features)
        if shape not in checked:
            checked[shape] = layer.row_invariant()
        if not checked[shape]:
            raise RuntimeError(
                f"oneDNN's matmul on this CPU gives a row different results in different batch "
                f"sizes ({shape[0]} -> {shape[1]}): deterministic inference cannot be had here"
            )
        layer.min_rows = 2


def prepack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` in `model` by a PackedLinear where that works; returns how many
    were replaced. Idempotent."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = pack_weight(child.weight, child.bias)
                if packed is None:
                    return replaced
                setattr(parent, name, packed)
                replaced += 1
    return replaced
