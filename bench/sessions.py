"""Sessions side by side: the same multi-turn chat workload with and without each conversation
run as a session (closed after its last turn, so the cache evicts its prefixes first), under
memory pressure, in alternated pairs.

    python bench/sessions.py [--pairs 3] [--chats 64 --turns 4] [--max-total-tokens 4000]
                             [--request-rate 1.0] [--think-time 3] [--dtype bfloat16]

Conversations arrive as a Poisson process (`--request-rate` first turns a second) and their
users think (`--think-time` seconds on average) between turns, so finished conversations compete
for the pool with idle live ones: the case sessions are for. Printed per run: hit rate, its share
of the best possible (every prompt matching the longest prefix of anything sent before), TTFT
mean and p99, requests a second; then per pair the hit rates' difference and the TTFT ratio.
The request rate sets the pace, so requests a second barely move: the hits buy latency.
"""

from __future__ import annotations

import argparse
import time

from radixkv.tools.bench import build_parser, run_bench


def run(args: argparse.Namespace, sessions: bool) -> dict:
    argv = [
        "--workload", "multi-turn", "--chats", str(args.chats), "--turns", str(args.turns),
        "--max-total-tokens", str(args.max_total_tokens), "--max-running-requests", "16",
        "--dtype", args.dtype, "--request-rate", str(args.request_rate),
        "--think-time", str(args.think_time), "--log-level", "warning",
    ]  # fmt: skip
    if sessions:
        argv.append("--sessions")
    return run_bench(build_parser().parse_args(argv))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--chats", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-total-tokens", type=int, default=4000)
    ap.add_argument("--request-rate", type=float, default=1.0)
    ap.add_argument("--think-time", type=float, default=3.0)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print("options:", vars(args))
    rows = []
    for pair in range(args.pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)  # alternated
        result = {}
        for sessions in order:
            start = time.strftime("%H:%M:%S")
            s = run(args, sessions)
            result[sessions] = s
            ttft = s["ttft_s"]
            print(f"pair {pair + 1} {'with' if sessions else 'without'} sessions ({start}): hit "
                  f"{s['hit_rate']:.4f} ({s['hit_rate_of_best']:.1%} of best "
                  f"{s['best_hit_rate']:.4f}), TTFT mean {ttft['mean']:.3f} s p99 "
                  f"{ttft['p99']:.3f} s, {s['requests_per_s']:.2f} req/s", flush=True)  # fmt: skip
        rows.append(result)
    print("\npair  hit without  hit with  difference  TTFT mean with / without  req/s ratio")
    for i, r in enumerate(rows):
        a, b = r[False], r[True]
        print(f"{i + 1:>4}  {a['hit_rate']:>11.4f}  {b['hit_rate']:>8.4f}  "
              f"{b['hit_rate'] - a['hit_rate']:>+10.4f}  "
              f"{b['ttft_s']['mean'] / a['ttft_s']['mean']:>24.2f}  "
              f"{b['requests_per_s'] / a['requests_per_s']:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
