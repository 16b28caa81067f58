"""The CPU decode attention kernel alone, per KV dtype, in one run.

    python bench/decode_kernel.py [--requests 64] [--context 1024] [--rounds 9]

One layer of SmolLM2-135M's shape (3 KV heads x 3 query heads x 64, bf16 queries) over
`--requests` requests of `--context` contiguous keys each, K/V ~ N(0, 1): bf16 K/V, and int8,
fp8_e4m3, fp8_e5m2 codes with their scales. Two cases: "streaming" (a 64 MiB buffer is written
before each call, so the K/V come from memory, as in a decode step over 30 layers) and "cached"
(every request reads the first request's keys, which stay in the cache: the kernel's own
arithmetic). The dtypes are interleaved within each round (a noisy moment hits all alike); the
median of the rounds per dtype, and its ratio to bf16's. To compare two builds of the kernel, run
this on each (the kernel is compiled per source: alternate the runs).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from radixkv.mem.kv_quant import QUANTIZED, quantize
from radixkv.model import cpu_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if not cpu_attention.available():
        raise SystemExit("the CPU attention kernel is unavailable here (no C compiler?)")
    bs, kvh, group, d, n = args.requests, 3, 3, 64, args.context
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, bs * n + 1, kvh, d, generator=g).bfloat16()
    q = torch.randn(bs, kvh * group, d, generator=g).bfloat16()
    rows = {
        "streaming": (torch.arange(bs * n) + 1).view(bs, n),
        "cached": (torch.arange(n) + 1).expand(bs, n).contiguous(),
    }
    lens = torch.full((bs,), n)
    pools: dict[str, tuple] = {"bfloat16": (kv[0], kv[1], None)}
    for name in ("int8", "fp8_e4m3", "fp8_e5m2"):
        (k, ks), (v, vs) = (quantize(x, QUANTIZED[name][0]) for x in kv)
        pools[name] = (k, v, (ks, vs))
    for name in list(pools):  # the same values in a head-major pool, [kv_heads, slots, d]
        k, v, scales = pools[name]
        k, v = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (k, v))
        pools[f"{name} head-major"] = (k, v, scales)
    flush = torch.empty(64 * 2**20, dtype=torch.uint8)
    fast = cpu_attention.fast_bf16()
    print(f"# decode_kernel  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or ''} "
          f"threads {torch.get_num_threads()}  AVX512-BF16 path {fast}")  # fmt: skip
    print(f"one layer: {bs} requests x {n} keys, {kvh} KV heads x {group} x {d}; "
          f"median of {args.rounds} rounds, dtypes interleaved\n")  # fmt: skip
    print("| KV | streaming (ms) | x bf16 | cached (ms) | x bf16 |\n|---|---:|---:|---:|---:|")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for case, index in rows.items():
            for name, (k, v, scales) in pools.items():
                if case == "streaming":
                    flush.add_(1)
                start = time.perf_counter()
                cpu_attention.decode_attention(q, k, v, index, lens, d**-0.5, scales=scales)
                times.setdefault((name, case), []).append(time.perf_counter() - start)
    med = {key: statistics.median(ts) * 1e3 for key, ts in times.items()}
    for name in pools:
        s, c = med[(name, "streaming")], med[(name, "cached")]
        s0, c0 = med[("bfloat16", "streaming")], med[("bfloat16", "cached")]
        print(f"| {name} | {s:.2f} | {s0 / s:.2f}x | {c:.2f} | {c0 / c:.2f}x |")


if __name__ == "__main__":
    main()
