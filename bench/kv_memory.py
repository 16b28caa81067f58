"""KV cache memory: a calculator, and the waste of paged slots vs contiguous max-length buffers.

    python bench/kv_memory.py [--budget-gib 1] [--max-context 4096] [--requests 256] [--seed 0]

Calculator: bytes per token = 2 (K and V) x layers x KV heads x head dim x dtype bytes.

Waste: a mixed-length workload (prompts 32..2048 tokens, outputs 16..512) is admitted into the
real KV hierarchy (`KVCacheManager`, page sizes 1 and 16) and, for comparison, into contiguous
buffers that reserve `max_context` tokens per request (what a static-batch server does). Waste =
allocated but unused slots / allocated slots, measured when every admitted request has its full
sequence; "fits" = how many of the requests fit in the same memory budget.
"""

from __future__ import annotations

import argparse
import random

import torch

from radixkv.mem import KVCacheManager, KVLayout, RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.mem.kv_quant import QUANTIZED

MODELS = {  # layers, KV heads, head dim
    "Llama-3.1-70B": (80, 8, 128),
    "Llama-2-13B": (40, 40, 128),
    "SmolLM2-135M": (30, 3, 64),
}


def calculator(budget_bytes: int, context: int, kv_dtype: str) -> None:
    gib = budget_bytes / 2**30
    plain = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    code = QUANTIZED[kv_dtype][0] if kv_dtype in QUANTIZED else plain[kv_dtype]
    print(f"KV calculator: {kv_dtype} KV, {context}-token requests, {gib:.0f} GiB for KV")
    print(f"  {'model':<15} {'bytes/token':>12} {'per request':>12} {'requests in budget':>19} "
          f"{'tokens in budget':>17}")  # fmt: skip
    for name, (layers, heads, dim) in MODELS.items():
        layout = KVLayout(layers, heads, dim, code)
        per_req = layout.bytes_per_token * context
        print(f"  {name:<15} {layout.bytes_per_token:>12,d} {per_req / 2**20:>10,.0f}Mi "
              f"{budget_bytes // per_req:>19,d} "
              f"{budget_bytes // layout.bytes_per_token:>17,d}")  # fmt: skip


def workload(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(32, 2048), rng.randint(16, 512)) for _ in range(n)]


def paged_waste(reqs: list[tuple[int, int]], budget_tokens: int, page: int) -> tuple[float, int]:
    """Admit requests in order into a pool of `budget_tokens`; each gets its full sequence."""
    layout = KVLayout(1, 1, 1)
    pool = TokenToKVPool(layout, budget_tokens // page * page, page_size=page)
    mgr = KVCacheManager(pool, ReqToTokenPool(len(reqs), 4096), RadixCache(pool, disable=True))
    used = fitted = 0
    for i, (prompt, output) in enumerate(reqs):
        seq = mgr.admit([i + 1] * prompt)  # distinct tokens: measure allocation, not sharing
        assert seq is not None
        if mgr.alloc_extend(seq, prompt + output) is None:
            mgr.release(seq)
            break
        used += prompt + output
        fitted += 1
    allocated = pool.capacity - pool.available_size()
    return (allocated - used) / allocated, fitted


def contiguous_waste(
    reqs: list[tuple[int, int]], budget_tokens: int, context: int
) -> tuple[float, int]:
    fitted = min(len(reqs), budget_tokens // context)
    used = sum(p + o for p, o in reqs[:fitted])
    allocated = fitted * context
    return (allocated - used) / allocated, fitted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget-gib", type=float, default=1.0, help="for the waste measurement")
    ap.add_argument("--calc-budget-gib", type=float, default=40.0, help="for the calculator")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-dtype", default="bfloat16,int8",
                    help="calculator rows: bfloat16, float32, int8, fp8_e4m3, fp8_e5m2 (1-byte "
                    "codes + a bf16 scale per token and KV head)")  # fmt: skip
    args = ap.parse_args()
    budget = int(args.budget_gib * 2**30)
    for kv_dtype in args.kv_cache_dtype.split(","):
        calculator(int(args.calc_budget_gib * 2**30), args.max_context, kv_dtype)
        print()

    smol = KVLayout(*MODELS["SmolLM2-135M"], torch.bfloat16)
    budget_tokens = budget // smol.bytes_per_token
    reqs = workload(args.requests, args.seed)
    mean = sum(p + o for p, o in reqs) / len(reqs)
    print(
        f"\nKV waste, SmolLM2-135M bf16, {args.budget_gib:g} GiB = {budget_tokens:,d} tokens; "
        f"{len(reqs)} requests, mean sequence {mean:.0f} tokens, max context {args.max_context}"
    )
    print(f"  {'allocator':<34} {'waste':>8} {'requests that fit':>18}")
    rows = [
        ("radixkv, page 1", *paged_waste(reqs, budget_tokens, 1)),
        ("radixkv, page 16", *paged_waste(reqs, budget_tokens, 16)),
        (f"contiguous {args.max_context}-token buffers", *contiguous_waste(reqs, budget_tokens,
                                                                           args.max_context)),
    ]  # fmt: skip
    for name, waste, fitted in rows:
        print(f"  {name:<34} {waste:>7.2%} {fitted:>18,d}")
    print(
        f"\n  radixkv (page 16) fits {rows[1][2] / rows[2][2]:.1f}x the requests of contiguous "
        "buffers in the same memory"
    )


if __name__ == "__main__":
    main()
