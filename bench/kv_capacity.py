"""More cached prefixes in the same KV memory: bf16 against int8/fp8 KV caches, one run.

    python bench/kv_capacity.py [--groups 12] [--rounds 4] [--kv-tokens-bf16 8192]
                                [--concurrency 4] [--kv-dtypes bfloat16,fp8_e4m3,int8]

A shared-prefix workload whose distinct system prompts exceed the KV memory budget: `--groups`
system prompts of 1024 tokens, `--rounds` questions each (32 tokens, 16 output tokens, EOS
ignored), sent round by round (each round asks one question of every group, in group order,
`--concurrency` at a time), so a prefix is reused only if it survives a whole round of the other
groups. Every runtime gets the same KV memory in bytes: what `--kv-tokens-bf16` tokens take in
bf16 (the default holds about 8 of the 12 prefixes with the running requests' room, so bf16 LRU
thrashes). Printed per KV dtype: the pool's capacity in tokens, the hit rate against the best
possible (unbounded cache), wall time and throughput. The model runs in `--dtype` (auto: bf16
here).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from typing import Any

import torch

from radixkv.client.aio import AsyncClient
from radixkv.launcher import Runtime
from radixkv.mem import KVLayout
from radixkv.model.loader import load_config, resolve_model
from radixkv.tools.bench import run_workload, summarize
from radixkv.tools.workloads import GeneratedSharedPrefix


def run(convs: list, kv_dtype: str, dtype: str, kv_bytes: int, concurrency: int) -> dict:
    with Runtime(
        "smollm2-135m", dtype=dtype, kv_cache_dtype=kv_dtype, kv_memory=kv_bytes,
        max_running_requests=concurrency,
    ) as rt:  # fmt: skip

        async def go() -> list:
            async with AsyncClient(rt.endpoint, timeout=None) as client:
                return await run_workload(client, convs, max_concurrency=concurrency)

        records = asyncio.run(go())
        summary: dict[str, Any] = summarize(records, rt.ready_info.page_size)
        summary["capacity"] = rt.ready_info.kv_capacity
        return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kv-tokens-bf16", type=int, default=8192)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kv-dtypes", default="bfloat16,fp8_e4m3,int8")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    wl = GeneratedSharedPrefix(args.groups, args.rounds, 1024, 32, 16)
    by_group: dict[int, list] = {}
    for conv in wl.conversations():
        by_group.setdefault(conv.group, []).append(conv)
    convs = [by_group[g][r] for r in range(args.rounds) for g in sorted(by_group)]
    config = load_config(resolve_model("smollm2-135m"))
    bf16 = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, torch.bfloat16)
    kv_bytes = (args.kv_tokens_bf16 + 1) * bf16.bytes_per_token  # + the padding slot
    print(f"# kv_capacity  {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or ''} "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(
        f"{args.groups} groups x {args.rounds} rounds, 1024-token system prompts; KV memory "
        f"{kv_bytes / 2**20:.1f} MiB for every row ({args.kv_tokens_bf16} tokens in bf16)\n"
    )
    rows = []
    for kv in args.kv_dtypes.split(","):
        rows.append((kv, run(convs, kv, args.dtype, kv_bytes, args.concurrency)))
        print(f"  done: {kv} in {rows[-1][1]['duration_s']:.1f} s", flush=True)
    base = rows[0][1]
    print(
        "\n| KV cache | capacity (tokens) | x first row | hit rate | best possible | wall (s) | "
        "req/s | x first row |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for kv, s in rows:
        print(
            f"| {kv} | {s['capacity']} | {s['capacity'] / base['capacity']:.2f}x | "
            f"{s['hit_rate']:.3f} | {s['best_hit_rate']:.3f} | {s['duration_s']:.1f} | "
            f"{s['requests_per_s']:.2f} | {s['requests_per_s'] / base['requests_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
