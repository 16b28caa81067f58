"""How fast the K/V of a decode step can be read, by access order, with no attention arithmetic.

    python bench/kv_stream.py [--requests 64] [--context 1024] [--rounds 11]

One layer of SmolLM2-135M's bf16 K/V (3 KV heads x 64) for `--requests` requests of `--context`
contiguous slots, read and summed by `kv_stream.c` (compiled here with `cc -O3 -march=native
-fopenmp`; needs AVX-512) in three orders: the decode kernel's (per request, per KV head, the
head's 128 bytes of every key's row, with and without its software prefetch), whole rows in key
order, and per KV head over a head-major pool (`[kv_heads, slots, d]`). A 64 MiB buffer is
written before each read, so the K/V come from memory; orders interleaved per round, medians.
The kernel itself (`bench/decode_kernel.py`) cannot beat its order's time here.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "kv_stream.so"
        source = Path(__file__).with_suffix(".c")
        subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
                        str(source), "-o", str(lib_path)], check=True)  # fmt: skip
        lib = ctypes.CDLL(str(lib_path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.kv_stream.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, i32, i32]
    lib.kv_stream.restype = ctypes.c_float
    bs, n, kvh, d = args.requests, args.context, 3, 64
    k = torch.randn(bs * n + 1, kvh, d).bfloat16()
    v = torch.randn_like(k)
    slots = torch.arange(bs * n) + 1
    flush = torch.empty(64 * 2**20, dtype=torch.uint8)
    orders = {
        "decode kernel's order, no prefetch": (0, 0),
        "decode kernel's order, its prefetch": (0, 1),
        "whole rows, key order": (1, 0),
        "head-major pool, per KV head": (2, 0),
    }
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, (order, prefetch) in orders.items():
            flush.add_(1)
            start = time.perf_counter()
            lib.kv_stream(k.data_ptr(), v.data_ptr(), slots.data_ptr(), bs, n, kvh, d, order,
                          prefetch)  # fmt: skip
            times.setdefault(name, []).append(time.perf_counter() - start)
    mb = 2 * k.numel() * 2 / 1e6
    print(f"# kv_stream  {time.strftime('%Y-%m-%d %H:%M')}  threads {torch.get_num_threads()}; "
          f"{mb:.0f} MB of K/V ({bs} x {n} keys), median of {args.rounds}\n")  # fmt: skip
    print("| order | ms | GB/s |\n|---|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.2f} | {mb / 1e3 / t:.1f} |")


if __name__ == "__main__":
    main()
