"""Radix-cache operation traces: made from the token-level workloads, replayed on the KV hierarchy.

A trace is a list of events, `{"op": "arrive", "rid", "tokens", "session"}` and `{"op":
"finish", "rid", "output"}` (`"last": true` on a conversation's last turn), with up to
`concurrency` requests in flight; a conversation's next turn arrives only after its previous turn
finished, with that turn's output in its prompt. The file format (JSON
lines after a header) and the replay rules are in docs/radix_ops.md. Everything is seeded: the same
arguments give the same trace, byte for byte.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixkv.frontend.sessions import SessionStore
from radixkv.mem import KVCacheManager, KVLayout, RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.protocol import SessionParams
from radixkv.tools.workloads import GeneratedSharedPrefix, MultiTurnChat, PrefixTrie

# SGLang's generated-shared-prefix defaults, a multi-turn chat of the same scale, and the same chat
# with 1-16 turns per conversation (where a conversation's depth does not tell whether it is over).
TRACE_WORKLOADS: dict[str, GeneratedSharedPrefix | MultiTurnChat] = {
    "shared-prefix": GeneratedSharedPrefix(64, 16, 2048, 128, 256),
    "multi-turn": MultiTurnChat(chats=64, turns=8, system_len=512, user_len=128, output_len=128),
    "multi-turn-varied": MultiTurnChat(
        chats=64, turns=16, system_len=512, user_len=128, output_len=128, min_turns=1
    ),
}


def generate(
    workload: GeneratedSharedPrefix | MultiTurnChat, *, concurrency: int, seed: int
) -> list[dict[str, Any]]:
    """Events with up to `concurrency` requests in flight; arrivals shuffled, finishes random,
    outputs random tokens of each turn's `max_new_tokens`. An arrival names its conversation
    (`session`); the finish of a conversation's last turn says so (`last`), as a client that
    closes its session then would."""
    rng = random.Random(seed)
    convs = dataclasses.replace(workload, seed=seed).conversations()
    ready = list(range(len(convs)))
    rng.shuffle(ready)
    history = [list(c.prefix_ids) for c in convs]
    next_turn = [0] * len(convs)
    in_flight: list[tuple[int, int, list[int]]] = []  # (rid, conversation, prompt)
    events: list[dict[str, Any]] = []
    rid = 0
    while ready or in_flight:
        if ready and len(in_flight) < concurrency and (not in_flight or rng.random() < 0.6):
            c = ready.pop(rng.randrange(len(ready)))
            prompt = history[c] + convs[c].turns[next_turn[c]].user_ids
            events.append({"op": "arrive", "rid": rid, "tokens": prompt, "session": c})
            in_flight.append((rid, c, prompt))
            rid += 1
            continue
        done, c, prompt = in_flight.pop(rng.randrange(len(in_flight)))
        turn = convs[c].turns[next_turn[c]]
        output = [rng.randrange(1000, 40000) for _ in range(turn.max_new_tokens)]
        history[c] = prompt + output
        next_turn[c] += 1
        if next_turn[c] < len(convs[c].turns):
            ready.append(c)
            events.append({"op": "finish", "rid": done, "output": output})
        else:
            events.append({"op": "finish", "rid": done, "output": output, "last": True})
    return events


def unique_tokens(events: list[dict[str, Any]]) -> int:
    """Distinct token prefixes in the trace: the KV a cache with no limit would end up holding."""
    trie = PrefixTrie()
    prompts: dict[int, list[int]] = {}
    for ev in events:
        if ev["op"] == "arrive":
            prompts[ev["rid"]] = ev["tokens"]
        else:
            trie.insert(prompts[ev["rid"]] + ev["output"][:-1])
    return trie.size


def best_hit_rate(events: list[dict[str, Any]]) -> tuple[int, int]:
    """(best matchable tokens, prompt tokens) with unlimited capacity: every arrival matches the
    longest prefix (minus its last token) of anything seen before."""
    trie = PrefixTrie()
    matched = total = 0
    prompts: dict[int, list[int]] = {}
    for ev in events:
        if ev["op"] == "arrive":
            tokens = prompts[ev["rid"]] = ev["tokens"]
            matched += trie.match(tokens)
            total += len(tokens)
            trie.insert(tokens)
        else:
            trie.insert(prompts[ev["rid"]] + ev["output"][:-1])
    return matched, total


def write_trace(path: Path, header: dict[str, Any], events: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps({"kind": "header", **header}) + "\n")
        for ev in events:
            f.write(json.dumps(ev, separators=(",", ":")) + "\n")


def read_trace(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with path.open() as f:
        header = json.loads(f.readline())
        if header.get("kind") != "header":
            raise ValueError(f"{path}: the first line must be the trace header")
        return header, [json.loads(line) for line in f]


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


class FutureUses:
    """When each prefix of a trace is next used: a compressed trie of every arriving prompt, each
    edge with the (ascending) arrival numbers of the prompts that pass through it."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.root: list[Any] = [[], {}, []]  # [edge tokens, children by first token, arrivals]
        for n, tokens in enumerate(e["tokens"] for e in events if e["op"] == "arrive"):
            self._insert(tokens, n)

    def _insert(self, tokens: list[int], n: int) -> None:
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node[1].get(tokens[pos])
            if child is None:
                node[1][tokens[pos]] = [tokens[pos:], {}, [n]]
                return
            edge = child[0]
            m = min(len(edge), len(tokens) - pos)
            if edge[:m] != tokens[pos : pos + m]:  # (equal is the usual case: compared in C)
                m = 0
                while edge[m] == tokens[pos + m]:
                    m += 1
            if m < len(edge):  # split: the upper part carries every arrival so far, and this one
                lower = [edge[m:], child[1], child[2]]
                child[0], child[1], child[2] = edge[:m], {edge[m]: lower}, list(child[2])
            child[2].append(n)
            node, pos = child, pos + m

    def next_use(self, path: list[int], depth: int, now: int) -> float:
        """The first arrival after `now` whose prompt reaches position `depth` of `path` (so
        reuses at least the token there); infinity if none does."""
        node, pos = self.root, 0
        while True:
            child = node[1].get(path[pos]) if pos < len(path) else None
            if child is None:
                return float("inf")
            edge = child[0]
            end = pos + len(edge)
            if path[pos : min(end, depth + 1)] != edge[: min(end, depth + 1) - pos]:
                return float("inf")
            if depth < end:
                arrivals = child[2]
                i = bisect.bisect_right(arrivals, now)
                return arrivals[i] if i < len(arrivals) else float("inf")
            node, pos = child, end


class BeladyCache(RadixCache):
    """The offline optimum's eviction on the radix tree (Belady's rule): the unlocked leaf whose
    next use is farthest goes first. A node's next use changes only when an arrival uses it,
    which touches it, so scoring at each touch (and split, and when it becomes a leaf) keeps
    every key right."""

    def __init__(self, kv_pool: TokenToKVPool, future: FutureUses) -> None:
        self.future = future
        self.now = -1  # the arrival being served
        super().__init__(kv_pool, eviction_policy="belady")

    def _rescore(self, node: Any) -> None:
        path = self._path(node)
        depth = len(path) - len(node.key)
        node.score = -self.future.next_use(path, depth, self.now)


class EndsKnownCache(BeladyCache):
    """LRU that knows which paths the trace never uses again (a conversation that is over)
    and evicts those first, least recently used first, then LRU among the rest: an offline
    reference for how much of LRU's gap to the optimum is that one piece of knowledge, which
    no online policy has (docs/cache.md)."""

    def _rescore(self, node: Any) -> None:
        path = self._path(node)
        used_again = self.future.next_use(path, len(path) - len(node.key), self.now) < math.inf
        node.score = node.last_access + (_NEVER_AGAIN_FIRST if used_again else 0)


_NEVER_AGAIN_FIRST = 1 << 50  # above any clock of a replay


class DepthOddsCache(BeladyCache):
    """The most a policy that predicts a conversation's end from its depth could make of it: a
    leaf's score is the log-odds that the trace continues a request ending in the same
    `DEPTH_BIN`-token bin as the last request cached through the leaf (the whole trace's rate:
    statistics, not each request's future), plus its last use / `horizon` (recency: a
    conversation idle longer is likelier over). An offline reference (docs/cache.md): an online
    policy could at best learn these rates."""

    def __init__(self, kv_pool: TokenToKVPool, future: FutureUses,
                 events: list[dict[str, Any]], horizon: float) -> None:  # fmt: skip
        self.horizon = horizon
        self.odds = continuation_log_odds(events, future)
        self.reach: dict[int, int] = {}  # node id: length of the last sequence cached through it
        self._inserting: int | None = None
        super().__init__(kv_pool, future)

    def insert_and_match(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        self._inserting = len(tokens)
        try:
            return super().insert_and_match(tokens, *args, **kwargs)
        finally:
            self._inserting = None

    def _touch(self, node: Any, hit: bool = False, priority: int = 0) -> None:
        if self._inserting is not None:
            self.reach[node.id] = self._inserting
        super()._touch(node, hit, priority)

    def _split(self, child: Any, m: int) -> Any:
        head = super()._split(child, m)
        if child.id in self.reach:
            self.reach[head.id] = self.reach[child.id]
        return head

    def _rescore(self, node: Any) -> None:
        end = node.depth + len(node.key)
        reach = self.reach.setdefault(node.id, self._inserting or end)  # a new leaf: its insert's
        node.score = self.odds.get(reach // DEPTH_BIN, 0.0) + node.last_access / self.horizon


DEPTH_BIN = 256  # tokens


def continuation_log_odds(events: list[dict[str, Any]], future: FutureUses) -> dict[int, float]:
    """Per `DEPTH_BIN` bin of a finished request's cached length: the log-odds that a later
    prompt continues it (reaches its last cached token), over the whole trace."""
    ends: dict[int, list[int]] = {}
    prompts: dict[int, list[int]] = {}
    arrivals = 0
    for ev in events:
        if ev["op"] == "arrive":
            prompts[ev["rid"]] = ev["tokens"]
            arrivals += 1
            continue
        full = prompts.pop(ev["rid"]) + ev["output"]
        cached = len(full) - 1  # the last sampled token has no KV
        went_on = future.next_use(full, cached - 1, arrivals - 1) < math.inf
        ends.setdefault(cached // DEPTH_BIN, [0, 0])[went_on] += 1
    return {b: math.log((n[1] + 0.5) / (n[0] + 0.5)) for b, n in ends.items()}


def replay(
    events: list[dict[str, Any]],
    capacity: int,
    page_size: int,
    concurrency: int,
    policy: str = "lru",
    sessions: bool = False,
) -> ReplayStats:
    """Drive the KV hierarchy through the trace (rules in docs/radix_ops.md), evicting by
    `policy` (`--radix-eviction-policy`, or, knowing the trace, "belady": the offline optimum,
    "ends-known": `EndsKnownCache`, or "depth-odds:H": `DepthOddsCache` with horizon H).
    `sessions`: each conversation is a session (`radixkv.frontend.sessions`), each turn continues
    the previous one, and the session is closed after its last turn, its paths demoted in the
    cache, as the runtime does for a client that closes its sessions."""
    capacity = capacity // page_size * page_size
    pool = TokenToKVPool(KVLayout(1, 1, 1), capacity, page_size=page_size)
    tree: RadixCache
    if policy in ("belady", "ends-known"):
        tree = (BeladyCache if policy == "belady" else EndsKnownCache)(pool, FutureUses(events))
    elif policy.startswith("depth-odds:"):  # depth-odds:H
        tree = DepthOddsCache(pool, FutureUses(events), events, float(policy.split(":")[1]))
    else:
        tree = RadixCache(pool, eviction_policy=policy)
    max_len = max(len(e["tokens"]) for e in events if e["op"] == "arrive")
    max_len += max(len(e["output"]) for e in events if e["op"] == "finish")
    mgr = KVCacheManager(pool, ReqToTokenPool(concurrency, max_len), tree)
    running: dict = {}
    chats = _Sessions(tree) if sessions else None
    matched = prompt_tokens = rejected = peak = 0
    start = time.perf_counter()
    arrivals = 0
    for ev in events:
        if ev["op"] == "arrive":
            if isinstance(tree, BeladyCache):
                tree.now = arrivals
            arrivals += 1
            tokens = ev["tokens"]
            if chats is not None:
                chats.arrive(ev)
            seq = mgr.admit(tokens)
            if seq is None:
                raise ValueError(f"the trace has more requests in flight than {concurrency}")
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
            else:
                mgr.cache_finished(seq, full)
        if chats is not None and ev["op"] == "finish":
            chats.finish(ev)  # after its path was cached: closing demotes it
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


class _Sessions:
    """A replay's conversations as sessions: every turn continues the one before it (the trace's
    prompt is that turn's prompt and output plus the new input), and the last one closes it."""

    def __init__(self, tree: RadixCache) -> None:
        self.tree = tree
        self.store = SessionStore(max_sessions=1 << 30)
        self.last: dict[int, str] = {}  # conversation: its latest request's rid
        self.conversation: dict[int, int] = {}  # rid: conversation

    def arrive(self, ev: dict[str, Any]) -> None:
        c, rid, tokens = ev["session"], str(ev["rid"]), ev["tokens"]
        sid = str(c)
        if sid not in self.store.sessions:
            self.store.open(sid, 0, None)
        params = SessionParams(id=sid, rid=self.last.get(c))
        history = 0
        if params.rid is not None:
            history = self.store.sessions[sid].requests[params.rid].length()
        sp = self.store.prompt(params, tokens[history:], None, rid)
        assert sp.ids == tokens, "a turn's prompt is its conversation's history and new input"
        self.store.start((b"", rid), sp)
        self.last[c], self.conversation[ev["rid"]] = rid, c

    def finish(self, ev: dict[str, Any]) -> None:
        self.store.finish((b"", str(ev["rid"])), ev["output"])
        c = self.conversation.pop(ev["rid"])
        if ev.get("last"):
            for path, shared in self.store.close(str(c), None):
                self.tree.demote(path, shared)


def best_replay(
    events: list[dict],
    capacity: int,
    page_size: int,
    concurrency: int,
    repeats: int,
    policy: str = "lru",
    sessions: bool = False,
) -> ReplayStats:
    """The fastest of `repeats` replays (a replay takes ~0.1-0.4 s: one run is mostly noise).
    Replays are deterministic, so every run must report the same counts."""
    runs = [
        replay(events, capacity, page_size, concurrency, policy, sessions)
        for _ in range(max(1, repeats))
    ]
    counts = {(r.matched_tokens, r.evicted_tokens, r.rejected) for r in runs}
    assert len(counts) == 1, f"replays disagree: {counts}"
    return min(runs, key=lambda r: r.seconds)
