"""The cost of `--deterministic`: the shared-prefix workload with it off and on, side by side.

    python bench/deterministic.py [--groups 4] [--prompts-per-group 16] [--system-len 1024]
                                  [--question-len 64] [--output-len 32] [--repeats 2] [--dtype auto]

One runtime per mode (the same dtype, KV size and workload: issue 13's shape by default, every
request sent at once, greedy, EOS ignored); the modes alternate `--repeats` times and each pair's
throughput ratio (on / off) is printed. Also printed: how many requests' outputs differ between
the two modes (in bf16 the default mode's outputs depend on the batch, so some may; in
deterministic mode they do not, which tests/test_deterministic.py checks against requests run
alone).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

from radixkv.client.aio import AsyncClient
from radixkv.launcher import Runtime
from radixkv.tools.bench import run_workload
from radixkv.tools.workloads import GeneratedSharedPrefix


def run_mode(args: argparse.Namespace, deterministic: bool) -> tuple[float, dict[int, list[int]]]:
    """(seconds for the whole workload, output ids by conversation) of one runtime."""
    workload = GeneratedSharedPrefix(
        groups=args.groups, prompts_per_group=args.prompts_per_group, system_len=args.system_len,
        question_len=args.question_len, output_len=args.output_len,
    )  # fmt: skip
    convs = workload.conversations()
    with Runtime(dtype=args.dtype, deterministic=deterministic, start_timeout=300) as rt:
        dtype = rt.ready_info.dtype

        async def go() -> tuple[float, dict[int, list[int]]]:
            async with AsyncClient(rt.endpoint, timeout=None) as client:
                start = time.perf_counter()
                records = await run_workload(client, convs)
                return time.perf_counter() - start, {r.conversation: r.output_ids for r in records}

        seconds, outputs = asyncio.run(go())
    print(f"  deterministic={'on ' if deterministic else 'off'} ({dtype}): {seconds:6.2f} s, "
          f"{len(convs) / seconds:5.2f} req/s", flush=True)  # fmt: skip
    return seconds, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts-per-group", type=int, default=16)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}; workload: {args.groups} groups "
          f"x {args.prompts_per_group} prompts, {args.system_len}-token system prompts, "
          f"{args.question_len}-token questions, {args.output_len} output tokens")  # fmt: skip
    ratios, differing = [], set()
    for _ in range(args.repeats):
        off, out_off = run_mode(args, deterministic=False)
        on, out_on = run_mode(args, deterministic=True)
        ratios.append(off / on)
        differing |= {c for c in out_off if out_off[c] != out_on[c]}
        print(f"  throughput on / off: {off / on:.2f}", flush=True)
    print(f"throughput on / off per pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"requests whose output differs between the modes: {len(differing)}")  # fmt: skip


if __name__ == "__main__":
    main()
