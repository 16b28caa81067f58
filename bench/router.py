"""The router's policies side by side on one machine: 2 data-parallel workers, a shared-prefix
workload with more distinct prefixes than one worker's KV cache holds.

    python bench/router.py [--groups 16 --per-group 8 --system-len 512 ...]

Workload: `groups` system prompts of `system_len` tokens, `per_group` questions each; arrivals
interleaved across groups (each round a random order of the groups), at most `max_concurrency`
requests in flight. Each worker's KV cache holds about half the groups' prefixes (plus the running
requests' own tokens), so only a router that keeps each group on one worker can hit on every
prefix. The skewed variant sends `hot_share` of the requests from one group: a cache-aware router
must still balance the load.

Every run starts fresh workers (cold caches). Printed per run: hit rate against the best possible
(every distinct prefix computed once, on any worker: `best_hit_rate`), throughput, TTFT p50/p99,
the requests each worker got and their max/min. Then the ratios the issue's targets name.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import radixkv
from radixkv.client.aio import AsyncClient
from radixkv.tools.bench import run_workload, summarize
from radixkv.tools.workloads import TOKEN_HIGH, TOKEN_LOW, Conversation, Turn


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]


def workload(args: argparse.Namespace, hot_share: float) -> list[Conversation]:
    """Uniform: every group `per_group` requests, interleaved. Skewed: the same total, `hot_share`
    of it from group 0 and the rest spread over the others."""
    rng = random.Random(args.seed)
    systems = [_ids(rng, args.system_len) for _ in range(args.groups)]
    total = args.groups * args.per_group
    if hot_share:
        hot = round(total * hot_share)
        groups = [0] * hot + [1 + i % (args.groups - 1) for i in range(total - hot)]
        rng.shuffle(groups)
    else:
        groups = []
        for _ in range(args.per_group):
            order = list(range(args.groups))
            rng.shuffle(order)
            groups += order
    return [
        Conversation(systems[g], [Turn(_ids(rng, args.question_len), args.output_len)], g)
        for g in groups
    ]


def run(args: argparse.Namespace, convs: list[Conversation], policy: str, events: bool) -> dict:
    kv = args.worker_kv_tokens or int(
        args.groups / 2 * args.system_len * 1.15
        + args.max_concurrency * (args.question_len + args.output_len)
    )
    knobs = (
        {"balance_abs_threshold": args.balance_abs_threshold} if args.balance_abs_threshold else {}
    )
    with radixkv.Runtime(
        args.model, dp=args.dp, router_policy=policy, router_cache_events=events,
        max_total_tokens=kv, log_level="warning", start_timeout=600, **knobs,
    ) as rt:  # fmt: skip

        async def go() -> list[Any]:
            async with AsyncClient(rt.endpoint, timeout=None) as client:
                return await run_workload(client, convs, max_concurrency=args.max_concurrency)

        start = time.perf_counter()
        records = asyncio.run(go())
        wall = time.perf_counter() - start
        stats = rt.client.stats()
    summary = summarize(records)
    routed = [w.routed for w in stats.workers]
    summary.update(policy=policy, events=events, routed=routed, wall=wall, kv=kv,
                   balance=max(routed) / max(1, min(routed)))  # fmt: skip
    return summary


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'policy':<13}{'events':<7}{'hit':>7}{'best':>7}{'of best':>9}{'req/s':>7}"
          f"{'TTFT p50':>10}{'p99':>7}  per worker  max/min")  # fmt: skip
    for r in rows:
        print(
            f"{r['policy']:<13}{'on' if r['events'] else 'off':<7}{r['hit_rate']:>7.3f}"
            f"{r['best_hit_rate']:>7.3f}{r['hit_rate_of_best']:>9.1%}{r['requests_per_s']:>7.2f}"
            f"{r['ttft_s']['p50']:>9.2f}s{r['ttft_s']['p99']:>6.2f}s  "
            f"{'/'.join(map(str, r['routed'])):<11} {r['balance']:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--hot-share", type=float, default=0.5, help="the skewed variant's hot group")
    ap.add_argument("--worker-kv-tokens", type=int, default=None,
                    help="KV cache of each worker (default: half the groups' prefixes + 15 %% + "
                         "the in-flight requests' own tokens)")  # fmt: skip
    ap.add_argument("--balance-abs-threshold", type=int, default=None,
                    help="cache_aware's knob (default: the runtime's)")  # fmt: skip
    ap.add_argument("--policies", default="cache_aware,round_robin,least_load,random,prefix_hash")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    policies = args.policies.split(",")

    uniform = workload(args, 0.0)
    rows = [run(args, uniform, p, True) for p in policies]
    if "cache_aware" in policies:
        rows.insert(1, run(args, uniform, "cache_aware", False))
    print(f"\n{len(uniform)} requests: {args.groups} groups x {args.per_group}, "
          f"{args.system_len}-token prefixes, {args.question_len}-token questions, "
          f"{args.output_len} output tokens; {args.dp} workers of {rows[0]['kv']} KV tokens "
          f"each; {args.max_concurrency} in flight")  # fmt: skip
    show("uniform, arrivals interleaved across groups", rows)

    skewed = workload(args, args.hot_share)
    skew_policies = [p for p in ("cache_aware", "round_robin", "prefix_hash") if p in policies]
    skew_rows = [run(args, skewed, p, True) for p in skew_policies]
    if "cache_aware" in policies:
        skew_rows.insert(1, run(args, skewed, "cache_aware", False))
    show(f"skewed: one group sends {args.hot_share:.0%} of the requests", skew_rows)

    by = {(r["policy"], r["events"]): r for r in rows}
    skew_by = {(r["policy"], r["events"]): r for r in skew_rows}
    ca = by.get(("cache_aware", True))
    if ca is not None:
        print("\ntargets")
        print(f"  cache_aware hit rate / best possible     {ca['hit_rate_of_best']:.1%} "
              "(target >= 95 %)")  # fmt: skip
        if ("round_robin", True) in by:
            rr = by[("round_robin", True)]
            print(f"  cache_aware / round_robin hit rate       "
                  f"{ca['hit_rate'] / rr['hit_rate']:.2f}x (target >= 1.5x)")  # fmt: skip
        off = by[("cache_aware", False)]
        skew_off = skew_by[("cache_aware", False)]
        skew_ca = skew_by[("cache_aware", True)]
        print(f"  events on / off hit rate                 {ca['hit_rate'] / off['hit_rate']:.3f} "
              f"uniform, {skew_ca['hit_rate'] / skew_off['hit_rate']:.3f} skewed "
              "(target >= 1)")  # fmt: skip
        print(f"  skewed: max/min requests per worker      {skew_ca['balance']:.2f} "
              "(target <= 1.5)")  # fmt: skip
        print(f"  skewed: hit rate / best possible         {skew_ca['hit_rate_of_best']:.1%} "
              "(target >= 90 %)")  # fmt: skip


if __name__ == "__main__":
    main()
