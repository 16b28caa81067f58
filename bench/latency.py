"""Latency under a request rate, issue 13's way, in one run: the workload's capacity, each request
alone, then every configuration at fractions of that capacity.

    python bench/latency.py [--loads 0.5,0.8] [--repeats 1] [--config NAME=FLAGS ...]
                            [--groups 4 --prompts-per-group 16 --system-len 1024 ...]

Every row is a `radixkv bench` run (its own runtime, Poisson arrivals with `--request-rate`,
streamed requests) on the shared-prefix workload. First the capacity: the requests all at once
with the default flags, requests per second; the rate of a load is that times the load. Then
each request alone (`--prompts-per-group 2 --request-rate 0.2`: every cold prompt and question
sent to an idle runtime). The table gives, per load and configuration, TTFT p50 and p99, TTFT
p99 over the lone runs' TTFT p99 (target <= 2x at 50 % load), inter-token latency (the gaps
between a request's streamed tokens, pooled) p50 and p99 and their ratio (target <= 3x). The
machine's speed drifts (a 2-vCPU VM shared with others): capacity and alone are measured in the
same run as the rows, and `--repeats` runs every row more than once, interleaved.

Default configurations: `defaults` (no flags) and `paced` (`--enable-mixed-chunk
--chunked-prefill-size 16 --ttft-target 0.8`, docs/scheduling.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "defaults": "",
    "paced": "--enable-mixed-chunk --chunked-prefill-size 16 --ttft-target 0.8",
}
WORKLOAD = {"groups": 4, "prompts_per_group": 16, "system_len": 1024, "question_len": 64,
            "output_len": 32}  # fmt: skip


def bench(workload: list[str], flags: list[str], out: Path) -> dict:
    """One `radixkv bench` run; its summary."""
    cmd = [sys.executable, "-m", "radixkv", "bench", "--workload", "shared-prefix", *workload,
           *flags, "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--loads", default="0.5,0.8", help="fractions of the capacity")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--config", action="append", metavar="NAME=FLAGS",
                    help="a configuration (repeatable); default: defaults and paced")  # fmt: skip
    for name, value in WORKLOAD.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = ap.parse_args()
    configs = dict(c.split("=", 1) for c in args.config) if args.config else CONFIGS
    workload = ["--dtype", args.dtype]
    for name in WORKLOAD:
        workload += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    machine = platform.processor() or platform.machine()
    print(f"# latency  {time.strftime('%Y-%m-%d %H:%M')}  {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        capacity = bench(workload, [], out)["requests_per_s"]
        alone_args = list(workload)
        alone_args[alone_args.index("--prompts-per-group") + 1] = "2"
        alone = bench(alone_args, ["--request-rate", "0.2"], out)
        alone_p99 = alone["ttft_s"]["p99"]
        print(f"capacity (all at once, defaults): {capacity:.2f} req/s; alone: TTFT p50 "
              f"{alone['ttft_s']['p50']:.3f} s, p99 {alone_p99:.3f} s; ITL p50 "
              f"{alone['itl_s']['p50']:.3f} s\n")  # fmt: skip
        print("| load | rate | config | TTFT p50 | TTFT p99 | p99 / alone | ITL p50 | ITL p99 "
              "| ITL p99 / p50 |")  # fmt: skip
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for load in (float(x) for x in args.loads.split(",")):
            rate = capacity * load
            for _ in range(args.repeats):
                for name, flags in configs.items():
                    s = bench(workload, ["--request-rate", f"{rate:.3f}", *flags.split()], out)
                    ttft, itl = s["ttft_s"], s["itl_s"]
                    print(f"| {load:.0%} | {rate:.2f} | {name} | {ttft['p50']:.3f} | "
                          f"{ttft['p99']:.3f} | {ttft['p99'] / alone_p99:.2f}x | "
                          f"{itl['p50']:.3f} | {itl['p99']:.3f} | "
                          f"{itl['p99'] / itl['p50']:.1f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
