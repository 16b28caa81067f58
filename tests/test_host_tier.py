"""The second KV tier (`--kv-host-tier`): what the pool evicts is written there and loaded back,
with the same KV, and neither tier leaks a slot."""

from __future__ import annotations

import random

import pytest
import torch

from radixkv.mem import KVCacheManager, KVLayout, RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.mem.host_tier import HostTier

LAYOUTS = [KVLayout(2, 1, 2), KVLayout(2, 1, 4, torch.int8)]


def make(layout: KVLayout, pool_tokens: int, tier_tokens: int | None, page: int = 1):
    pool = TokenToKVPool(layout, pool_tokens, page_size=page)
    host = HostTier(TokenToKVPool(layout, tier_tokens, page_size=page)) if tier_tokens else None
    return KVCacheManager(pool, ReqToTokenPool(4, 256), RadixCache(pool), host)


def kv_of(token: int, pos: int) -> float:
    """What a token's K holds in these tests: a function of the token and its position."""
    return float((token * 31 + pos) % 97) / 8


def write_kv(mgr: KVCacheManager, slots: torch.Tensor, tokens: list[int], start: int) -> None:
    pool = mgr.token_pool
    values = torch.tensor([kv_of(t, start + i) for i, t in enumerate(tokens)])
    for layer in range(pool.layout.num_layers):
        k = values[:, None, None].expand(-1, pool.layout.kv_heads, pool.layout.head_dim)
        pool.set_kv(layer, slots, k * (layer + 1), -k)


def check_kv(mgr: KVCacheManager, row: int, tokens: list[int], n: int) -> None:
    """The cached prefix's K and V are what was computed for those tokens at those positions."""
    pool = mgr.token_pool
    slots = mgr.req_pool.read(row, 0, n)
    want = torch.tensor([kv_of(t, i) for i, t in enumerate(tokens[:n])])
    for layer in range(pool.layout.num_layers):
        k = pool.read_kv(layer, slots, torch.float32)[0][:, 0, 0]
        v = pool.read_kv(layer, slots, torch.float32)[1][:, 0, 0]
        tol = 0.05 if pool.layout.quantized else 0.0
        assert torch.allclose(k, want * (layer + 1), atol=tol * (layer + 1) * 13)
        assert torch.allclose(v, -want, atol=tol * 13)


def serve(mgr: KVCacheManager, prompt: list[int], output: list[int]) -> int:
    """Admit, compute (write K/V for the new positions), cache; the cached prefix length."""
    seq = mgr.admit(prompt)
    assert seq is not None
    cached = seq.cached_len
    check_kv(mgr, seq.row, prompt, cached)
    slots = mgr.alloc_extend(seq, len(prompt))
    assert slots is not None
    write_kv(mgr, slots, prompt[cached:], cached)
    mgr.cache_unfinished(seq, prompt)
    full = prompt + output
    for i in range(len(output) - 1):
        new = mgr.alloc_decode([seq])
        assert new is not None
        write_kv(mgr, new, [full[len(prompt) + i]], len(prompt) + i)
    mgr.cache_finished(seq, full)
    mgr.check_integrity()
    return cached


@pytest.mark.parametrize("layout", LAYOUTS, ids=["fp32", "int8"])
def test_an_evicted_prefix_comes_back_from_the_tier_with_its_kv(layout):
    mgr = make(layout, pool_tokens=40, tier_tokens=200)
    a, b = list(range(100, 130)), list(range(200, 230))
    assert serve(mgr, [*a, 1], [2, 3]) == 0
    assert serve(mgr, [*b, 1], [2, 3]) == 0  # evicts a's prefix from the 40-token pool
    assert mgr.tree.peek_prefix([*a, 9])[0] < 30
    assert serve(mgr, [*a, 9], [4]) == 30  # all of it, from the tier
    assert mgr.host is not None and mgr.host.hit_tokens >= 30 - mgr.tree.peek_prefix(a)[0]


def test_a_demoted_prefix_is_not_copied_down_and_goes_first_in_the_tier_too():
    """A closed session's path (`RadixCache.demote`) is evicted from the pool without a copy to
    the tier; what the tier held of it already is demoted there as well."""
    mgr = make(LAYOUTS[0], pool_tokens=40, tier_tokens=200)
    assert mgr.host is not None
    a, b, c = list(range(100, 130)), list(range(200, 230)), list(range(300, 330))
    serve(mgr, [*a, 1], [2, 3])
    serve(mgr, [*b, 1], [2, 3])  # a goes down to the tier
    stored = mgr.host.stored_tokens
    assert mgr.tree.demote([*b, 1, 2, 3]) > 0 and mgr.host.tree.demote([*a, 1, 2, 3]) > 0
    serve(mgr, [*c, 1], [2, 3])  # b is evicted: demoted, so not copied down
    assert mgr.host.stored_tokens == stored
    assert serve(mgr, [*b, 9], [4]) == 0  # neither tier has it
    assert mgr.host.tree.peek_full(a)[1].keep == 0  # the tier's copy of a goes first there


def test_without_a_tier_it_is_recomputed():
    mgr = make(LAYOUTS[0], pool_tokens=40, tier_tokens=None)
    a, b = list(range(100, 130)), list(range(200, 230))
    serve(mgr, [*a, 1], [2, 3])
    serve(mgr, [*b, 1], [2, 3])
    assert serve(mgr, [*a, 9], [4]) < 30


@pytest.mark.parametrize("page", [1, 4])
def test_random_traffic_keeps_both_tiers_whole_and_every_hit_exact(page):
    rng = random.Random(page)
    mgr = make(LAYOUTS[0], pool_tokens=64, tier_tokens=160, page=page)
    prefixes = [[rng.randrange(50, 90) for _ in range(rng.randrange(4, 24))] for _ in range(8)]
    hits = 0
    for _ in range(150):
        prompt = [*rng.choice(prefixes), *(rng.randrange(50, 90) for _ in range(3))]
        hits += serve(mgr, prompt, [rng.randrange(50, 90) for _ in range(rng.randrange(1, 4))])
    assert mgr.host is not None and mgr.host.hit_tokens > 0 and hits > 0
    assert mgr.tree.evicted_tokens > 0
    mgr.reset()
    mgr.check_integrity()
    assert mgr.host.tree.total_size() == 0


@pytest.mark.parametrize(("pool_dtype", "tier_dtype"), [
    (torch.bfloat16, torch.int8), (torch.bfloat16, torch.float8_e4m3fn),
    (torch.float8_e4m3fn, torch.bfloat16), (torch.float32, torch.float8_e5m2),
])  # fmt: skip
def test_a_tier_of_another_dtype_stores_what_a_pool_of_that_dtype_would(pool_dtype, tier_dtype):
    """Copies between a pool and a compressed (or wider) tier: the tier holds exactly what a
    pool of its dtype holds for the same K/V (keys taken into, or out of, fp8's rotated basis),
    and the K/V loaded back are the originals within that dtype's error."""
    from radixkv.mem.host_tier import _copy
    from radixkv.mem.kv_quant import key_rotation

    gen = torch.Generator().manual_seed(7)
    pool = TokenToKVPool(KVLayout(2, 2, 64, pool_dtype), 32)
    tier = TokenToKVPool(KVLayout(2, 2, 64, tier_dtype), 32)
    same = TokenToKVPool(KVLayout(2, 2, 64, tier_dtype), 32)  # fed directly, for reference
    back = TokenToKVPool(KVLayout(2, 2, 64, pool_dtype), 32)
    slots, there = torch.arange(1, 9), torch.arange(20, 28)
    rotation = key_rotation(64)
    for layer in range(2):
        k, v = (torch.randn(8, 2, 64, generator=gen) for _ in range(2))
        pool.set_kv(layer, slots, k @ rotation if pool.layout.rotated_keys else k, v)
    _copy(pool, slots, tier, there)
    _copy(tier, there, back, slots)
    for layer in range(2):
        k, v = pool.read_kv(layer, slots, torch.float32)
        if pool.layout.rotated_keys != tier.layout.rotated_keys:
            k = k @ (rotation.T if pool.layout.rotated_keys else rotation)
        same.set_kv(layer, there, k, v)
        for got, want in zip(tier.read_kv(layer, there, torch.float32),
                             same.read_kv(layer, there, torch.float32), strict=True):  # fmt: skip
            assert torch.equal(got, want)
        for got, want in zip(back.read_kv(layer, slots, torch.float32),
                             pool.read_kv(layer, slots, torch.float32), strict=True):  # fmt: skip
            assert (got - want).abs().max() < 0.2 * want.abs().max()
            assert (got - want).abs().mean() < 0.06 * want.abs().mean()  # e5m2: 2 bits


@pytest.mark.parametrize("tier_dtype", [torch.int8, torch.float8_e4m3fn])
def test_an_evicted_prefix_comes_back_from_a_compressed_tier(tier_dtype):
    layout = KVLayout(2, 1, 4, torch.bfloat16)
    pool = TokenToKVPool(layout, 40)
    host = HostTier(TokenToKVPool(KVLayout(2, 1, 4, tier_dtype), 200))
    mgr = KVCacheManager(pool, ReqToTokenPool(4, 256), RadixCache(pool), host)
    a, b = list(range(100, 130)), list(range(200, 230))
    seq = mgr.admit([*a, 1])
    assert seq is not None and seq.cached_len == 0
    slots = mgr.alloc_extend(seq, 31)
    assert slots is not None
    write_kv(mgr, slots, [*a, 1], 0)
    mgr.cache_finished(seq, [*a, 1])
    serve(mgr, [*b, 1], [2, 3])  # evicts a's prefix from the 40-token pool into the tier
    seq = mgr.admit([*a, 9])
    assert seq is not None and seq.cached_len == 30 and host.hit_tokens > 0
    got = pool.read_kv(1, mgr.req_pool.read(seq.row, 0, 30), torch.float32)[0][:, 0, 0]
    want = torch.tensor([kv_of(t, i) for i, t in enumerate(a)]) * 2
    assert (got - want).abs().max() < 0.07 * want.abs().max()  # one code step of error
    mgr.release(seq)
    mgr.check_integrity()


@pytest.mark.slow
def test_the_model_gives_the_same_tokens_from_the_tier_as_computed():
    import radixkv

    rng = random.Random(0)
    a = [rng.randrange(1000, 30000) for _ in range(300)]
    b = [rng.randrange(1000, 30000) for _ in range(300)]
    # deterministic: a prefix hit computes the same numbers as a full prefill (batch-invariant
    # kernels); otherwise bf16 noise between a 300-token and a 4-token extend may flip a token
    with radixkv.Runtime(
        max_total_tokens=500, kv_host_tier="32MiB", deterministic=True, log_level="warning"
    ) as rt:
        first = rt.client.generate_ids(a, max_new_tokens=8)
        rt.client.generate_ids(b, max_new_tokens=8)  # a's prefix leaves the 500-token pool
        again = rt.client.generate_ids(a, max_new_tokens=8)
        stats = rt.client.stats()
    assert first.cached_tokens == 0 and again.cached_tokens >= 296
    assert again.token_ids == first.token_ids
    assert stats.tier_hit_tokens >= again.cached_tokens - 100 > 0
    assert stats.tier_stored_tokens > 0 and stats.tier_capacity > 0


# ---- KV on disk across restarts (--kv-storage-dir) -----------------------------------------------


def with_disk(
    layout: KVLayout,
    directory,
    model: str = "m",
    pool_tokens: int = 400,
    max_blocks: int | None = None,
):
    from radixkv.mem.storage import _HEADER, BLOCK, DiskStore

    pool = TokenToKVPool(layout, pool_tokens)
    block_file = _HEADER.size + BLOCK * layout.bytes_per_token  # header + payload
    limit = None if max_blocks is None else max_blocks * block_file
    disk = DiskStore(directory, pool, model, limit)
    return KVCacheManager(pool, ReqToTokenPool(4, 512), RadixCache(pool), disk=disk)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["fp32", "int8"])
def test_a_restarted_cache_serves_a_known_prefix_from_disk(layout, tmp_path):
    prompt = [rng_token(i) for i in range(130)]
    first = with_disk(layout, tmp_path)
    assert serve(first, prompt, [5, 6]) == 0
    assert first.disk is not None and first.disk.stored_tokens == 128  # 2 whole blocks
    again = with_disk(layout, tmp_path)  # a new process: empty pool and tree, same directory
    assert serve(again, prompt, [5, 6]) == 128  # check_kv in serve: the KV is what was written
    assert again.disk is not None and again.disk.hit_tokens == 128
    other = with_disk(layout, tmp_path, model="another model")  # never reads the first's files
    assert serve(other, prompt, [5, 6]) == 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_block_is_skipped_never_served(damage, tmp_path):
    prompt = [rng_token(i) for i in range(200)]
    first = with_disk(LAYOUTS[0], tmp_path)
    serve(first, prompt, [5])
    assert first.disk is not None and len(list(tmp_path.rglob("*.kv"))) == 3
    second = first.disk._path(first.disk._chain(prompt, 2)[1])  # the chain's second block
    data = bytearray(second.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    second.write_bytes(bytes(data))
    mgr = with_disk(LAYOUTS[0], tmp_path)
    assert serve(mgr, prompt, [5]) == 64  # the first block only; the rest computed again
    assert mgr.disk is not None and mgr.disk.corrupt_blocks == 1
    assert serve(with_disk(LAYOUTS[0], tmp_path), prompt, [5]) == 192  # rewritten since


def test_a_size_limit_evicts_least_recent_blocks_deepest_first_and_holds_across_restarts(tmp_path):
    a = [rng_token(i) for i in range(200)]  # 3 whole blocks each
    b = [rng_token(i) + 2000 for i in range(200)]
    mgr = with_disk(LAYOUTS[0], tmp_path, max_blocks=5)
    serve(mgr, a, [5])
    serve(mgr, b, [5])  # a 6th block: a's deepest goes, not its first (that would orphan the rest)
    disk = mgr.disk
    assert disk is not None and disk.evicted_blocks == 1 and len(disk.files) == 5
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.kv")) == disk.bytes <= disk.max_bytes
    # restarted: a is served from its 2 blocks and writes its third again, which evicts b's deepest
    again = with_disk(LAYOUTS[0], tmp_path, max_blocks=5)
    assert serve(again, a, [5]) == 128
    assert again.disk is not None and again.disk.evicted_blocks == 1
    # restarted with a smaller limit: the files' times keep the order (b least recent), and b
    # loses its deepest remaining block, not its first
    smaller = with_disk(LAYOUTS[0], tmp_path, max_blocks=4)
    assert smaller.disk is not None and smaller.disk.evicted_blocks == 1
    assert len(list(tmp_path.rglob("*.kv"))) == 4
    assert serve(with_disk(LAYOUTS[0], tmp_path), b, [5]) == 64
    assert serve(with_disk(LAYOUTS[0], tmp_path), a, [5]) == 192


def test_storage_size_options_are_checked():
    from radixkv.config import ServerArgs

    with pytest.raises(ValueError, match="--kv-storage-dir, which is not set"):
        ServerArgs(kv_storage_size=2**30)
    with pytest.raises(ValueError, match="holds no block"):
        with_disk(LAYOUTS[0], "/tmp/unused-by-this-test", max_blocks=0)


def rng_token(i: int) -> int:
    return (i * 7919) % 1000 + 50


@pytest.mark.slow
def test_a_restarted_runtime_serves_a_known_system_prompt_from_disk(tmp_path):
    import radixkv

    rng = random.Random(3)
    system = [rng.randrange(1000, 30000) for _ in range(1024)]
    q1, q2 = ([rng.randrange(1000, 30000) for _ in range(40)] for _ in range(2))
    with radixkv.Runtime(kv_storage_dir=str(tmp_path), log_level="warning") as rt:
        rt.client.generate_ids(system + q1, max_new_tokens=8)
        computed = rt.client.generate_ids(system + q2, max_new_tokens=8)  # (from the pool)
        assert rt.client.stats().storage_stored_tokens >= 1024
    with radixkv.Runtime(kv_storage_dir=str(tmp_path), log_level="warning") as rt:
        restarted = rt.client.generate_ids(system + q2, max_new_tokens=8)
        stats = rt.client.stats()
    assert restarted.cached_tokens >= 1000 and stats.storage_hit_tokens >= 1000
    assert restarted.token_ids == computed.token_ids
