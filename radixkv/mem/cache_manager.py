"""The glue of the three levels: admitting a request, allocating its slots, caching it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from radixkv.mem.host_tier import HostTier
from radixkv.mem.radix_cache import IntegrityError, RadixCache, TreeNode
from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.storage import DiskStore
from radixkv.mem.token_to_kv_pool import TokenToKVPool


@dataclass(slots=True)
class SeqSlots:
    """A running request's hold on the KV hierarchy.

    Positions of the request's row, in slot ownership terms:

        [0, cached_len)        tree-owned slots, locked through `last_node`
        [cached_len, kv_len)   slots the request allocated itself (not in the tree yet)
    """

    row: int
    cached_len: int
    kv_len: int
    last_node: TreeNode
    priority: int = 0  # the request's, given to what it caches (`priority` eviction policy)


class KVCacheManager:
    """Moves slots between the pool, the request rows and the radix tree.

    This is the only place where slot ownership changes hands; the scheduler calls it and never
    touches the three levels' bookkeeping directly.
    """

    def __init__(
        self,
        token_pool: TokenToKVPool,
        req_pool: ReqToTokenPool,
        tree: RadixCache,
        host: HostTier | None = None,
        disk: DiskStore | None = None,
    ):
        if tree.kv_pool is not token_pool:
            raise ValueError("the radix cache must free into the same TokenToKVPool")
        self.token_pool = token_pool
        self.req_pool = req_pool
        self.tree = tree
        self.page_size = token_pool.page_size
        self.host = host  # a second KV tier (host_tier.py): evicted leaves go there
        self.disk = disk  # KV on disk across restarts (storage.py): written through, read back
        if host is not None and not tree.disable:
            if host.page_size != self.page_size:
                raise ValueError("the host tier must have the pool's page size")
            host.device = token_pool
            tree.on_evict = lambda node: host.offload(tree, node)

    # ---- capacity -----------------------------------------------------------------------------

    def available_size(self) -> int:
        """Slots that can be had now: free plus evictable."""
        return self.token_pool.available_size() + self.tree.evictable_size()

    def ensure_free(self, n: int) -> bool:
        """Evict until `n` slots are free; False if even evicting everything is not enough."""
        short = n - self.token_pool.available_size()
        if short > 0:
            self.tree.evict(short)
        return self.token_pool.available_size() >= n

    # ---- a request's life ---------------------------------------------------------------------

    def admit(
        self, tokens: Sequence[int] | torch.Tensor, max_match: int | None = None, priority: int = 0
    ) -> SeqSlots | None:
        """Match the cached prefix of `tokens` (at most `max_match` of them), lock it and point a
        fresh row at it.

        Returns None when no request row is free. Allocates no slot for the uncached suffix: call
        `alloc_extend` for that (possibly in chunks).
        """
        if self.req_pool.available_size() == 0:
            return None
        prompt = tokens if max_match is None else tokens[:max_match]
        indices, node = self.tree.match_prefix(prompt)
        for tier in (self.host, self.disk):  # the lower tiers, nearest first
            if tier is not None and not self.tree.disable:
                indices, node = self._load_from(tier, prompt, indices, node)
        self.tree.lock(node)
        row = self.req_pool.alloc()
        self.req_pool.write(row, 0, indices)
        return SeqSlots(row=row, cached_len=len(indices), kv_len=len(indices), last_node=node,
                        priority=priority)  # fmt: skip

    def _load_from(
        self,
        tier: HostTier | DiskStore,
        prompt: Sequence[int] | torch.Tensor,
        indices: torch.Tensor,
        node: TreeNode,
    ) -> tuple[torch.Tensor, TreeNode]:
        """If a lower tier holds more of the prompt than the pool, copy the difference into new
        pool slots and insert it into the tree; the longer match (the same one if the pool has
        no room, or the tier nothing more)."""
        key = _as_ids(prompt)
        have = len(indices)
        if tier.longest(key) <= have:
            return indices, node
        pinned = tier.pin(key)  # the pool's eviction below may write into the tier
        self.tree.lock(node)  # and must not take the matched prefix
        try:
            more = tier.longest(key) - have
            dest = self.token_pool.alloc(more) if self.ensure_free(more) else None
            got = 0 if dest is None else tier.load(key, have, dest)
            got = got // self.page_size * self.page_size
            if dest is not None:
                self.token_pool.free(dest[got:])
            if dest is None or got == 0:
                return indices, node
            present, new, last = self.tree.insert_and_match(
                key[: have + got], torch.cat([indices, dest[:got]]), (node, have)
            )
        finally:
            self.tree.unlock(node)
            tier.unpin(pinned)
        assert present == have  # nothing else ran: the pool's tree had no more of it
        return torch.cat([indices, new]), last

    def alloc_extend(self, seq: SeqSlots, new_len: int) -> torch.Tensor | None:
        """Slots for positions `[seq.kv_len, new_len)`, written into the row; evicts as needed.
        Returns None (and changes nothing) if they cannot be had."""
        if new_len > self.req_pool.max_context_len:
            raise ValueError(
                f"a sequence of {new_len} tokens exceeds max_context_len "
                f"{self.req_pool.max_context_len}"
            )
        need = self._pages_needed(seq.kv_len, new_len) * self.page_size
        if not self.ensure_free(need):
            return None
        last = int(self.req_pool.req_to_token[seq.row, seq.kv_len - 1]) if seq.kv_len else 0
        slots = self.token_pool.alloc_extend(seq.kv_len, new_len, last)
        assert slots is not None  # ensure_free guaranteed the pages
        self.req_pool.write(seq.row, seq.kv_len, slots)
        seq.kv_len = new_len
        return slots

    def alloc_decode(self, seqs: Sequence[SeqSlots]) -> torch.Tensor | None:
        """One slot per request for its next position, written into the rows (batched)."""
        if not seqs:
            return torch.empty(0, dtype=torch.int64)
        for seq in seqs:
            if seq.kv_len >= self.req_pool.max_context_len:
                raise ValueError(f"row {seq.row} is full at max_context_len tokens")
        rows = torch.tensor([s.row for s in seqs], dtype=torch.int64)
        lens = torch.tensor([s.kv_len for s in seqs], dtype=torch.int64)
        need = int((lens % self.page_size == 0).sum()) * self.page_size
        if not self.ensure_free(need):
            return None
        table = self.req_pool.req_to_token  # on the model's device; slot lists live on the CPU
        at_rows, at_lens = rows.to(table.device), lens.to(table.device)
        last = table[at_rows, (at_lens - 1).clamp(min=0)].to(device="cpu", dtype=torch.int64)
        slots = self.token_pool.alloc_decode(lens, last)
        assert slots is not None
        table[at_rows, at_lens] = slots.to(device=table.device, dtype=torch.int32)
        for seq in seqs:
            seq.kv_len += 1
        return slots

    def cache_unfinished(self, seq: SeqSlots, tokens: Sequence[int] | torch.Tensor) -> None:
        """Cache the computed tokens of a still-running request (e.g. after a prefill chunk).

        `tokens` are the request's first `seq.kv_len` tokens. Row positions afterwards:

            [0, cached_len)            tree-owned (before: already tree-owned and locked)
            [cached_len, present)      were duplicates: row re-pointed at the tree's slots,
                                       then the request's own slots are freed
            [present, aligned)         the request's slots, now owned by the tree
            [aligned, kv_len)          unaligned tail: still the request's own
        """
        if self.tree.disable:
            return
        key = tokens[: seq.kv_len]
        slots = self.req_pool.read(seq.row, 0, seq.kv_len)
        if self.disk is not None:  # write-through, before any of `slots` is freed
            self.disk.write(_as_ids(key), slots)
        # Resume at the request's locked node: its cached prefix is not compared again.
        present, indices, node = self.tree.insert_and_match(
            key, slots, (seq.last_node, seq.cached_len), seq.priority
        )
        # Re-point the row before freeing the duplicates, so it never names a free slot. From
        # `present` on, the tree holds the request's own slots: the row already names them.
        if present > seq.cached_len:
            self.req_pool.write(seq.row, seq.cached_len, indices[: present - seq.cached_len])
            self.token_pool.free(slots[seq.cached_len : present])
        self.tree.lock(node)
        self.tree.unlock(seq.last_node)
        seq.cached_len, seq.last_node = seq.cached_len + indices.shape[0], node

    def cache_finished(self, seq: SeqSlots, tokens: Sequence[int] | torch.Tensor) -> None:
        """Cache a finished request and release everything it holds.

        `tokens` is prompt + output; only the first `seq.kv_len` have KV (the last sampled token
        never went through the model). Positions of the row:

            [0, cached_len)            tree-owned and locked: unlocked
            [cached_len, present)      duplicates of the tree's slots: freed
            [present, aligned)         handed to the tree
            [aligned, kv_len)          unaligned tail: freed
        """
        key = tokens[: seq.kv_len]
        slots = self.req_pool.read(seq.row, 0, seq.kv_len)
        if self.disk is not None and not self.tree.disable:
            self.disk.write(_as_ids(key), slots)
        present = self.tree.insert(key, slots, (seq.last_node, seq.cached_len), seq.priority)
        aligned = seq.kv_len // self.page_size * self.page_size
        self.token_pool.free(slots[seq.cached_len : present])
        self.token_pool.free(slots[aligned:])
        self._drop(seq)

    def release(self, seq: SeqSlots) -> None:
        """Give back a request's slots without caching them (abort, retraction)."""
        self.token_pool.free(self.req_pool.read(seq.row, seq.cached_len, seq.kv_len))
        self._drop(seq)

    def _drop(self, seq: SeqSlots) -> None:
        self.tree.unlock(seq.last_node)
        self.req_pool.free(seq.row)
        seq.row, seq.cached_len, seq.kv_len = 0, 0, 0
        seq.last_node = self.tree.root

    def _pages_needed(self, old_len: int, new_len: int) -> int:
        p = self.page_size
        return -(-new_len // p) - -(-old_len // p)

    # ---- integrity ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the whole cache (flush). Only valid when no request is running."""
        if self.req_pool.available_size() != self.req_pool.size:
            raise IntegrityError("flush with requests still running")
        self.tree.reset()
        if self.host is not None:
            self.host.reset()

    def check_integrity(self, running: Iterable[SeqSlots] = ()) -> None:
        """Check the whole hierarchy; `running` are all requests holding rows.

        free + evictable + protected + held by requests == capacity, no slot is both free and
        referenced, and no slot is referenced twice.
        """
        self.tree.check_integrity()
        running = list(running)
        own = [self.req_pool.read(s.row, s.cached_len, s.kv_len) for s in running]
        held = torch.cat(own) if own else torch.empty(0, dtype=torch.int64)
        _expect(len(torch.unique(held)) == len(held), "two row positions name the same slot")
        if self.page_size > 1:
            # A request's partly filled last page is held whole; its unused slots have no row entry.
            pages = [torch.unique(h // self.page_size) for h in own]
            all_pages = torch.cat(pages) if pages else held
            _expect(len(torch.unique(all_pages)) == len(all_pages), "a page is held twice")
            offsets = torch.arange(self.page_size, dtype=torch.int64)
            held = (all_pages[:, None] * self.page_size + offsets).reshape(-1)
        free = self.token_pool.free_slots()
        cached = self.tree.cached_slots()
        total = len(free) + self.tree.total_size() + len(held)
        _expect(
            total == self.token_pool.capacity,
            f"free {len(free)} + tree {self.tree.total_size()} + held {len(held)} "
            f"!= capacity {self.token_pool.capacity}",
        )
        everything = torch.cat([free, cached, held])
        _expect(len(torch.unique(everything)) == len(everything), "a slot is owned twice")
        _expect(
            self.req_pool.available_size() + len(running) == self.req_pool.size,
            "a request row is leaked",
        )
        if not running:
            _expect(self.tree.protected_size() == 0, "idle but some prefix is still locked")
        if self.host is not None:  # the tier: its own tree, nothing held between calls
            host = self.host
            host.tree.check_integrity()
            free, cached = host.pool.free_slots(), host.tree.cached_slots()
            _expect(host.tree.protected_size() == 0, "a host-tier prefix is still locked")
            _expect(len(free) + len(cached) == host.capacity, "a host-tier slot is leaked")
            both = torch.cat([free, cached])
            _expect(len(torch.unique(both)) == len(both), "a host-tier slot is owned twice")


def _as_ids(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    return tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise IntegrityError(message)
