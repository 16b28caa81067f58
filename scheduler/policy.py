"""Which waiting requests to admit first.

- `lpm`: longest cached prefix first (most reuse now, and the hit keeps that prefix hot).
- `dfs-weight`: walk the radix tree depth first, heavier subtrees (more waiting requests) first,
  so requests sharing a prefix run back to back while it is cached.
- `fcfs`, `lof` (longest output first), `random`: baselines.

Guards that apply to every policy:
- aging: a request passed over in `max_skips` admission rounds goes first, oldest first;
- window: cache-aware ordering looks at the oldest `window` requests only, the rest follow in
  arrival order, so one scheduling step costs O(window), not O(queue);
- in-batch sharing: of several requests that share `share_len` or more uncached tokens, only the
  first is admitted in a round; the others are deferred to the next round and hit its cache. A
  request part-way through a chunked prefill counts as the first: while it computes a long shared
  prompt chunk by chunk, the requests waiting to share it wait for it instead of computing it too.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence

from radixkv.mem import RadixCache
from radixkv.mem.radix_cache import TreeNode
from radixkv.scheduler.req import Req

# Cache-aware orders mark each looked-at waiting request's cached prefix used now (see
# `SchedulePolicy`); RADIXKV_REFRESH_WAITING=0 turns it off (A/B runs, docs/cache.md).
REFRESH_WAITING = os.environ.get("RADIXKV_REFRESH_WAITING", "1") != "0"


class SchedulePolicy:
    """Orders the waiting queue for one admission round.

    Cache-aware orders (`lpm`, `dfs-weight`) look up each request of the window in the tree
    without splitting edges, and mark the path its prefix reaches used now (`refresh_waiting`,
    as SGLang's prefix match does for its waiting requests): a prefix a queued request will reuse
    does not age while it waits, so under memory pressure the eviction policies take other leaves
    first (docs/cache.md, "Waiting requests")."""

    def __init__(
        self,
        policy: str,
        tree: RadixCache,
        *,
        max_skips: int = 32,
        window: int = 256,
        share_len: int = 32,
        seed: int = 0,
        refresh_waiting: bool = REFRESH_WAITING,
    ) -> None:
        if tree.disable and policy in ("lpm", "dfs-weight"):
            policy = "fcfs"  # nothing is cached: cache-aware orders degenerate to noise
        self.policy = policy
        self.tree = tree
        self.refresh_waiting = refresh_waiting
        self.max_skips = max_skips
        self.window = window
        self.share_len = share_len
        self._rng = random.Random(seed)

    @property
    def cache_aware(self) -> bool:
        return self.policy in ("lpm", "dfs-weight")

    def order(
        self, waiting: list[Req], in_flight: Sequence[Req] = ()
    ) -> tuple[list[Req], set[int]]:
        """Admission order, and the ids (`id(req)`) of requests deferred by in-batch sharing.
        `in_flight`: requests already in this round's batch (a chunked prefill continuing)."""
        by_arrival = sorted(waiting, key=lambda r: r.wait_order)
        aged = [r for r in by_arrival if r.skips >= self.max_skips]
        rest = [r for r in by_arrival if r.skips < self.max_skips]
        head, tail = rest[: self.window], rest[self.window :]
        if self.cache_aware:
            for r in head:
                r.match_len, r.match_node = self.tree.peek_prefix(r.tree_ids)
            if self.refresh_waiting:
                self.tree.refresh([r.match_node for r in head if r.match_len])
        if self.policy == "lpm":
            head.sort(key=lambda r: (-r.match_len, r.wait_order))
        elif self.policy == "dfs-weight":
            head = self._dfs_weight(head)
        elif self.policy == "lof":
            head.sort(key=lambda r: (-r.remaining_new_tokens, r.wait_order))
        elif self.policy == "random":
            self._rng.shuffle(head)
        ordered = aged + head + tail
        deferred = self._in_batch_deferred(head, in_flight) if self.cache_aware else set()
        if deferred:
            ordered = [r for r in ordered if id(r) not in deferred] + [
                r for r in ordered if id(r) in deferred
            ]
        return ordered, deferred

    def _dfs_weight(self, reqs: list[Req]) -> list[Req]:
        at_node: dict[int, list[Req]] = defaultdict(list)
        weight: dict[int, int] = defaultdict(int)
        for r in reqs:
            node = r.match_node if isinstance(r.match_node, TreeNode) else self.tree.root
            at_node[id(node)].append(r)
            walk: TreeNode | None = node
            while walk is not None:
                weight[id(walk)] += 1
                walk = walk.parent
        out: list[Req] = []
        stack = [self.tree.root]
        while stack:
            node = stack.pop()
            out.extend(sorted(at_node.get(id(node), []), key=lambda r: r.wait_order))
            children = [c for c in node.children.values() if weight.get(id(c))]
            # pushed lightest first so the heaviest subtree is visited next
            children.sort(key=lambda c: (weight[id(c)], -c.id))
            stack.extend(children)
        return out

    def _in_batch_deferred(self, head: list[Req], in_flight: Sequence[Req]) -> set[int]:
        """Requests whose next `share_len` uncached tokens repeat an earlier or in-flight
        request's. Keys come from `peek_prefix` for both, so a waiting request and an in-flight
        one with the same tokens meet at the same (node, matched length)."""
        seen: set[tuple] = set()
        for r in in_flight:
            ids = r.tree_ids
            match_len, node = self.tree.peek_prefix(ids)
            key = self._share_key(ids, match_len, node)
            if key is not None:
                seen.add(key)
        deferred: set[int] = set()
        for r in head:
            key = self._share_key(r.tree_ids, r.match_len, r.match_node)
            if key is None:
                continue
            if key in seen:
                deferred.add(id(r))
            else:
                seen.add(key)
        return deferred

    def _share_key(self, ids: list[int], match_len: int, node: object) -> tuple | None:
        if len(ids) - match_len <= self.share_len:
            return None  # too little left to be worth waiting for
        return (id(node), match_len, tuple(ids[match_len : match_len + self.share_len]))
