"""Pick the compute dtype: bf16 where the hardware is fast at it, float32 otherwise.

`auto` decides from the CPU's features where they settle it (AMX: bf16; no AVX512-BF16: fp32);
with AVX512-BF16 alone it depends on the chip, so it reads a measurement made once per CPU, thread
count and torch version and kept on disk, never a timing at every start.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
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


def measure_bf16_speedup(rounds: int = 9) -> float:
    """fp32 time / bf16 time of a decoder-shaped matmul ([256, 576] x [576, 1536]): the median of
    `rounds` ratios, each of the best of 3 calls per dtype, the dtypes interleaved so that a burst
    of load hits both (about 0.1 s in all)."""

    def best(x: torch.Tensor, w: torch.Tensor) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - start)
        return min(times)

    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(256, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    x16, w16 = x32.to(torch.bfloat16), w32.to(torch.bfloat16)
    with torch.inference_mode():
        torch.nn.functional.linear(x32, w32), torch.nn.functional.linear(x16, w16)  # warm-up
        ratios = sorted(best(x32, w32) / best(x16, w16) for _ in range(rounds))
    return ratios[len(ratios) // 2]


def cache_root() -> Path:
    """radixkv's per-machine cache: `$RADIXKV_CACHE_DIR`, default `~/.cache/radixkv`."""
    return Path(os.environ.get("RADIXKV_CACHE_DIR") or Path.home() / ".cache" / "radixkv")


def cpu_identity(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name and feature flags: what compiled code and measurements depend on."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return "unknown"
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or "unknown"


def _speedup_cache() -> Path:
    """Where the measurement of this CPU (model, flags), thread count and torch is kept."""
    ident = "\0".join((cpu_identity(), str(torch.get_num_threads()), torch.__version__))
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_root() / "dtype" / f"bf16_speedup_{key}.json"


@functools.cache
def bf16_matmul_speedup() -> float:
    """`measure_bf16_speedup()` on this machine, measured once and then read from the cache
    (`$RADIXKV_CACHE_DIR/dtype/`, default `~/.cache/radixkv`): the dtype `auto` picks must not
    depend on how busy the machine happens to be at each start (a timing at every start swung
    1.9x-7.4x under load). Delete the file to measure again."""
    path = _speedup_cache()
    try:
        speedup = float(json.loads(path.read_text())["bf16_speedup"])
        log.info("bf16 matmul runs at %.2fx fp32 on this CPU (measured before, %s)", speedup, path)
        return speedup
    except (OSError, ValueError, KeyError, TypeError):
        pass
    speedup = measure_bf16_speedup()
    log.info("bf16 matmul runs at %.2fx fp32 on this CPU (measured now; kept in %s)", speedup, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bf16_speedup": speedup, "cpu": cpu_identity()[:200]}))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measured at every start, as before
        log.warning("cannot keep the bf16 measurement in %s: %s", path, exc)
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
