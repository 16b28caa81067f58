"""Stateful property test of the whole KV hierarchy against a simple reference model.

The reference keeps every cached token prefix (as a tuple) with the slot of its last token and the
logical time it was last touched. Random admits, prefill chunks, decodes, finishes, aborts,
evictions and resets run on both; after every step the tree must hold exactly the reference's
prefixes and slots, and the pool accounting must balance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from radixkv.mem import (
    KVCacheManager,
    KVLayout,
    RadixCache,
    ReqToTokenPool,
    SeqSlots,
    TokenToKVPool,
)
from radixkv.mem.host_tier import HostTier
from radixkv.mem.radix_cache import TreeNode

Prefix = tuple[int, ...]
DEMOTED = 1 << 40  # a demoted page's reference time is its last touch minus this


class Reference:
    """A prefix-closed dict of cached pages: token prefix (a page multiple long) → [slots of its
    last page, last touch time]. With page size 1 a page is a token."""

    def __init__(self, page_size: int) -> None:
        self.page = page_size
        self.entries: dict[Prefix, list] = {}
        self.clock = 0

    def longest(self, tokens: list[int], limit: int) -> int:
        n = 0
        while n + self.page <= limit and tuple(tokens[: n + self.page]) in self.entries:
            n += self.page
        return n

    def touch(self, tokens: list[int], n: int) -> None:
        self.clock += 1
        for i in range(self.page, n + 1, self.page):
            self.entries[tuple(tokens[:i])][1] = self.clock

    def insert(self, tokens: list[int], slots: list[int]) -> None:
        aligned = len(tokens) // self.page * self.page
        self.clock += 1
        for i in range(self.page, aligned + 1, self.page):
            entry = self.entries.setdefault(tuple(tokens[:i]), [tuple(slots[i - self.page : i]), 0])
            entry[1] = self.clock

    def slots(self, tokens: list[int], n: int) -> list[int]:
        pages = [self.entries[tuple(tokens[:i])][0] for i in range(self.page, n + 1, self.page)]
        return [slot for page in pages for slot in page]

    def leaves(self) -> set[Prefix]:
        parents = {p[: -self.page] for p in self.entries}
        return {p for p in self.entries if p not in parents}

    def tokens(self) -> int:
        return len(self.entries) * self.page


def tree_contents(tree: RadixCache) -> dict[Prefix, tuple[int, ...]]:
    """Every cached page with its slots, read from the nodes (touches nothing)."""
    page = tree.page_size
    out: dict[Prefix, tuple[int, ...]] = {}
    stack: list[tuple[TreeNode, Prefix]] = [(tree.root, ())]
    while stack:
        node, path = stack.pop()
        values = node.value.tolist()
        for j in range(0, len(node.key), page):
            path = (*path, *node.key[j : j + page])
            out[path] = tuple(values[j : j + page])
        stack.extend((child, path) for child in node.children.values())
    return out


@dataclass(eq=False)
class Running:
    seq: SeqSlots
    tokens: list[int]  # prompt, then sampled outputs
    prompt_len: int
    chunk: int
    done: bool = field(default=False)


class HierarchyMachine(RuleBasedStateMachine):
    page_size = 1
    kv_dtype = torch.float32  # int8 / fp8: a quantized pool (codes and scales)
    eviction_policy = "lru"  # the others: the same invariants, their own order (not checked here)

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        p = self.page_size
        self.seg = max(p, 3)
        capacity = -(-10 * self.seg // p) * p
        self.pool = TokenToKVPool(KVLayout(1, 1, 2, self.kv_dtype), capacity, page_size=p)
        self.tree = RadixCache(self.pool, eviction_policy=self.eviction_policy)
        self.mgr = KVCacheManager(self.pool, ReqToTokenPool(4, 6 * self.seg + 40), self.tree)
        self.ref = Reference(p)
        self.running: list[Running] = []
        self.sample = 0

    # ---- helpers ----------------------------------------------------------------------------

    def locked_prefixes(self) -> set[Prefix]:
        page = self.page_size
        return {
            tuple(r.tokens[:i])
            for r in self.running
            for i in range(page, r.seq.cached_len + 1, page)
        }

    def lower_tier_hit(self, prompt: list[int], limit: int) -> int:
        """How much of `prompt` a lower tier could load (0: there is none)."""
        return 0

    def next_token(self) -> int:
        self.sample += 1
        return 100 + self.sample % 3

    def write_kv(self, r: Running, start: int, end: int) -> None:
        """What the model would store for positions [start, end): K = V = (token + 1, pos + 1)."""
        slots = self.mgr.req_pool.read(r.seq.row, start, end)
        values = self.expected_kv(r.tokens, start, end)
        self.pool.set_kv(0, slots, values, values)

    @staticmethod
    def expected_kv(tokens: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, dtype=torch.float32)
        return torch.stack([torch.tensor(tokens[start:end]) + 1.0, pos + 1], -1)[:, None, :]

    def check_cached_kv(self, r: Running, n: int) -> None:
        """The slots the tree gave for a prefix hold that prefix's K/V (decoded, in a quantized
        pool: within its precision)."""
        if n:
            slots = self.mgr.req_pool.read(r.seq.row, 0, n)
            k, v = self.pool.read_kv(0, slots, torch.float32)
            want = self.expected_kv(r.tokens, 0, n)
            tol = 0.07 * want.abs().amax(-1, keepdim=True)  # fp8_e4m3: 2^-4 relative, + margin
            assert bool(((k - want).abs() <= tol).all()) and bool(((v - want).abs() <= tol).all())

    def finish_prefill_step(self, r: Running) -> None:
        """After the model runs the allocated part: cache a chunk or sample the first token."""
        if r.seq.kv_len < r.prompt_len:
            tokens = r.tokens[: r.seq.kv_len]
            slots = self.mgr.req_pool.read(r.seq.row, 0, r.seq.kv_len).tolist()
            self.mgr.cache_unfinished(r.seq, r.tokens)
            self.ref.insert(tokens, slots)
            assert r.seq.cached_len == r.seq.kv_len // self.page_size * self.page_size
        else:
            r.tokens.append(self.next_token())
            r.done = True

    def absorb_evictions(self, locked: set[Prefix]) -> int:
        """Check what the tree evicted (explicitly or to make room); drop it from the reference."""
        evicted = set(self.ref.entries) - set(tree_contents(self.tree))
        assert not evicted & locked, "a locked prefix was evicted"
        # LRU, leaf first: nothing evicted was touched after an unlocked leaf that stayed
        newest_evicted = max((self.ref.entries[p][1] for p in evicted), default=-DEMOTED)
        for prefix in evicted:
            del self.ref.entries[prefix]
        remaining = [self.ref.entries[p][1] for p in self.ref.leaves() - locked]
        if self.eviction_policy == "lru":
            assert not remaining or min(remaining) >= newest_evicted
        return len(evicted) * self.page_size

    def alloc_step(self, r: Running, new_len: int | None) -> bool:
        """Allocate the next chunk (or one decode slot); on failure abort the request."""
        locked = self.locked_prefixes()
        if new_len is None:
            ok = self.mgr.alloc_decode([r.seq]) is not None
        else:
            ok = self.mgr.alloc_extend(r.seq, new_len) is not None
        self.absorb_evictions(locked)
        if not ok:
            self.mgr.release(r.seq)
            self.drop(r)
        return ok

    def drop(self, r: Running) -> None:
        self.running.remove(r)

    # ---- rules ------------------------------------------------------------------------------

    @precondition(lambda self: len(self.running) < 4)
    @rule(
        target=requests,
        segments=st.lists(st.integers(0, 2), min_size=1, max_size=5),
        tail=st.lists(st.integers(0, 2), max_size=4),
        chunk_units=st.integers(1, 12),
        priority=st.integers(0, 2),
    )
    def admit(self, segments, tail, chunk_units, priority):
        prompt = [t for s in segments for t in [s * 10 + j % 2 for j in range(self.seg)]] + tail
        limit = (len(prompt) - 1) // self.page_size * self.page_size
        expected = self.ref.longest(prompt, limit)
        also = self.lower_tier_hit(prompt, limit)
        matched = {tuple(prompt[:i]) for i in range(self.page_size, expected + 1, self.page_size)}
        locked = self.locked_prefixes() | matched  # the match stays locked while a tier loads
        seq = self.mgr.admit(prompt, priority=priority if self.eviction_policy == "priority" else 0)
        assert seq is not None
        self.ref.touch(prompt, expected)  # the pool's match, first
        self.absorb_evictions(locked)  # loading from a lower tier may make room in the pool
        if seq.cached_len > expected:  # loaded back: now in the pool's tree too
            assert seq.cached_len == also, (seq.cached_len, expected, also)
            contents = tree_contents(self.tree)
            for i in range(expected + self.page_size, seq.cached_len + 1, self.page_size):
                self.ref.entries[tuple(prompt[:i])] = [contents[tuple(prompt[:i])], 0]
            expected = seq.cached_len
            self.ref.touch(prompt, expected)  # inserting the loaded part touches the path
        assert seq.cached_len == expected
        assert self.mgr.req_pool.read(seq.row, 0, expected).tolist() == self.ref.slots(
            prompt, expected
        )
        r = Running(seq, prompt, len(prompt), chunk_units * max(1, self.page_size // 4))
        self.check_cached_kv(r, expected)
        self.running.append(r)
        self.prefill_step(r)
        return r

    def prefill_step(self, r: Running) -> None:
        start = r.seq.kv_len
        if self.alloc_step(r, min(r.prompt_len, start + r.chunk)):
            self.write_kv(r, start, r.seq.kv_len)
            self.finish_prefill_step(r)

    @rule(r=requests)
    def prefill_chunk(self, r):
        if r not in self.running or r.done:
            return
        self.prefill_step(r)

    @rule(r=requests)
    def decode(self, r):
        if r not in self.running or not r.done:
            return
        if self.alloc_step(r, None):  # the slot of the last sampled token
            self.write_kv(r, r.seq.kv_len - 1, r.seq.kv_len)
            r.tokens.append(self.next_token())

    @rule(r=consumes(requests))
    def finish(self, r):
        if r not in self.running or not r.done:
            return
        kv_len = r.seq.kv_len
        assert kv_len == len(r.tokens) - 1
        slots = self.mgr.req_pool.read(r.seq.row, 0, kv_len).tolist()
        self.mgr.cache_finished(r.seq, r.tokens)
        self.ref.insert(r.tokens[:kv_len], slots)
        self.drop(r)

    @rule(r=consumes(requests))
    def abort(self, r):
        if r not in self.running:
            return
        self.mgr.release(r.seq)
        self.drop(r)

    @rule(segments=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def refresh_waiting(self, segments):
        """A queued request's cached prefix marked used (`SchedulePolicy` does it each round):
        the path to the node its peek ends in becomes the newest, nothing split or evicted."""
        prompt = [t for s in segments for t in [s * 10 + j % 2 for j in range(self.seg)]] + [99]
        matched, node = self.tree.peek_prefix(prompt)
        if not matched:
            return
        before = tree_contents(self.tree)
        self.tree.refresh([node])
        assert tree_contents(self.tree) == before
        path, page = self.tree.path_of(node), self.page_size
        self.ref.clock += 1
        for i in range(page, len(path) + 1, page):
            self.ref.entries[tuple(path[:i])][1] = self.ref.clock

    @rule(segments=st.lists(st.integers(0, 2), min_size=1, max_size=6), shared=st.integers(0, 12))
    def demote(self, segments, shared):
        """A closed session's path (`RadixCache.demote`): the nodes wholly inside its unshared
        part that no other path goes on from are marked, nothing else changes, and its leaves go
        before every other
        (in LRU order among themselves: the reference keeps them below every clock value
        until a touch), which `absorb_evictions` checks under LRU."""
        path = [t for s in segments for t in [s * 10 + j % 2 for j in range(self.seg)]]
        before = tree_contents(self.tree)
        self.tree.demote(path, shared)
        assert tree_contents(self.tree) == before
        node, pos, along = self.tree.root, 0, []
        while True:  # the nodes wholly along the path
            child = next((c for c in node.children.values()
                          if path[pos : pos + len(c.key)] == c.key), None)  # fmt: skip
            if child is None:
                break
            node, pos = child, pos + len(child.key)
            along.append(node)
        for node in reversed(along):  # from the end up, while no other path goes on from it
            if node.depth < shared or any(c.keep for c in node.children.values()):
                break
            assert node.keep == 0
        for n in self.tree._nodes():
            if n is not self.tree.root and n.keep == 0:
                end = self.tree.path_of(n)
                for i in range(len(end) - len(n.key) + self.page_size, len(end) + 1,
                               self.page_size):  # fmt: skip
                    entry = self.ref.entries[tuple(end[:i])]
                    if entry[1] >= 0:
                        entry[1] -= DEMOTED
        for prefix, entry in self.ref.entries.items():  # a touch undid the rest
            if entry[1] < 0:
                assert prefix in self.demoted_prefixes()

    def demoted_prefixes(self) -> set[Prefix]:
        out = set()
        for n in self.tree._nodes():
            if n is not self.tree.root and n.keep == 0:
                end = self.tree.path_of(n)
                out |= {tuple(end[:i]) for i in range(len(end) - len(n.key) + self.page_size,
                                                      len(end) + 1, self.page_size)}  # fmt: skip
        return out

    @rule(n=st.integers(0, 40))
    def evict(self, n):
        evictable = self.tree.evictable_size()
        free_before = self.pool.available_size()
        locked = self.locked_prefixes()
        freed = self.tree.evict(n)
        assert self.pool.available_size() == free_before + freed
        assert freed >= n or self.tree.evictable_size() == 0
        assert freed <= evictable
        assert self.absorb_evictions(locked) == freed

    @precondition(lambda self: not self.running)
    @rule()
    def reset(self):
        self.mgr.reset()
        self.ref.entries.clear()
        assert self.pool.available_size() == self.pool.capacity

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def tree_equals_reference(self):
        assert tree_contents(self.tree) == {p: e[0] for p, e in self.ref.entries.items()}

    @invariant()
    def hierarchy_balances(self):
        self.mgr.check_integrity([r.seq for r in self.running])
        assert self.tree.evictable_size() + self.tree.protected_size() == self.ref.tokens()
        assert self.tree.protected_size() == len(self.locked_prefixes()) * self.page_size


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class HierarchyPage1(HierarchyMachine):
    page_size = 1


class HierarchyPage4(HierarchyMachine):
    page_size = 4


class HierarchyPage16(HierarchyMachine):
    page_size = 16


class HierarchyPage1Int8(HierarchyMachine):
    page_size = 1
    kv_dtype = torch.int8


class HierarchyPage4Fp8(HierarchyMachine):
    page_size = 4
    kv_dtype = torch.float8_e4m3fn


class HierarchyWithHostTier(HierarchyMachine):
    """The same rules over a pool with a host tier under it (`--kv-host-tier`): what the pool
    evicts is written to the tier, and an admission loads back what the tier holds beyond the
    pool's match. Checked besides the base invariants: an admission's hit is exactly the pool's
    match or the tier's longer one; the K/V it serves are the prefix's (`check_cached_kv`); every
    page the tier holds was cached in the pool once and holds that prefix's K/V; no slot of either
    tier leaks (`check_integrity`)."""

    tier_pages = 6

    def __init__(self) -> None:
        super().__init__()
        p = self.page_size
        tier_pool = TokenToKVPool(
            KVLayout(1, 1, 2, self.kv_dtype), self.tier_pages * self.seg // p * p, page_size=p
        )
        self.tier = HostTier(tier_pool)
        self.mgr = KVCacheManager(self.pool, self.mgr.req_pool, self.tree, host=self.tier)
        self.ever: set[Prefix] = set()  # every page prefix the pool has cached

    def lower_tier_hit(self, prompt: list[int], limit: int) -> int:
        return min(self.tier.longest(prompt), limit)

    @invariant()
    def tier_holds_prefixes_the_pool_had_with_their_kv(self):
        self.ever |= set(self.ref.entries)
        held = tree_contents(self.tier.tree)
        assert set(held) <= self.ever
        for prefix, slots in held.items():
            start = len(prefix) - self.page_size
            k, v = self.tier.pool.read_kv(0, torch.tensor(slots), torch.float32)
            want = self.expected_kv(list(prefix), start, len(prefix))
            tol = 0.07 * want.abs().amax(-1, keepdim=True)
            assert bool(((k - want).abs() <= tol).all()) and bool(((v - want).abs() <= tol).all())


class HierarchyTierPage1(HierarchyWithHostTier):
    page_size = 1


class HierarchyTierPage4Int8(HierarchyWithHostTier):
    page_size = 4
    kv_dtype = torch.int8


def policy_machine(policy: str, page: int) -> type:
    return type(f"Hierarchy{policy.upper()}", (HierarchyMachine,),
                {"eviction_policy": policy, "page_size": page})  # fmt: skip


# every other eviction policy: the hierarchy's invariants hold whatever order leaves go in
TestEvictionPolicies = {
    policy: policy_machine(policy, page).TestCase
    for policy, page in (
        ("lfu", 1),
        ("fifo", 4),
        ("filo", 1),
        ("mru", 1),
        ("slru", 4),
        ("priority", 1),
        ("gdsf", 1),
    )
}
for _case in TestEvictionPolicies.values():
    _case.settings = settings(SETTINGS, max_examples=60)
TestHierarchyLFU = TestEvictionPolicies["lfu"]
TestHierarchyFIFO = TestEvictionPolicies["fifo"]
TestHierarchyFILO = TestEvictionPolicies["filo"]
TestHierarchyMRU = TestEvictionPolicies["mru"]
TestHierarchySLRU = TestEvictionPolicies["slru"]
TestHierarchyPriority = TestEvictionPolicies["priority"]
TestHierarchyGDSF = TestEvictionPolicies["gdsf"]

TestHierarchyPage1 = HierarchyPage1.TestCase
TestHierarchyPage1.settings = SETTINGS
TestHierarchyPage4 = HierarchyPage4.TestCase
TestHierarchyPage4.settings = SETTINGS
TestHierarchyPage16 = HierarchyPage16.TestCase
TestHierarchyPage16.settings = SETTINGS
TestHierarchyPage1Int8 = HierarchyPage1Int8.TestCase
TestHierarchyPage1Int8.settings = SETTINGS
TestHierarchyPage4Fp8 = HierarchyPage4Fp8.TestCase
TestHierarchyPage4Fp8.settings = SETTINGS
TestHierarchyTierPage1 = HierarchyTierPage1.TestCase
TestHierarchyTierPage1.settings = SETTINGS
TestHierarchyTierPage4Int8 = HierarchyTierPage4Int8.TestCase
TestHierarchyTierPage4Int8.settings = settings(SETTINGS, max_examples=100)
