"""Pick the compute dtype: bf16 where the hardware is fast at it, float32 otherwise."""

from __future__ import annotations

from pathlib import Path

import torch

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# AMX only: on a CPU with AVX512-BF16 but no AMX (the 2-core Xeon we build on), a bf16 matmul runs
# at about 0.57x the fp32 rate (162 vs 286 GFLOP/s for 2048^3, 2 threads), so fp32 is the faster
# choice there for everything but batch-1 decode; `--dtype bf16` still selects it.
_BF16_CPU_FLAGS = frozenset({"amx_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU in `/proc/cpuinfo` (empty where it does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """True on CPUs with AMX-BF16 tiles (where bf16 matmul is several times fp32)."""
    return bool((cpu_flags() if flags is None else flags) & _BF16_CPU_FLAGS)


def resolve_dtype(
    spec: str | torch.dtype = "auto",
    device: torch.device | str = "cpu",
    flags: frozenset[str] | None = None,
) -> torch.dtype:
    """`auto` -> bf16 on CUDA and on CPUs with AMX, float32 otherwise (measured reason above).

    `spec` may also name a dtype (`fp32`, `bf16`, `fp16`, `float32`, ...) or be a `torch.dtype`.
    """
    if isinstance(spec, torch.dtype):
        return spec
    if spec != "auto":
        try:
            return _NAMES[spec.lower()]
        except KeyError:
            raise ValueError(
                f"unknown dtype {spec!r}; use auto or one of {', '.join(sorted(_NAMES))}"
            ) from None
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16(flags) else torch.float32
