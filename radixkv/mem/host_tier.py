"""A second KV tier under the pool (`--kv-host-tier SIZE`): what the radix cache evicts is copied
here instead of dropped, and a later prompt that reaches into it loads it back (a copy, not a
prefill).

The tier is a radix tree of its own (`RadixCache` over a `TokenToKVPool` in host memory; not pinned,
and copied synchronously, also under a GPU pool: docs/cache.md), keyed by whole paths from the
root, with its own LRU eviction. Write-back: a leaf's KV is
written when the pool evicts it, never before. When the pool evicts leaf `X` (path `P`, its own
tokens `P[k:]`), the part of `P` the tier lacks is copied in one batched copy per layer (the
ancestors are still in the pool: eviction goes leaf first). At admission, if the tier holds a
longer prefix of the prompt than the pool, the difference is allocated in the pool, copied back
and inserted into the pool's tree, so the request (and every later one) sees it as cached.
Tokens served this way count in `cached_tokens` and separately as tier hits.

The tier may store another KV dtype than the pool (`--kv-host-tier-dtype`): an int8 or fp8 tier
under a bf16 pool holds about twice the tokens in the same memory (a compressed copy). Copies
between them go through float32: decoded from the source, quantized (or rounded) into the
destination, keys moved between the plain basis and fp8's rotated one where only one side
rotates (`kv_quant.key_rotation`, orthogonal: its transpose undoes it). Tokens loaded back from
such a tier then carry its quantization error, as if the pool were quantized (docs/cache.md has
the measured effect); with the same dtype the copies are exact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from radixkv.mem.kv_quant import key_rotation
from radixkv.mem.radix_cache import RadixCache, TreeNode
from radixkv.mem.token_to_kv_pool import TokenToKVPool


class HostTier:
    def __init__(self, pool: TokenToKVPool, device: TokenToKVPool | None = None) -> None:
        self.pool = pool
        self.device = device  # the pool it serves (set by KVCacheManager)
        self.tree = RadixCache(pool)
        self.page_size = pool.page_size
        # counters (Stats)
        self.hit_tokens = 0  # prompt tokens served from the tier (loaded back)
        self.load_seconds = 0.0
        self.stored_tokens = 0  # tokens written into the tier

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def offload(self, tree: RadixCache, node: TreeNode) -> None:
        """Copy what the tier lacks of `node`'s path (the pool is about to free `node`), unless
        no one needs it (`RadixCache.demote`: a closed session's)."""
        if not node.keep:
            return
        path = tree.path_of(node)
        if len(path) > self.capacity:
            return  # it could never fit
        short = len(path) - self.pool.available_size()
        if short > 0:
            self.tree.evict(short)
        present, _ = self.tree.peek_full(path)
        aligned = len(path) // self.page_size * self.page_size
        need = aligned - present
        if need <= 0:
            self.tree.match_full(path)  # already here: just mark it used
            return
        host = self.pool.alloc(need)
        if host is None:
            return
        source = tree.path_values(node)[present:aligned]
        assert self.device is not None
        _copy(self.device, source, self.pool, host)
        slots = torch.cat([torch.zeros(present, dtype=torch.int64), host])
        taken = self.tree.insert(path[:aligned], slots)
        assert taken == present, (taken, present)
        self.stored_tokens += need

    def longest(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens[:-1]` the tier holds (page-aligned)."""
        return self.tree.peek_prefix(tokens)[0]

    def pin(self, tokens: Sequence[int]) -> TreeNode:
        """Keep the tier's prefix of `tokens` (the pool may evict, and so write here, before it
        is copied back); `unpin` it after `load`."""
        node = self.tree.match_prefix(tokens).last_node
        self.tree.lock(node)
        return node

    def unpin(self, node: Any) -> None:
        self.tree.unlock(node)

    def load(self, tokens: Sequence[int], start: int, dest: torch.Tensor) -> int:
        """Copy the tier's KV of `tokens[start : start + len(dest)]` into pool slots `dest`."""
        began = time.perf_counter()
        host = self.tree.match_prefix(tokens).indices[start : start + len(dest)]
        assert self.device is not None
        _copy(self.pool, host, self.device, dest)
        self.hit_tokens += len(dest)
        self.load_seconds += time.perf_counter() - began
        return len(dest)

    def reset(self) -> None:
        self.tree.reset()


def _copy(src: TokenToKVPool, src_slots: torch.Tensor, dst: TokenToKVPool, dst_slots: torch.Tensor):
    """K, V (and scales) of `src_slots` into `dst_slots`, one batched copy per layer and tensor;
    converted through float32 where the two store different dtypes."""
    s = src_slots.to(src.device)
    d = dst_slots.to(dst.device)
    if src.layout.dtype != dst.layout.dtype:
        _convert(src, s, dst, d)
        return
    for layer in range(src.layout.num_layers):
        dst.k_buffer[layer][d] = src.k_buffer[layer][s].to(dst.device, non_blocking=True)
        dst.v_buffer[layer][d] = src.v_buffer[layer][s].to(dst.device, non_blocking=True)
        if src.layout.quantized:
            dst.k_scale[layer][d] = src.k_scale[layer][s].to(dst.device, non_blocking=True)
            dst.v_scale[layer][d] = src.v_scale[layer][s].to(dst.device, non_blocking=True)


def _convert(src: TokenToKVPool, s: torch.Tensor, dst: TokenToKVPool, d: torch.Tensor) -> None:
    """`_copy` between pools of different dtypes: decode, re-basis the keys, encode."""
    rotation = None
    if src.layout.rotated_keys != dst.layout.rotated_keys:
        rotation = key_rotation(src.layout.head_dim)  # keys @ R: into fp8's basis
        if src.layout.rotated_keys:
            rotation = rotation.T  # out of it
    for layer in range(src.layout.num_layers):
        k, v = src.read_kv(layer, s, torch.float32)
        if rotation is not None:
            k = k @ rotation
        dst.set_kv(layer, d, k.to(dst.device), v.to(dst.device))
