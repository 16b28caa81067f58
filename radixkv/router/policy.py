"""How the router picks a worker for a request (`--router-policy`).

Every policy sees the workers in the rotation (`Candidate`: index, stable name, requests in flight
there, the router's prefix tree of its cache) and the request's tree key (its token ids, the first
salted when it has a cache salt), and returns one with the reason, which the router logs at debug
level.

- `cache_aware` (after SGLang's router, docs/scaling.md): the worker whose tree holds the longest
  prefix of the prompt if that covers more than `cache_threshold` of it (ties: the least loaded),
  else the worker with the smallest tree (the most room), ties by load. When load is imbalanced
  (the busiest worker has more than `balance_abs_threshold` requests more than the idlest and
  more than `balance_rel_threshold` times as many), a request without a cached prefix goes to the
  least loaded, and one whose prefix sits on the busiest worker goes elsewhere only if that
  prefix is hot there (more than `HOT` requests in flight share it): spreading a hot prefix costs
  one recomputation and then balances all its requests, while moving a cold one recomputes it for
  one request. Unlike SGLang's, the loads compared are moving averages of the requests in flight
  (over about the last ten routed), so a passing burst does not scatter a group.
- `round_robin`, `least_load`, `random`: ignore the prompt.
- `prefix_hash`: consistent hashing of the first `prefix_hash_tokens` keys onto a ring of the
  workers' names, so requests sharing those tokens go to one worker, and a worker leaving or
  joining moves only its share of the prefixes.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from radixkv.config import ServerArgs
from radixkv.router.tree import PrefixTree

VIRTUAL_NODES = 64  # ring points per worker: shares within a few percent of even


@dataclass(slots=True)
class Candidate:
    index: int
    name: str
    load: int  # requests in flight there
    tree: PrefixTree
    in_flight_keys: Callable[[], list[list[int]]] = lambda: []  # their tree keys, when asked

    def sharing(self, prefix: list[int]) -> int:
        """How many requests in flight here start with `prefix`."""
        n = len(prefix)
        return sum(1 for k in self.in_flight_keys() if k[:n] == prefix)


class Policy(abc.ABC):
    uses_trees = False  # whether the router keeps the per-worker prefix trees for it

    @abc.abstractmethod
    def choose(self, key: list[int], workers: list[Candidate]) -> tuple[Candidate, str]:
        """The worker for a request with this tree key, and why."""


class RoundRobin(Policy):
    def __init__(self) -> None:
        self.next = 0

    def choose(self, key: list[int], workers: list[Candidate]) -> tuple[Candidate, str]:
        # the first in the rotation at or after the turn (a worker out of it is skipped)
        ordered = sorted(workers, key=lambda w: w.index)
        pick = next((w for w in ordered if w.index >= self.next), ordered[0])
        self.next = pick.index + 1
        return pick, "round robin"


class LeastLoad(Policy):
    def choose(self, key: list[int], workers: list[Candidate]) -> tuple[Candidate, str]:
        pick = min(workers, key=lambda w: (w.load, w.index))
        return pick, f"least loaded ({pick.load} in flight)"


class Random(Policy):
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choose(self, key: list[int], workers: list[Candidate]) -> tuple[Candidate, str]:
        return self.rng.choice(workers), "random"


class PrefixHash(Policy):
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self._names: tuple[str, ...] = ()
        self._ring: list[tuple[int, str]] = []

    def choose(self, key: list[int], workers: list[Candidate]) -> tuple[Candidate, str]:
        names = tuple(sorted(w.name for w in workers))
        if names != self._names:
            self._names = names
            self._ring = sorted(
                (_hash(f"{name}#{v}".encode()), name)
                for name in names
                for v in range(VIRTUAL_NODES)
            )
        point = _hash(str(key[: self.tokens]).encode())
        i = bisect.bisect_left(self._ring, (point, "")) % len(self._ring)
        name = self._ring[i][1]
        return next(w for w in workers if w.name == name), "prefix hash"


class CacheAware(Policy):
    uses_trees = True
    SMOOTHING = 0.1  # weight of the newest sample in each worker's average load
    HOT = 2  # a prefix more requests than this share in flight on one worker is hot

    def __init__(self, cache_threshold: float, abs_threshold: int, rel_threshold: float) -> None:
        self.cache_threshold = cache_threshold
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.avg: dict[str, float] = {}  # a moving average of each worker's in-flight requests

    def choose(self, key: list[int], workers: list[Candidate]) -> tuple[Candidate, str]:
        for w in workers:
            prev = self.avg.get(w.name, float(w.load))
            self.avg[w.name] = prev + self.SMOOTHING * (w.load - prev)
        avg = {w.index: self.avg[w.name] for w in workers}
        busiest, idlest = max(avg.values()), min(avg.values())
        imbalanced = busiest - idlest > self.abs_threshold and busiest > idlest * self.rel_threshold
        matches = {w.index: w.tree.match(key) for w in workers}
        best = max(matches.values())
        by_match = sorted(workers, key=lambda w: (-matches[w.index], w.load, w.index))
        if key and best / len(key) > self.cache_threshold:
            pick = by_match[0]
            if imbalanced and avg[pick.index] == busiest and len(workers) > 1:
                sharing = pick.sharing(key[:best])
                if sharing > self.HOT:  # a hot prefix on the busiest worker: spread it
                    pick = next(w for w in by_match if avg[w.index] < busiest)
                    why = f"imbalanced ({busiest:.1f} vs {idlest:.1f} in flight on average)"
                    return pick, f"{why} and {sharing} in flight share this prefix: spread"
            return pick, f"longest cached prefix ({best} of {len(key)} tokens)"
        if imbalanced:
            pick = min(workers, key=lambda w: (w.load, -matches[w.index], w.index))
            return pick, f"imbalanced ({busiest:.1f} vs {idlest:.1f}): least loaded"
        pick = min(workers, key=lambda w: (w.tree.size, w.load, w.index))
        return pick, f"best match {best} of {len(key)} tokens under the threshold: smallest tree"


def make_policy(args: ServerArgs) -> Policy:
    name = args.router_policy
    if name == "cache_aware":
        return CacheAware(
            args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold
        )
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "random":
        return Random(args.seed)
    if name == "prefix_hash":
        return PrefixHash(args.prefix_hash_tokens)
    raise ValueError(f"unknown router policy {name!r}")


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
