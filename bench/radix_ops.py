"""Radix-cache operation traces: generate them from shared-prefix chat workloads, replay them.

    python bench/radix_ops.py                      # default traces, replays, eviction cost
    python bench/radix_ops.py gen shared-prefix --out trace.jsonl [--groups 16 ...]
    python bench/radix_ops.py replay trace.jsonl [--page-size 16] [--capacity N]
    python bench/radix_ops.py evict-cost [--sizes 1000 10000 100000]

The trace format and the replay rules are in docs/radix_ops.md. Everything is seeded: the same
arguments give the same trace, byte for byte.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from radixkv.mem import KVCacheManager, KVLayout, RadixCache, ReqToTokenPool, TokenToKVPool

VOCAB = 49152  # SmolLM2's vocabulary size: token ids look like real ones
OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class SharedPrefix:
    """Groups of users sharing one system prompt; each asks one question (SGLang's defaults)."""

    groups: int = 64
    prompts_per_group: int = 16
    system_len: int = 2048
    question_len: int = 128
    output_len: int = 256


@dataclass(frozen=True)
class MultiTurn:
    """Conversations of several turns; each prompt carries the whole history."""

    conversations: int = 64
    turns: int = 8
    system_len: int = 512
    user_len: int = 128
    output_len: int = 128


# ---- trace generation ----------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _conversations(kind: str, wl: SharedPrefix | MultiTurn, rng: random.Random):
    """Each conversation is a list of (prompt, output) turns; a turn's prompt extends the last."""
    if isinstance(wl, SharedPrefix):
        systems = [_tokens(rng, wl.system_len) for _ in range(wl.groups)]
        return [
            [(systems[g] + _tokens(rng, wl.question_len), _tokens(rng, wl.output_len))]
            for g in range(wl.groups)
            for _ in range(wl.prompts_per_group)
        ]
    convs = []
    system = _tokens(rng, wl.system_len)
    for _ in range(wl.conversations):
        history, turns = list(system), []
        for _ in range(wl.turns):
            prompt = history + _tokens(rng, wl.user_len)
            output = _tokens(rng, wl.output_len)
            turns.append((prompt, output))
            history = prompt + output
        convs.append(turns)
    return convs


def generate(kind: str, wl: SharedPrefix | MultiTurn, *, concurrency: int, seed: int) -> list[dict]:
    """Events with up to `concurrency` requests in flight; arrivals shuffled, finishes random.

    A conversation's next turn arrives only after its previous turn finished.
    """
    rng = random.Random(seed)
    convs = _conversations(kind, wl, rng)
    ready = list(range(len(convs)))
    rng.shuffle(ready)
    next_turn = [0] * len(convs)
    in_flight: list[tuple[int, int]] = []  # (rid, conversation)
    events: list[dict] = []
    rid = 0
    while ready or in_flight:
        if ready and len(in_flight) < concurrency and (not in_flight or rng.random() < 0.6):
            c = ready.pop(rng.randrange(len(ready)))
            events.append({"op": "arrive", "rid": rid, "tokens": convs[c][next_turn[c]][0]})
            in_flight.append((rid, c))
            rid += 1
            continue
        done, c = in_flight.pop(rng.randrange(len(in_flight)))
        events.append({"op": "finish", "rid": done, "output": convs[c][next_turn[c]][1]})
        next_turn[c] += 1
        if next_turn[c] < len(convs[c]):
            ready.append(c)
    return events


def unique_tokens(events: list[dict]) -> int:
    """Distinct token prefixes in the trace: the KV a cache with no limit would end up holding."""
    trie: dict = {}
    count = 0
    prompts: dict[int, list[int]] = {}
    for ev in events:
        if ev["op"] == "arrive":
            prompts[ev["rid"]] = ev["tokens"]
            continue
        node = trie
        for tok in prompts[ev["rid"]] + ev["output"][:-1]:
            if tok not in node:
                node[tok] = {}
                count += 1
            node = node[tok]
    return count


def write_trace(path: Path, header: dict, events: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"kind": "header", **header}) + "\n")
        for ev in events:
            f.write(json.dumps(ev, separators=(",", ":")) + "\n")


def read_trace(path: Path) -> tuple[dict, list[dict]]:
    with path.open() as f:
        header = json.loads(f.readline())
        if header.get("kind") != "header":
            raise SystemExit(f"{path}: the first line must be the trace header")
        return header, [json.loads(line) for line in f]


# ---- replay --------------------------------------------------------------------------------------


def best_hit_rate(events: list[dict]) -> tuple[int, int]:
    """(best matchable tokens, prompt tokens) with unlimited capacity: every arrival matches the
    longest prefix (minus its last token) of anything seen before, by a plain token trie."""
    trie: dict = {}
    matched = total = 0
    prompts: dict[int, list[int]] = {}

    def add(tokens: list[int]) -> None:
        node = trie
        for tok in tokens:
            node = node.setdefault(tok, {})

    for ev in events:
        if ev["op"] == "arrive":
            tokens = ev["tokens"]
            prompts[ev["rid"]] = tokens
            node, n = trie, 0
            for tok in tokens[:-1]:
                if tok not in node:
                    break
                node, n = node[tok], n + 1
            matched += n
            total += len(tokens)
            add(tokens)
        else:
            add(prompts[ev["rid"]] + ev["output"][:-1])
    return matched, total


@dataclass
class ReplayStats:
    events: int
    seconds: float
    prompt_tokens: int
    matched_tokens: int
    evicted_tokens: int
    rejected: int
    peak_kv_slots: int
    capacity: int
    page_size: int

    @property
    def ops_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.matched_tokens / max(1, self.prompt_tokens)


def replay(events: list[dict], capacity: int, page_size: int, concurrency: int) -> ReplayStats:
    """Drive the KV hierarchy through the trace (rules in docs/radix_ops.md)."""
    capacity = capacity // page_size * page_size
    pool = TokenToKVPool(KVLayout(1, 1, 1), capacity, page_size=page_size)
    tree = RadixCache(pool)
    max_len = max(len(e["tokens"]) for e in events if e["op"] == "arrive")
    max_len += max(len(e["output"]) for e in events if e["op"] == "finish")
    mgr = KVCacheManager(pool, ReqToTokenPool(concurrency, max_len), tree)
    running: dict = {}
    matched = prompt_tokens = rejected = peak = 0
    start = time.perf_counter()
    for ev in events:
        if ev["op"] == "arrive":
            tokens = ev["tokens"]
            seq = mgr.admit(tokens)
            if seq is None:
                raise SystemExit(
                    f"trace has more requests in flight than --concurrency {concurrency}"
                )
            prompt_tokens += len(tokens)
            matched += seq.cached_len
            if mgr.alloc_extend(seq, len(tokens)) is None:
                mgr.release(seq)
                rejected += 1
                continue
            mgr.cache_unfinished(seq, tokens)
            running[ev["rid"]] = (seq, tokens)
        elif ev["rid"] in running:
            seq, tokens = running.pop(ev["rid"])
            full = tokens + ev["output"]
            if mgr.alloc_extend(seq, len(full) - 1) is None:
                mgr.release(seq)
                rejected += 1
                continue
            mgr.cache_finished(seq, full)
        peak = max(peak, capacity - pool.available_size())
    seconds = time.perf_counter() - start
    mgr.check_integrity([s for s, _ in running.values()])
    return ReplayStats(
        events=len(events),
        seconds=seconds,
        prompt_tokens=prompt_tokens,
        matched_tokens=matched,
        evicted_tokens=tree.evicted_tokens,
        rejected=rejected,
        peak_kv_slots=peak,
        capacity=capacity,
        page_size=page_size,
    )


def best_replay(
    events: list[dict], capacity: int, page_size: int, concurrency: int, repeats: int
) -> ReplayStats:
    """The fastest of `repeats` replays (a replay takes ~0.1-0.4 s: one run is mostly noise).
    Replays are deterministic, so every run must report the same counts."""
    runs = [replay(events, capacity, page_size, concurrency) for _ in range(max(1, repeats))]
    counts = {(r.matched_tokens, r.evicted_tokens, r.rejected) for r in runs}
    assert len(counts) == 1, f"replays disagree: {counts}"
    return min(runs, key=lambda r: r.seconds)


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


def _iter_default_traces(args: argparse.Namespace) -> Iterator[tuple[str, list[dict], int]]:
    for kind, wl in (("shared-prefix", SharedPrefix()), ("multi-turn", MultiTurn())):
        events = generate(kind, wl, concurrency=args.concurrency, seed=args.seed)
        unique = unique_tokens(events)
        capacity = int(unique * args.capacity_frac)
        header = {
            "version": 1,
            "workload": kind,
            "params": asdict(wl),
            "seed": args.seed,
            "concurrency": args.concurrency,
            "capacity": capacity,
        }
        write_trace(OUT_DIR / f"{kind}.jsonl", header, events)
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
    gen.add_argument("workload", choices=["shared-prefix", "multi-turn"])
    gen.add_argument("--out", type=Path, required=True)
    for field, default in {**asdict(SharedPrefix()), **asdict(MultiTurn())}.items():
        gen.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=None, help=f"(default {default})"
        )
    rep = sub.add_parser("replay", help="replay a trace")
    rep.add_argument("trace", type=Path)
    rep.add_argument("--capacity", type=int, default=None, help="default: the header's")
    ev = sub.add_parser("evict-cost", help="cost of one eviction at several tree sizes")
    ev.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    if args.cmd == "gen":
        cls = SharedPrefix if args.workload == "shared-prefix" else MultiTurn
        overrides = {
            k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None
        }
        wl = cls(**overrides)
        events = generate(args.workload, wl, concurrency=args.concurrency, seed=args.seed)
        capacity = int(unique_tokens(events) * args.capacity_frac)
        header = {
            "version": 1,
            "workload": args.workload,
            "params": asdict(wl),
            "seed": args.seed,
            "concurrency": args.concurrency,
            "capacity": capacity,
        }
        write_trace(args.out, header, events)
        print(f"wrote {len(events)} events to {args.out} (capacity {capacity})")
        return
    if args.cmd == "replay":
        header, events = read_trace(args.trace)
        capacity = args.capacity or header["capacity"]
        st = best_replay(events, capacity, args.page_size, header["concurrency"], args.repeats)
        _print_replay(str(args.trace), st, best_hit_rate(events), unique_tokens(events))
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
