"""The CPU speed switches of the model on and off, alternated in one run.

    python bench/cpu_switches.py [--switch fused_ops|extend_kernel|cascade|head_major|c_store]
                                 [--kv-cache-dtype auto] [--rounds 5]

The bf16 model through `ModelRunner` (packed weights, the C kernels), one switch flipped per
step: `fused_ops` (`LlamaForCausalLM.fused_ops`: residual add + RMSNorm and rope as one-pass C
kernels) or `extend_kernel` (`TorchNativeBackend.extend_kernel`: extend attention on the C
kernel instead of SDPA) or `cascade` (`torch_plan.CASCADE_OVER_KERNEL`: a decode batch sharing
prefixes on the cascade's torch calls instead of the C decode kernel) or `head_major` (the KV
pool's buffers stored `[kv_heads, slots, head_dim]`, as `TokenToKVPool` makes them, or copied
to slot-major `[slots, kv_heads, head_dim]`, the values unchanged) or `c_store`
(`TorchNativeBackend.c_store`: new K/V written by the C kernel instead of `set_kv`; matters most
with `--kv-cache-dtype int8` or fp8, where it quantizes too). Four steps, each timed
whole:
- prefill: `--prefill` prompts (N x tokens) with nothing cached;
- prefix hit: `--hits` requests (N x new tokens) over one cached `--prefix`-token prompt;
- decode: a batch of `--decode` requests (N x context; their context slots are allocated without
  computing them, which a decode step's cost does not depend on);
- shared decode: `--groups` groups of `--hits` requests, each group over its own cached
  `--prefix`-token prompt, decoding together.
On and off alternate within each round (a noisy moment hits both alike); the median per mode and
the ratio off / on.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model import torch_plan
from radixkv.model.model_runner import ModelRunner
from radixkv.protocol import SamplingParams
from radixkv.testing import DriverRequest, PoolDriver

GO_ON = SamplingParams(max_new_tokens=1 << 30, ignore_eos=True)


def shape(text: str) -> tuple[int, int]:
    n, tokens = text.lower().split("x")
    return int(n), int(tokens)


def timed_step(drv: PoolDriver, reqs: list[DriverRequest], release: bool) -> float:
    start = time.perf_counter()
    drv.step(reqs)
    elapsed = time.perf_counter() - start
    if release:
        for r in reqs:
            drv.release(r)
    return elapsed


def decoding_batch(
    drv: PoolDriver, n: int, context: int, rng: random.Random
) -> list[DriverRequest]:
    """n requests with `context` tokens already 'computed' (slots allocated, K/V left as is)."""
    reqs = []
    for _ in range(n):
        req = drv.add([rng.randrange(100, 30000) for _ in range(context + 1)], GO_ON)
        slots = drv.runner.token_pool.alloc(context)
        assert slots is not None
        drv.runner.req_pool.write(req.row, 0, slots)
        req.owned_slots.append(slots)
        req.kv_len = context
        reqs.append(req)
    return reqs


def relayout(pool: TokenToKVPool, head_major: bool) -> None:
    """Copy every K/V buffer of `pool` into the head-major or the slot-major layout."""
    for buffers in (pool.k_buffer, pool.v_buffer):
        for layer, x in enumerate(buffers):
            hm = x.stride(1) > x.stride(0)
            if hm != head_major:
                buffers[layer] = (
                    x.transpose(0, 1).contiguous().transpose(0, 1) if head_major else x.contiguous()
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--switch", default="fused_ops", choices=("fused_ops", "extend_kernel",
                    "cascade", "head_major", "c_store"))  # fmt: skip
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, int8, fp8_e4m3, fp8_e5m2")
    ap.add_argument("--prefill", type=shape, default=(4, 1024), help="prompts x tokens")
    ap.add_argument("--prefix", type=int, default=1024, help="the cached prompt of the hits")
    ap.add_argument("--hits", type=shape, default=(16, 64), help="requests x new tokens")
    ap.add_argument("--decode", type=shape, default=(64, 1024), help="requests x context")
    ap.add_argument("--groups", type=int, default=4, help="groups of the shared decode")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    (pn, plen), (hn, hlen), (dn, dctx) = args.prefill, args.hits, args.decode
    shared = args.groups * (args.prefix + hn * (hlen + args.rounds * 2 + 8))
    slots = pn * plen + args.prefix + hn * hlen + dn * (dctx + args.rounds * 2 + 8) + shared + 64
    runner = ModelRunner.from_pretrained(
        "smollm2-135m", dtype="bf16", num_slots=slots,
        max_running_requests=max(pn, dn, args.groups * (hn + 1)) + 2,
        max_context_len=max(plen, args.prefix + hlen, dctx) + 64,
        kv_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
    )  # fmt: skip
    switches: dict[str, tuple[Callable[[bool], None], bool]] = {
        "fused_ops": (lambda on: setattr(runner.model, "fused_ops", on), runner.model.fused_ops),
        "extend_kernel": (
            lambda on: setattr(runner.backend, "extend_kernel", on),
            bool(getattr(runner.backend, "extend_kernel", False)),
        ),
        "cascade": (lambda on: setattr(torch_plan, "CASCADE_OVER_KERNEL", on), True),
        "head_major": (lambda on: relayout(runner.token_pool, on), True),
        "c_store": (
            lambda on: setattr(runner.backend, "c_store", on),
            bool(getattr(runner.backend, "c_store", False)),
        ),
    }
    flip, available = switches[args.switch]
    if not available:
        raise SystemExit(f"{args.switch} is unavailable here (no compiler, CPU or env switch)")
    drv = PoolDriver(runner)
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(100, 30000) for _ in range(n)]  # noqa: E731
    prompts = [tokens(plen) for _ in range(pn)]
    system = drv.add(tokens(args.prefix), GO_ON)
    drv.step([system])  # the cached prefix of the hits, computed once
    cpu = platform.processor() or platform.machine()
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"# cpu_switches {args.switch}  {when}  {cpu}  threads {torch.get_num_threads()}  "
          f"bf16, KV {runner.token_pool.layout.dtype}; median of {args.rounds} rounds, on/off "
          "alternated\n")  # fmt: skip
    times: dict[tuple[str, bool], list[float]] = {}
    timed_step(drv, [drv.add(prompts[0], GO_ON)], release=True)  # first-call costs

    def hits(base: DriverRequest = system) -> list[DriverRequest]:
        return [drv.add(base.tokens[: args.prefix] + tokens(hlen), GO_ON, prefix_from=base,
                        prefix_len=args.prefix) for _ in range(hn)]  # fmt: skip

    for _ in range(args.rounds):
        for on in (True, False):
            flip(on)
            reqs = [drv.add(p, GO_ON) for p in prompts]
            times.setdefault(("prefill", on), []).append(timed_step(drv, reqs, release=True))
            times.setdefault(("hits", on), []).append(timed_step(drv, hits(), release=True))
    reqs = decoding_batch(drv, dn, dctx, rng)
    drv.step(reqs)  # warm-up
    for _ in range(args.rounds):
        for on in (True, False):
            flip(on)
            times.setdefault(("decode", on), []).append(timed_step(drv, reqs, release=False))
    for r in reqs:
        drv.release(r)
    flip(True)
    groups = []
    for _ in range(args.groups):
        base = drv.add(tokens(args.prefix), GO_ON)
        drv.step([base])
        groups += hits(base)
    drv.step(groups)  # their new tokens
    drv.step(groups)  # warm-up
    for _ in range(args.rounds):
        for on in (True, False):
            flip(on)
            times.setdefault(("shared", on), []).append(timed_step(drv, groups, release=False))
    print("| step | off (ms) | on (ms) | off / on |\n|---|---:|---:|---:|")
    labels = {
        "prefill": f"prefill {pn} x {plen}",
        "hits": f"{hn} x {hlen} new tokens over a cached {args.prefix}",
        "decode": f"decode {dn} x {dctx}",
        "shared": f"decode {args.groups} groups x {hn} sharing {args.prefix} (+{hlen} each)",
    }
    for step, label in labels.items():
        off = statistics.median(times[(step, False)]) * 1e3
        on = statistics.median(times[(step, True)]) * 1e3
        print(f"| {label} | {off:.1f} | {on:.1f} | {off / on:.3f}x |")


if __name__ == "__main__":
    main()
