"""The fused small ops (`radixkv/model/cpu_fused.py`) on and off, alternated in one run.

    python bench/fused_ops.py [--prefill 4x1024] [--decode 64x1024] [--rounds 5]

The bf16 model through `ModelRunner` (packed weights, the C decode kernel), its `fused_ops`
switched per step: prefill steps of `--prefill` prompts (N x tokens, nothing cached), and decode
steps of a batch of `--decode` requests (N x context; their context slots are allocated without
computing them, which a decode step's cost does not depend on). On and off alternate within each
round, so a noisy moment hits both alike; the median per mode and the ratio off / on.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from radixkv.model.model_runner import ModelRunner
from radixkv.protocol import SamplingParams
from radixkv.testing import DriverRequest, PoolDriver

GO_ON = SamplingParams(max_new_tokens=1 << 30, ignore_eos=True)


def shape(text: str) -> tuple[int, int]:
    n, tokens = text.lower().split("x")
    return int(n), int(tokens)


def prefill_step(drv: PoolDriver, prompts: list[list[int]]) -> float:
    reqs = [drv.add(p, GO_ON) for p in prompts]
    start = time.perf_counter()
    drv.step(reqs, decode=False)
    elapsed = time.perf_counter() - start
    for r in reqs:
        drv.release(r)
    return elapsed


def decoding_batch(
    drv: PoolDriver, n: int, context: int, rng: random.Random
) -> list[DriverRequest]:
    """n requests with `context` tokens already 'computed' (slots allocated, K/V left as is)."""
    reqs = []
    for _ in range(n):
        tokens = [rng.randrange(100, 30000) for _ in range(context + 1)]
        req = drv.add(tokens, GO_ON)
        slots = drv.runner.token_pool.alloc(context)
        assert slots is not None
        drv.runner.req_pool.write(req.row, 0, slots)
        req.owned_slots.append(slots)
        req.kv_len = context
        reqs.append(req)
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prefill", type=shape, default=(4, 1024), help="prompts x tokens")
    ap.add_argument("--decode", type=shape, default=(64, 1024), help="requests x context")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    (pn, plen), (dn, dctx) = args.prefill, args.decode
    slots = pn * plen + dn * (dctx + args.rounds * 2 + 8) + 64
    runner = ModelRunner.from_pretrained("smollm2-135m", dtype="bf16", num_slots=slots,
                                         max_running_requests=max(pn, dn) + 1,
                                         max_context_len=max(plen, dctx) + 64)  # fmt: skip
    model = runner.model
    if not model.fused_ops:
        raise SystemExit(
            "the fused ops are unavailable here (no C compiler, or RADIXKV_FUSED_OPS=0)"
        )
    drv = PoolDriver(runner)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(plen)] for _ in range(pn)]
    cpu = platform.processor() or platform.machine()
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"# fused_ops  {when}  {cpu}  threads {torch.get_num_threads()}  bf16; median of "
          f"{args.rounds} rounds, on/off alternated\n")  # fmt: skip
    times: dict[tuple[str, bool], list[float]] = {}
    prefill_step(drv, prompts[:1])  # first-call costs (kernel builds, allocator)
    for _ in range(args.rounds):
        for fused in (True, False):
            model.fused_ops = fused
            times.setdefault(("prefill", fused), []).append(prefill_step(drv, prompts))
    reqs = decoding_batch(drv, dn, dctx, rng)
    drv.step(reqs, decode=True)  # warm-up
    for _ in range(args.rounds):
        for fused in (True, False):
            model.fused_ops = fused
            start = time.perf_counter()
            drv.step(reqs, decode=True)
            times.setdefault(("decode", fused), []).append(time.perf_counter() - start)
    print("| step | unfused (ms) | fused (ms) | unfused / fused |\n|---|---:|---:|---:|")
    for step, label in (("prefill", f"prefill {pn} x {plen}"), ("decode", f"decode {dn} x {dctx}")):
        off = statistics.median(times[(step, False)]) * 1e3
        on = statistics.median(times[(step, True)]) * 1e3
        print(f"| {label} | {off:.1f} | {on:.1f} | {off / on:.3f}x |")


if __name__ == "__main__":
    main()
