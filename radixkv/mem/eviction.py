"""Which unlocked leaf of the radix tree goes first (`--radix-eviction-policy`).

Evictable leaves live in one sorted list whose order is the policy's key of each leaf, computed
from the leaf's own fields (`last_access`, `hits`, `created`, `score`), which change only while
the leaf is out of the list (`RadixCache._touch` takes it out, updates it, puts it back). So every
policy costs O(log n) per touch, lock, unlock and eviction, never a walk over the leaves.

- `lru`: least recently used first (the default; SGLang's and vLLM's).
- `lfu`: fewest hits first, then least recently used.
- `fifo` / `filo`: oldest / newest first.
- `mru`: most recently used first (for a scan that will not come back).
- `slru`: segmented LRU: leaves hit once (probation) before leaves hit again (protected), LRU
  within each.
- `gdsf` (ours, docs/cache.md): Greedy-Dual-Size-Frequency for a prefix tree. A leaf's score is
  `L + hits x cost`, where `cost` is what recomputing one of its tokens costs relative to a token
  at the start of a prompt: `1 + depth / GDSF_DEPTH_TOKENS` (attention over `depth` earlier tokens
  adds to the fixed per-token cost of the weights) and `L` is the score of the last leaf evicted,
  so a leaf that stops being used ages below the ones still hit. Lowest score first.
"""

from __future__ import annotations

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
        "lru": lambda n: (n.last_access, n.id),
        "lfu": lambda n: (n.hits, n.last_access, n.id),
        "fifo": lambda n: (n.created, n.id),
        "filo": lambda n: (-n.created, -n.id),
        "mru": lambda n: (-n.last_access, -n.id),
        "slru": lambda n: (n.hits > 1, n.last_access, n.id),
        "gdsf": lambda n: (n.score, n.last_access, n.id),
    }
    if policy not in keys:
        raise ValueError(f"unknown eviction policy {policy!r}; choose one of "
                         f"{', '.join(EVICTION_POLICIES)}")  # fmt: skip
    return keys[policy]


def gdsf_score(inflation: float, hits: int, depth: int) -> float:
    """A leaf's GDSF score: the aging floor plus its hits weighted by its recomputation cost."""
    return inflation + hits * (1.0 + depth / GDSF_DEPTH_TOKENS)
