"""Extend steps over a cached prefix: the two mask-free SDPA calls merged by log-sum-exp
(`cascade.extend_over_prefix`) against one SDPA call over the padded additive mask, in one run.

    python bench/extend_prefix.py [--requests 16] [--prefix 1024] [--extend 64] [--rounds 3]
                                  [--dtype auto]

A system prompt of `--prefix` random tokens is prefilled once; then each round, for each mode,
`--requests` questions of `--extend` tokens after that prefix run as one extend step of the real
model (the scheduler's shape after a shared system prompt), timed, and released. Modes alternate
within a round. Prints every step time and the median ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from radixkv.model import torch_plan
from radixkv.model.model_runner import ModelRunner
from radixkv.protocol import SamplingParams
from radixkv.testing import PoolDriver


def question(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 30000) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--extend", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    runner = ModelRunner.from_pretrained(
        "smollm2-135m", num_slots=args.prefix + args.requests * args.extend + 1024,
        max_running_requests=args.requests + 2, dtype=args.dtype,
    )  # fmt: skip
    driver = PoolDriver(runner)
    rng = random.Random(0)
    system = [rng.randrange(100, 30000) for _ in range(args.prefix)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    base = driver.add(system, params)
    driver.step([base], decode=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for split in (True, False):
            torch_plan.PREFIX_SPLIT = split
            questions = [question(rng, args.extend) for _ in range(args.requests)]
            reqs = [driver.add(system + q, params, base, prefix_len=args.prefix) for q in questions]
            start = time.perf_counter()
            driver.step(reqs, decode=False)
            times[split].append(time.perf_counter() - start)
            for req in reqs:
                driver.release(req)
    print(f"{args.requests} requests x {args.extend} tokens over a {args.prefix}-token cached "
          f"prefix, {runner.dtype}; one extend step, ms")  # fmt: skip
    for split, label in ((True, "split, merged by LSE"), (False, "padded additive mask")):
        print(f"  {label:<22} " + " ".join(f"{t * 1e3:.0f}" for t in times[split]))
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"  mask / split (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
