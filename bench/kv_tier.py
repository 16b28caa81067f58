"""The host KV tier side by side: a multi-turn chat workload whose working set is 4x the KV pool,
with and without `--kv-host-tier`, and with a pool that holds everything (the unbounded hit rate).

    python bench/kv_tier.py [--chats 24 --turns 4 --system-len 512 --user-len 64 ...]
                            [--tier 1GiB] [--tier-dtype int8] [--deterministic]

Conversations advance in turns (each turn's prompt carries the whole history and the real
replies), at most `max_concurrency` in flight; with a pool of a quarter of the distinct tokens,
LRU evicts a conversation's history before its next turn. Printed per run: hit rate (cached /
prompt tokens), the tokens served from the tier and the seconds spent loading them, wall time;
then the ratios the issue names: the hit rate with the tier against the unbounded one, and the
speed-up of the tier over the same pool without it. With `--tier-dtype` (int8, fp8_e4m3, ...) a
fourth run keeps the tier's bytes and stores that dtype instead (a compressed tier: about twice
the tokens under a bf16 pool); every run also prints the share of requests whose greedy output
equals the unbounded run's for the same prompt (tokens loaded from a compressed tier carry its
quantization error; the others are recomputed or copied exactly). Without `--deterministic` a
bf16 run's outputs also move with batching (a prefix hit and a recomputation round differently);
with it they do not, and what differs is the compressed tier's doing.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import radixkv
from radixkv.client.aio import AsyncClient
from radixkv.tools.bench import run_workload, summarize
from radixkv.tools.workloads import MultiTurnChat


def run(args: argparse.Namespace, pool: int, tier: str | None, tier_dtype: str = "auto") -> dict:
    convs = MultiTurnChat(args.chats, args.turns, args.system_len, args.user_len,
                          args.output_len).conversations()  # fmt: skip
    with radixkv.Runtime(args.model, max_total_tokens=pool, kv_host_tier=tier,
                         kv_host_tier_dtype=tier_dtype, deterministic=args.deterministic,
                         log_level="warning") as rt:  # fmt: skip

        async def go() -> list:
            async with AsyncClient(rt.endpoint, timeout=None) as client:
                return await run_workload(client, convs, max_concurrency=args.max_concurrency)

        start = time.perf_counter()
        records = asyncio.run(go())
        wall = time.perf_counter() - start
        stats = rt.client.stats()
    summary = summarize(records)
    summary.update(wall=wall, pool=pool, tier=tier or "-", tier_hits=stats.tier_hit_tokens,
                   tier_load=stats.tier_load_seconds)  # fmt: skip
    summary["outputs"] = {tuple(r.prompt_ids): r.output_ids for r in records}
    return summary


def agreement(run: dict, reference: dict) -> float:
    """Share of `run`'s requests whose prompt the reference also sent, with the same output."""
    both = [p for p in run["outputs"] if p in reference["outputs"]]
    same = sum(run["outputs"][p] == reference["outputs"][p] for p in both)
    return same / len(both) if both else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chats", type=int, default=24)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-len", type=int, default=128)
    ap.add_argument("--user-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--max-concurrency", type=int, default=4)
    ap.add_argument("--pool-share", type=float, default=0.25,
                    help="the pool as a share of the workload's distinct tokens")  # fmt: skip
    ap.add_argument("--tier", default="1GiB",
                    help="the host tier's size (the default holds the workload)")  # fmt: skip
    ap.add_argument("--tier-dtype", default=None,
                    help="also a run with a tier of this KV dtype (int8, fp8_e4m3)")  # fmt: skip
    ap.add_argument("--deterministic", action="store_true",
                    help="batch-invariant runs: outputs differ only where the KV does")  # fmt: skip
    args = ap.parse_args()
    per_chat = args.turns * (args.user_len + args.output_len)
    distinct = args.system_len + args.chats * per_chat
    small = int(distinct * args.pool_share)
    rows = [
        ("unbounded pool", run(args, distinct * 2, None)),
        (f"pool {args.pool_share:.0%}", run(args, small, None)),
        (f"pool {args.pool_share:.0%} + tier", run(args, small, args.tier)),
    ]
    if args.tier_dtype:
        rows.append((f"  + {args.tier_dtype} tier", run(args, small, args.tier, args.tier_dtype)))
    print(f"\n{args.chats} chats x {args.turns} turns (system {args.system_len}, user "
          f"{args.user_len}, output {args.output_len}), {args.max_concurrency} in flight; "
          f"{distinct} distinct tokens, small pool {small} tokens")  # fmt: skip
    print(f"{'run':<20}{'hit rate':>9}{'tier hits':>11}{'load s':>8}{'wall s':>8}{'req/s':>7}"
          f"{'same output':>13}")  # fmt: skip
    for name, r in rows:
        print(f"{name:<20}{r['hit_rate']:>9.4f}{r['tier_hits']:>11}{r['tier_load']:>8.3f}"
              f"{r['wall']:>8.1f}{r['requests_per_s']:>7.2f}"
              f"{agreement(r, rows[0][1]):>13.1%}")  # fmt: skip
    unbounded, without, with_tier = (r for _, r in rows[:3])
    share = with_tier["hit_rate"] / unbounded["hit_rate"]
    print(f"\nhit rate with the tier / unbounded   {share:.1%} (target >= 95 %)")
    print(f"speed-up of the tier (wall time)      {without['wall'] / with_tier['wall']:.2f}x "
          "(target >= 2x)")  # fmt: skip


if __name__ == "__main__":
    main()
