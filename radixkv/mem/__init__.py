"""The three-level KV memory hierarchy: RadixCache → ReqToTokenPool → TokenToKVPool."""

from __future__ import annotations

from radixkv.mem.cache_manager import KVCacheManager, SeqSlots
from radixkv.mem.radix_cache import IntegrityError, MatchResult, RadixCache, TreeNode
from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import KVLayout, TokenToKVPool

__all__ = [
    "IntegrityError",
    "KVCacheManager",
    "KVLayout",
    "MatchResult",
    "RadixCache",
    "ReqToTokenPool",
    "SeqSlots",
    "TokenToKVPool",
    "TreeNode",
]
