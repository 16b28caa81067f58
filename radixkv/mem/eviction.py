"""Which unlocked leaf of the radix tree goes first (`--radix-eviction-policy`).

Evictable leaves live in one sorted list whose order is the policy's key of each leaf, computed
from the leaf's own fields (`last_access`, `hits`, `created`, `score`), which change only while
the leaf is out of the list (`RadixCache._touch` takes it out, updates it, puts it back). So every
policy costs O(log n) per touch, lock, unlock and eviction, never a walk over the leaves.

Every online policy first takes the leaves `RadixCache.demote` marked as needed by no one (`keep`
0: a closed session's conversation, docs/cache.md "Sessions"), in its own order among them.

- `lru`: least recently used first (the default; SGLang's and vLLM's).
- `lfu`: fewest hits first, then least recently used.
- `fifo` / `filo`: oldest / newest first.
- `mru`: most recently used first (for a scan that will not come back).
- `slru`: segmented LRU: leaves hit once (probation) before leaves hit again (protected), LRU
  within each.
- `priority`: the lowest request `priority` first, LRU within one (SGLang's): a node's priority
  is the highest of the requests that cached through it, so a prefix shared with an important
  request stays as long as that request's own tail.
- `gdsf` (ours, docs/cache.md): Greedy-Dual-Size-Frequency for a prefix tree, with exponential
  aging: a leaf is worth `hits x cost x 2^(last use / GDSF_HALF_LIFE)`, where `cost` is what
  recomputing one of its tokens costs relative to a token at the start of a prompt,
  `1 + depth / GDSF_DEPTH_TOKENS` (attention over `depth` earlier tokens adds to the fixed
  per-token cost of the weights). Lowest first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from radixkv.config import RADIX_EVICTION_POLICIES

EVICTION_POLICIES = RADIX_EVICTION_POLICIES  # `--radix-eviction-policy`
# A token at this depth costs about twice one at depth 0 to recompute. For SmolLM2-135M, attention
# at depth d costs ~4 d x hidden x layers FLOPs per token against ~2 x 135M for the weights:
# equal at d ~ 3,900.
GDSF_DEPTH_TOKENS = 4096


def eviction_key(policy: str) -> Callable[[Any], tuple[float, ...]]:
    """The sort key of a leaf under `policy` (smallest evicted first)."""
    keys: dict[str, Callable[[Any], tuple[float, ...]]] = {
        "lru": lambda n: (n.keep, n.last_access, n.id),
        "lfu": lambda n: (n.keep, n.hits, n.last_access, n.id),
        "fifo": lambda n: (n.keep, n.created, n.id),
        "filo": lambda n: (n.keep, -n.created, -n.id),
        "mru": lambda n: (n.keep, -n.last_access, -n.id),
        "slru": lambda n: (n.keep, n.hits > 1, n.last_access, n.id),
        "priority": lambda n: (n.keep, n.priority, n.last_access, n.id),
        "gdsf": lambda n: (n.keep, n.score, n.last_access, n.id),
        # offline only (bench/radix_ops.py): the score is minus the next use, farthest first
        "belady": lambda n: (n.score, n.id),
    }
    if policy not in keys:
        raise ValueError(f"unknown eviction policy {policy!r}; choose one of "
                         f"{', '.join(EVICTION_POLICIES)}")  # fmt: skip
    return keys[policy]


# Ticks of the tree's access clock (one per match or insert: ~3 per request) over which a leaf's
# weight halves. Measured on bench/'s traces at 50 % capacity (`bench/radix_ops.py policies`,
# the half-life varied): multi-turn loses to LRU by 0.1 point at 4-16 ticks, 0.9 at 32, 1.1 at
# 64, 10 at 256 (a finished conversation's path, once hit, outlives live ones); shared-prefix is
# within 0.1 point of the unbounded rate at any of them.
GDSF_HALF_LIFE = 16


def gdsf_score(hits: int, depth: int, clock: int) -> float:
    """A leaf's score: the log of its hits weighted by its recomputation cost, plus its last use
    in units of the half-life: the order of `hits x cost x 2^(clock / half-life)`, i.e. of an
    exponentially decayed frequency, which every leaf decays at the same rate, so the order
    never needs re-keying as time passes."""
    return math.log2(max(hits, 1) * (1.0 + depth / GDSF_DEPTH_TOKENS)) + clock / GDSF_HALF_LIFE
