"""Pick the compute dtype: bf16 where the hardware is fast at it, float32 otherwise."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
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
# AMX tiles make bf16 matmul several times fp32. With AVX512-BF16 alone it depends on the chip:
# on the 2-core Xeon we first built on, bf16 ran at 0.57x fp32 (162 vs 286 GFLOP/s for 2048^3, 2
# threads); on the 2-core AMD EPYC of 2026-11-27, at 2.5x (432 vs 173 GFLOP/s). So there we measure.
_AMX_FLAGS = frozenset({"amx_bf16"})
_BF16_FLAGS = frozenset({"avx512_bf16"})
BF16_MIN_SPEEDUP = 1.2  # pick bf16 only when clearly faster: it costs precision

log = logging.getLogger("radixkv.model")


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


@functools.cache
def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of a decoder-shaped matmul ([256, 576] x [576, 1536]) on this CPU,
    best of 5 each (about 20 ms in all)."""

    def best(dtype: torch.dtype) -> float:
        x, w = torch.randn(256, 576).to(dtype), torch.randn(1536, 576).to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        speedup = best(torch.float32) / best(torch.bfloat16)
    log.info("bf16 matmul runs at %.2fx fp32 on this CPU", speedup)
    return speedup


def cpu_has_fast_bf16(
    flags: frozenset[str] | None = None, speedup: Callable[[], float] = bf16_matmul_speedup
) -> bool:
    """True with AMX-BF16 tiles, or with AVX512-BF16 where bf16 matmul measures faster."""
    flags = cpu_flags() if flags is None else flags
    if flags & _AMX_FLAGS:
        return True
    return bool(flags & _BF16_FLAGS) and speedup() >= BF16_MIN_SPEEDUP


def resolve_dtype(
    spec: str | torch.dtype = "auto",
    device: torch.device | str = "cpu",
    flags: frozenset[str] | None = None,
    speedup: Callable[[], float] = bf16_matmul_speedup,
) -> torch.dtype:
    """`auto` -> bf16 on CUDA, on CPUs with AMX, and on CPUs with AVX512-BF16 where a bf16 matmul
    measures at least 1.2x fp32; float32 otherwise (measured reasons above).

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
    return torch.bfloat16 if cpu_has_fast_bf16(flags, speedup) else torch.float32
