"""Radix-cache operation traces (`radixkv.tools.traces`): generate, replay, and the eviction cost.

    python bench/radix_ops.py                      # default traces, replays, eviction cost
    python bench/radix_ops.py gen shared-prefix --out trace.jsonl [--groups 16 ...]
    python bench/radix_ops.py replay trace.jsonl [--page-size 16] [--capacity N]
    python bench/radix_ops.py evict-cost [--sizes 1000 10000 100000]
    python bench/radix_ops.py policies [--capacity-frac 0.5]   # every eviction policy, each trace

The trace format and the replay rules are in docs/radix_ops.md. Everything is seeded: the same
arguments give the same trace, byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from radixkv.mem import KVLayout, RadixCache, TokenToKVPool, eviction
from radixkv.mem.eviction import EVICTION_POLICIES
from radixkv.tools.traces import (
    TRACE_WORKLOADS,
    ReplayStats,
    best_hit_rate,
    best_replay,
    generate,
    read_trace,
    replay,
    unique_tokens,
    write_trace,
)

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---- eviction cost -------------------------------------------------------------------------------


def build_tree(num_leaves: int, leaf_len: int = 4) -> RadixCache:
    """A two-level tree: ~sqrt(n) shared stems of 8 tokens, `num_leaves` leaves below them."""
    stems = max(1, int(num_leaves**0.5))
    pool = TokenToKVPool(KVLayout(1, 1, 1), num_leaves * leaf_len + stems * 8 + 8)
    tree = RadixCache(pool)
    for i in range(num_leaves):
        stem = [1_000_000 + i % stems] * 8
        tokens = stem + [i] * leaf_len
        slots = pool.alloc(len(tokens))
        assert slots is not None
        present = tree.insert(tokens, slots)
        pool.free(slots[:present])
    return tree


def walk_and_heapify(tree: RadixCache) -> int:
    """What a non-incremental evict pays on every call: collect unlocked leaves, heapify them."""
    leaves, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        if not node.children and node.lock_ref == 0 and node is not tree.root:
            leaves.append((node.last_access, node.id))
        stack.extend(node.children.values())
    heapq.heapify(leaves)
    return len(leaves)


def evict_cost(sizes: list[int], evictions: int = 500) -> list[dict]:
    rows = []
    for n in sizes:
        tree = build_tree(n)
        k = min(evictions, n // 4)
        start = time.perf_counter()
        for _ in range(k):
            tree.evict(1)  # frees exactly one least-recently-used leaf
        ours = (time.perf_counter() - start) / k
        reps = max(3, 2000 // max(1, n // 100))
        start = time.perf_counter()
        for _ in range(reps):
            walk_and_heapify(tree)
        walk = (time.perf_counter() - start) / reps
        tree.check_integrity()
        rows.append({"leaves": n, "evict_us": ours * 1e6, "walk_heapify_us": walk * 1e6})
    return rows


# ---- eviction policies ---------------------------------------------------------------------------


DEPTH_ODDS_HORIZONS = (16, 32, 64, 128, 256, 512)  # clock ticks (traces.DepthOddsCache)
SESSION_POLICIES = EVICTION_POLICIES  # each replayed again with the conversations as sessions


def compare_policies(args: argparse.Namespace) -> None:
    """Every eviction policy replayed on every default trace at `capacity_frac` of its distinct
    tokens, next to the offline optimum (Belady's rule on the radix tree) and the unbounded hit
    rate; replay speed next to LRU's."""
    print(f"KV capacity {args.capacity_frac:.0%} of each trace's distinct tokens, page "
          f"{args.page_size}; ops/s the best of {args.repeats} replays")  # fmt: skip
    for kind, events, capacity in _iter_default_traces(args):
        unique = unique_tokens(events)
        unbounded = replay(events, unique + args.concurrency * 4096, args.page_size,
                           args.concurrency)  # fmt: skip
        optimum = replay(events, capacity, args.page_size, args.concurrency, "belady")
        rows = {}
        for policy in EVICTION_POLICIES:
            rows[policy] = best_replay(
                events, capacity, args.page_size, args.concurrency, args.repeats, policy
            )
        lru = rows["lru"]
        ends = replay(events, capacity, args.page_size, args.concurrency, "ends-known")
        print(f"\n{kind}: {len(events)} events, capacity {capacity} slots; hit rate unbounded "
              f"{unbounded.hit_rate:.4f}, offline optimum (Belady) "
              f"{optimum.hit_rate:.4f}")  # fmt: skip
        gap = optimum.hit_rate - lru.hit_rate
        sessions = {
            p: best_replay(
                events, capacity, args.page_size, args.concurrency, args.repeats, p, sessions=True
            )
            for p in SESSION_POLICIES
        }
        for policy, st in sessions.items():
            closed = f", {(st.hit_rate - lru.hit_rate) / gap:.0%} of the gap" if gap > 0 else ""
            print(f"  {policy} with sessions closed after each conversation's last turn (online: "
                  f"the client says so): {st.hit_rate:.4f}{closed}, replay "
                  f"{st.ops_per_s / rows[policy].ops_per_s:.2f}x {policy}'s ops/s")  # fmt: skip
        if gap > 0:
            print(f"  lru that knows which paths are never used again (offline): "
                  f"{ends.hit_rate:.4f}, {(ends.hit_rate - lru.hit_rate) / gap:.0%} "
                  f"of the gap")  # fmt: skip
            odds = {h: replay(events, capacity, args.page_size, args.concurrency,
                              f"depth-odds:{h}").hit_rate for h in DEPTH_ODDS_HORIZONS}  # fmt: skip
            best = max(odds, key=lambda h: odds[h])
            print(f"  depth odds + recency, the trace's own continuation rates (offline), H in "
                  f"{DEPTH_ODDS_HORIZONS[0]}-{DEPTH_ODDS_HORIZONS[-1]}: best {odds[best]:.4f} "
                  f"(H {best}, {(odds[best] - lru.hit_rate) / gap:.0%} of the gap), worst "
                  f"{min(odds.values()) - lru.hit_rate:+.4f} against lru")  # fmt: skip
        print(f"  {'policy':<8}{'hit rate':>10}{'vs lru':>9}{'of the gap to the optimum':>27}"
              f"{'ops/s':>9}{'vs lru':>8}")  # fmt: skip
        for policy, st in rows.items():
            closed = f"{(st.hit_rate - lru.hit_rate) / gap:.0%}" if gap > 0 else "-"
            speed = st.ops_per_s / lru.ops_per_s
            print(f"  {policy:<8}{st.hit_rate:>10.4f}{st.hit_rate - lru.hit_rate:>+9.4f}"
                  f"{closed:>27}{st.ops_per_s:>9,.0f}{speed:>8.2f}")  # fmt: skip


# ---- command line --------------------------------------------------------------------------------


def _print_replay(name: str, st: ReplayStats, best: tuple[int, int], unique: int) -> None:
    best_rate = best[0] / max(1, best[1])
    print(
        f"\n{name}: {st.events} events, capacity {st.capacity} slots (page {st.page_size}), "
        f"{unique} distinct tokens in the trace"
    )
    print(f"  ops/s            {st.ops_per_s:12,.0f}   ({st.seconds:.3f} s)")
    print(f"  matched tokens   {st.matched_tokens:12,d}   of {st.prompt_tokens:,d} prompt tokens")
    print(
        f"  hit rate         {st.hit_rate:12.4f}   best possible (unbounded) {best_rate:.4f}, "
        f"ratio {st.hit_rate / best_rate if best_rate else 0:.3f}"
    )
    print(f"  evicted tokens   {st.evicted_tokens:12,d}   rejected requests {st.rejected}")
    print(f"  peak KV slots    {st.peak_kv_slots:12,d}   of {st.capacity:,d}")


def _trace(kind: str, wl: Any, args: argparse.Namespace, path: Path) -> tuple[list[dict], int]:
    """Generate and write one trace; its events and the capacity its header records."""
    events = generate(wl, concurrency=args.concurrency, seed=args.seed)
    capacity = int(unique_tokens(events) * args.capacity_frac)
    header = {
        "version": 3,
        "workload": kind,
        "params": dataclasses.asdict(wl),
        "seed": args.seed,
        "concurrency": args.concurrency,
        "capacity": capacity,
    }
    write_trace(path, header, events)
    return events, capacity


def _iter_default_traces(args: argparse.Namespace) -> Iterator[tuple[str, list[dict], int]]:
    for kind, wl in TRACE_WORKLOADS.items():
        events, capacity = _trace(kind, wl, args, OUT_DIR / f"{kind}.jsonl")
        yield kind, events, capacity


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--capacity-frac",
        type=float,
        default=0.3,
        help="KV capacity as a fraction of the trace's distinct tokens (default 0.3)",
    )
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="replays per trace; ops/s of the best")
    sub = ap.add_subparsers(dest="cmd")
    gen = sub.add_parser("gen", help="write a trace")
    gen.add_argument("workload", choices=sorted(TRACE_WORKLOADS))
    gen.add_argument("--out", type=Path, required=True)
    fields = {k: v for wl in TRACE_WORKLOADS.values() for k, v in dataclasses.asdict(wl).items()}
    for field, default in fields.items():
        if field != "seed":
            gen.add_argument(
                f"--{field.replace('_', '-')}", type=int, default=None, help=f"(default {default})"
            )
    rep = sub.add_parser("replay", help="replay a trace")
    rep.add_argument("trace", type=Path)
    rep.add_argument("--capacity", type=int, default=None, help="default: the header's")
    rep.add_argument("--policy", default="lru", choices=EVICTION_POLICIES)
    pol = sub.add_parser("policies", help="every eviction policy on every default trace")
    pol.add_argument("--gdsf-half-life", type=int, default=None,
                     help="gdsf's half-life in clock ticks (default: the runtime's)")  # fmt: skip
    ev = sub.add_parser("evict-cost", help="cost of one eviction at several tree sizes")
    ev.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    if args.cmd == "gen":
        base = TRACE_WORKLOADS[args.workload]
        names = {f.name for f in dataclasses.fields(base)} - {"seed"}
        overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
        wl = dataclasses.replace(base, **overrides)
        events, capacity = _trace(args.workload, wl, args, args.out)
        print(f"wrote {len(events)} events to {args.out} (capacity {capacity})")
        return
    if args.cmd == "replay":
        header, events = read_trace(args.trace)
        capacity = args.capacity or header["capacity"]
        st = best_replay(events, capacity, args.page_size, header["concurrency"], args.repeats,
                         args.policy)  # fmt: skip
        _print_replay(str(args.trace), st, best_hit_rate(events), unique_tokens(events))
        return
    if args.cmd == "policies":
        if args.gdsf_half_life:
            eviction.GDSF_HALF_LIFE = args.gdsf_half_life  # read at every score
        compare_policies(args)
        return
    if args.cmd is None:
        for kind, events, capacity in _iter_default_traces(args):
            best = best_hit_rate(events)
            unique = unique_tokens(events)
            st = best_replay(events, capacity, args.page_size, args.concurrency, args.repeats)
            _print_replay(f"{kind} (bench/out/{kind}.jsonl)", st, best, unique)
            unbounded = replay(
                events, unique + args.concurrency * 4096, args.page_size, args.concurrency
            )
            print(
                f"  unbounded replay hit rate {unbounded.hit_rate:.4f} "
                f"(evicted {unbounded.evicted_tokens})"
            )
    sizes = getattr(args, "sizes", [1000, 10000, 100000])
    print("\ncost of evicting one leaf (incremental LRU) vs one walk + heapify of the tree:")
    print(f"  {'leaves':>8} {'evict us':>10} {'walk+heapify us':>16} {'ratio':>8}")
    for row in evict_cost(sizes):
        print(
            f"  {row['leaves']:>8,d} {row['evict_us']:>10.2f} {row['walk_heapify_us']:>16.1f} "
            f"{row['walk_heapify_us'] / row['evict_us']:>8.0f}x"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {rss:.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
