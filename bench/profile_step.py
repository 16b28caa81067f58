"""Where a scheduler step's time goes: matmuls, attention, the small per-layer ops, sampling, and
the host work around the model (admission, batch building, output processing, encoding).

    python bench/profile_step.py [--requests 64] [--context 1024] [--steps 8] [--dtype auto]
                                 [--kv-cache-dtype auto] [--torch-profile]

FLOPs are the model's (projections, attention scores and values, the LM head of each sampled
row), as `ModelConfig.flops_per_token` counts them. The real `Scheduler` runs in this process
with `--requests` prompts of `--context` distinct tokens (no shared prefix). Measured: one
prefill step (the scheduler's first batch, up to `--max-prefill-tokens` new tokens), then, once
every request is decoding, `--steps` decode steps of the whole batch. Wall-clock timers wrap the
model forward, every projection (`PackedLinear`, the LM head included), every attention call and
the sampler; "small ops" is the forward minus projections and attention (norms, rotary, SiLU-mul,
residual adds, gathers, embedding), "host" is the step minus forward and sampling, and "encode"
is msgpack-encoding the step's outputs as the scheduler process sends them. `--torch-profile`
also prints the torch profiler's top operators of one decode step. The matmul peak of the dtype
is measured in the same run, for the fractions.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from radixkv.config import ServerArgs
from radixkv.model import torch_backend
from radixkv.model.prepack import PackedLinear
from radixkv.model.sampler import Sampler
from radixkv.protocol import BatchOutput, SamplingParams
from radixkv.scheduler.process import build_scheduler

Timers = dict[str, float]


def timed(timers: Timers, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[name] += time.perf_counter() - start

    return wrapper


def instrument(timers: Timers) -> None:
    """Wrap the classes' methods (this process only: a benchmark, not the runtime)."""
    PackedLinear.forward = timed(timers, "matmul", PackedLinear.forward)  # type: ignore[method-assign]
    backend = torch_backend.TorchNativeBackend
    backend.forward = timed(timers, "attention", backend.forward)  # type: ignore[method-assign]
    Sampler.__call__ = timed(timers, "sampling", Sampler.__call__)  # type: ignore[method-assign]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Memory read bandwidth (bytes/s): the best of `repeats` sums over a tensor far larger than
    the caches, on this process's threads."""
    x = torch.ones(nbytes // 4)
    best = min(_time(x.sum) for _ in range(repeats))
    return nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: every tensor the model holds (prepacked copies
    included, the embedding table excluded: a step reads only its rows for the batch's tokens)."""
    seen: dict[int, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" not in name:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            size = module.out_features * module.in_features * module.weight_dtype.itemsize
            seen[id(module)] = size  # an opaque oneDNN tensor: no data pointer to key it by
    return sum(seen.values())


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_step(sched: Any, timers: Timers) -> dict[str, float]:
    """One scheduler step, split; returns seconds per part (and the step's outputs count)."""
    timers.clear()
    start = time.perf_counter()
    outputs = sched.step()
    step = time.perf_counter() - start
    encoded = time.perf_counter()
    msgspec.msgpack.encode(BatchOutput(outputs))
    encode = time.perf_counter() - encoded
    forward = timers["forward"]
    parts = {
        "matmul": timers["matmul"],
        "attention": timers["attention"],
        "small ops": forward - timers["matmul"] - timers["attention"],
        "sampling": timers["sampling"],
        "host": step - forward - timers["sampling"],
        "encode": encode,
    }
    parts["total"] = step + encode
    return parts


def show(title: str, parts: dict[str, float], steps: int, flops: float, peak: float) -> None:
    total = parts["total"] / steps
    print(f"\n{title}: {total * 1e3:.1f} ms per step; model FLOPs {flops / 1e9:.1f} G = "
          f"{flops / peak * 1e3:.1f} ms at the measured peak ({flops / peak / total:.0%} of the "
          "step)")  # fmt: skip
    print("| part | ms per step | share |\n|---|---:|---:|")
    for name, seconds in parts.items():
        if name != "total":
            print(f"| {name} | {seconds / steps * 1e3:.2f} | {seconds / parts['total']:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, int8, fp8_e4m3, fp8_e5m2, ...")
    ap.add_argument("--max-prefill-tokens", type=int, default=4096)
    ap.add_argument("--torch-profile", action="store_true")
    args = ap.parse_args()
    timers: Timers = defaultdict(float)
    instrument(timers)
    tokens = args.requests * (args.context + args.steps + 8)
    sched = build_scheduler(ServerArgs(
        dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, max_total_tokens=tokens + 1024,
        max_running_requests=args.requests,
        max_prefill_tokens=args.max_prefill_tokens, chunked_prefill_size=args.max_prefill_tokens,
        max_context_len=args.context + args.steps + 64,
    ))  # fmt: skip
    runner = sched.runner
    runner.forward = timed(timers, "forward", runner.forward)
    config, dtype = runner.config, runner.dtype
    peak = matmul_peak(dtype)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads; {dtype}, KV cache {sched.mgr.token_pool.layout.dtype}; matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s (2048^3)")  # fmt: skip
    rng = random.Random(0)
    warm = SamplingParams(max_new_tokens=2, ignore_eos=True)  # first-call costs, not counted
    for i in range(args.max_prefill_tokens // args.context or 1):
        sched.add_request(
            f"warm{i}", [rng.randrange(100, 30000) for _ in range(args.context)], warm
        )
    while sched.has_work():
        sched.step()
    params = SamplingParams(max_new_tokens=args.steps + 4, ignore_eos=True)
    for i in range(args.requests):
        prompt = [rng.randrange(100, config.vocab_size) for _ in range(args.context)]
        sched.add_request(f"r{i}", prompt, params)
    prefill = profile_step(sched, timers)
    new = min(args.max_prefill_tokens, args.requests * args.context)
    head = 2 * config.hidden_size * config.vocab_size  # the LM head, per sampled row
    prompts = new // args.context
    flops = sum(config.flops_per_token(p + 1) for p in range(args.context)) * prompts
    show(f"prefill: {new} new tokens ({prompts} prompts of {args.context})", prefill, 1,
         flops + head * prompts, peak)  # fmt: skip
    while sched.waiting or sched.chunked:  # the rest of the prompts, untimed
        sched.step()
    decode: dict[str, float] = defaultdict(float)
    sched.step()  # warm-up
    for _ in range(args.steps):
        for name, seconds in profile_step(sched, timers).items():
            decode[name] += seconds
    flops = args.requests * (config.flops_per_token(args.context + args.steps) + head)
    show(f"decode: batch {args.requests}, contexts ~{args.context}", decode, args.steps, flops,
         peak)  # fmt: skip
    # The floor of a decode step: its FLOPs at the matmul peak, or reading every weight and every
    # request's K/V once at the memory read bandwidth, whichever is longer (both measured here).
    bandwidth = read_bandwidth()
    weights = weight_bytes(runner.model)
    kv_bytes = sched.mgr.token_pool.layout.bytes_per_token * args.requests * (args.context + 6)
    floor = max(flops / peak, (weights + kv_bytes) / bandwidth)
    step = decode["total"] / args.steps
    print(f"\ndecode floor: {flops / peak * 1e3:.1f} ms of FLOPs at the peak, "
          f"{(weights + kv_bytes) / bandwidth * 1e3:.1f} ms to read {weights / 1e9:.2f} GB of "
          f"weights and {kv_bytes / 1e9:.2f} GB of K/V at {bandwidth / 1e9:.1f} GB/s (measured); "
          f"the step is {step / floor:.2f}x its floor")  # fmt: skip
    if args.torch_profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sched.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
