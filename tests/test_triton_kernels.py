"""Triton attention kernels against plain torch references, run by Triton's interpreter on the CPU.

With `TRITON_INTERPRET=0` and a CUDA device the same tests run the compiled kernels on the GPU.

Tolerances. fp32: 1e-5 absolute and relative; the kernels and the reference add the same fp32
products in a different order (online softmax, split merge), which moves results by a few fp32 ulps
(observed < 1e-6, under 5 % of the bound). bf16: 1e-2 absolute + 1.6e-2 relative, about two bf16
ulps: bf16 keeps 8 significant bits, so rounding the output alone costs up to half an ulp (2^-9
relative), and the kernels round the softmax weights to bf16 before the P.V product (as tensor cores
need), which can add about one more. Under the interpreter the final cast to bf16 truncates instead
of rounding (see `pool_casts`): up to one ulp. Observed: at most 45 % of the bound (0.018 on values
near 2, where one bf16 ulp is 0.0156).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest
import torch

pytest.importorskip("triton")

from radixkv.kernels.decode_attention import decode_attention
from radixkv.kernels.extend_attention import extend_attention
from radixkv.kernels.kv_store import store_kv
from radixkv.mem.kv_quant import CODE_DTYPES, quantize
from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import KVLayout, TokenToKVPool

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1.6e-2)}  # (atol, rtol), see above

# (GQA group, head_dim, dtype, page_size): every group, head dim and page size meets both dtypes.
CASES = [
    (1, 64, torch.float32, 1),
    (3, 128, torch.float32, 16),
    (8, 64, torch.float32, 16),
    (1, 128, torch.bfloat16, 16),
    (3, 64, torch.bfloat16, 1),
    (8, 128, torch.bfloat16, 1),
]
KV_HEADS = 2


class Pools:
    """One-layer pools with random K/V, and requests whose slots sit on scattered pages."""

    def __init__(self, seq_lens: list[int], head_dim: int, dtype: torch.dtype, page_size: int):
        self.gen = torch.Generator().manual_seed(sum(seq_lens) + head_dim + page_size)
        pages = [-(-n // page_size) for n in seq_lens]
        layout = KVLayout(1, KV_HEADS, head_dim, dtype)
        num_slots = (sum(pages) + 3) * page_size
        self.kv = TokenToKVPool(layout, num_slots, page_size=page_size, device=DEVICE)
        if layout.quantized:  # codes and scales as the pool writes them
            everything = torch.arange(self.kv.k_buffer[0].shape[0], device=DEVICE)
            shape = (len(everything), KV_HEADS, head_dim)
            self.kv.set_kv(0, everything, 3 * self.randn(shape, torch.float32),
                           3 * self.randn(shape, torch.float32))  # fmt: skip
        else:
            for buffer in self.kv.get_kv_buffer(0):
                buffer.copy_(self.randn(buffer.shape, dtype))
        self.req = ReqToTokenPool(len(seq_lens) + 2, max(seq_lens) + 5, device=DEVICE)
        # Random distinct pages (never page 0), rows 2.. (row 1 stays unused: offsets matter).
        order = torch.randperm(self.kv.num_pages, generator=self.gen) + 1
        offsets = torch.arange(page_size)
        self.rows, self.slots, used = [], [], 0
        for i, (n, p) in enumerate(zip(seq_lens, pages, strict=True)):
            slots = (order[used : used + p, None] * page_size + offsets).reshape(-1)[:n]
            used += p
            self.req.write(i + 2, 0, slots)
            self.rows.append(i + 2)
            self.slots.append(slots.to(DEVICE))
        self.table = self.req.req_to_token
        self.kv_start = torch.tensor(self.rows, device=DEVICE) * self.table.stride(0)

    def randn(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.gen).to(dtype)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain fp32 attention of one request: q `[n, heads, d]` at positions `q_pos` over keys
    `[seq, kv_heads, d]` at positions 0.. (key j visible to the query at position i iff j <= i)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("ihd,jhd->hij", q.float(), k) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


def pool_casts(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The values the store kernel may write for `x` in a `dtype` pool. The GPU rounds fp32 -> bf16
    to nearest even, like torch; Triton 3.9's interpreter truncates (its cast passes no rounding
    mode), so under the interpreter the truncated value is accepted too."""
    casts = [x.to(dtype)]
    if INTERPRET and x.dtype == torch.float32 and dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int32) & -65536  # sign, exponent, 7 mantissa bits
        casts.append(bits.view(torch.float32).to(dtype))  # exact in bf16
    return casts


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and not out.isnan().any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    ("src", "pool"),
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_store_kv_writes_exactly_the_slots(
    page_size: int, src: torch.dtype, pool: torch.dtype
) -> None:
    pools = Pools([5, 19, 33], 64, pool, page_size)
    loc = torch.cat(pools.slots).to(DEVICE)
    # Strided views, like the slices of the fused QKV projection the model passes.
    qkv = pools.randn((len(loc), 3 * KV_HEADS, 64), src).to(DEVICE)
    k, v = qkv[:, :KV_HEADS], qkv[:, KV_HEADS : 2 * KV_HEADS]
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    untouched = torch.ones(k_buf.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[loc] = False
    before_k, before_v = k_buf[untouched].clone(), v_buf[untouched].clone()
    store_kv(k_buf, v_buf, loc, k, v)
    assert torch.equal(k_buf[untouched], before_k) and torch.equal(v_buf[untouched], before_v)
    for buf, new in ((k_buf, k), (v_buf, v)):
        stored = buf[loc]
        assert any(torch.equal(stored, c) for c in pool_casts(new, pool))


@pytest.mark.parametrize(("group", "head_dim", "dtype", "page_size"), CASES)
def test_decode_matches_reference(
    group: int, head_dim: int, dtype: torch.dtype, page_size: int
) -> None:
    seq_lens = [1, 18, 77, 150]  # ragged; 3 splits leave the short requests' last splits empty
    pools = Pools(seq_lens, head_dim, dtype, page_size)
    q = pools.randn((len(seq_lens), KV_HEADS * group, head_dim), dtype).to(DEVICE)
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    lens = torch.tensor(seq_lens, device=DEVICE)
    scale = head_dim**-0.5
    out = decode_attention(
        q, k_buf, v_buf, pools.table, pools.kv_start, lens, scale=scale, num_kv_splits=3
    )
    for b, slots in enumerate(pools.slots):
        pos = torch.tensor([seq_lens[b] - 1], device=DEVICE)
        ref = reference(q[b : b + 1], k_buf[slots], v_buf[slots], pos, scale)
        check(out[b : b + 1], ref, dtype)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 5, 16])
def test_decode_split_merge_and_packed_indices(num_kv_splits: int) -> None:
    """Any split count gives the same answer (16 splits of >= 64 keys leave most splits empty),
    and packed `kv_indptr`/`kv_indices` read the same keys as the rows."""
    seq_lens = [3, 64, 65, 200]
    pools = Pools(seq_lens, 64, torch.float32, 1)
    q = pools.randn((len(seq_lens), 4, 64), torch.float32).to(DEVICE)
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    kv_indices = torch.cat(pools.slots).to(DEVICE)
    lens = torch.tensor(seq_lens, device=DEVICE)
    kv_indptr = torch.cumsum(torch.cat([lens.new_zeros(1), lens]), 0)
    out = decode_attention(
        q, k_buf, v_buf, kv_indices, kv_indptr[:-1], lens, scale=0.125,
        num_kv_splits=num_kv_splits,
    )  # fmt: skip
    for b, slots in enumerate(pools.slots):
        pos = torch.tensor([seq_lens[b] - 1], device=DEVICE)
        check(out[b : b + 1], reference(q[b : b + 1], k_buf[slots], v_buf[slots], pos, 0.125),
              torch.float32)  # fmt: skip


def run_extend(
    prefix_lens: list[int], extend_lens: list[int], group: int, head_dim: int,
    dtype: torch.dtype, page_size: int, kv_dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    pools = Pools(seq_lens, head_dim, kv_dtype or dtype, page_size)
    n = sum(extend_lens)
    q = pools.randn((n, KV_HEADS * group, head_dim), dtype).to(DEVICE)
    k = pools.randn((n, KV_HEADS, head_dim), dtype).to(DEVICE)
    v = pools.randn((n, KV_HEADS, head_dim), dtype).to(DEVICE)
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    loc = torch.cat([s[p:] for s, p in zip(pools.slots, prefix_lens, strict=True)]).to(DEVICE)
    store_kv(k_buf, v_buf, loc, k, v)  # the backend's order: store, then attend
    ext = torch.tensor(extend_lens, device=DEVICE)
    ext_start = torch.cumsum(ext, 0) - ext
    scale = head_dim**-0.5
    out = extend_attention(
        q, k, v, k_buf, v_buf, pools.table, pools.kv_start,
        torch.tensor(prefix_lens, device=DEVICE), ext_start, ext, max(extend_lens), scale=scale,
    )  # fmt: skip
    for b, slots in enumerate(pools.slots):
        rows = slice(int(ext_start[b]), int(ext_start[b] + ext[b]))
        pos = torch.arange(prefix_lens[b], seq_lens[b], device=DEVICE)
        check(out[rows], reference(q[rows], k_buf[slots], v_buf[slots], pos, scale), dtype)


@pytest.mark.parametrize(("group", "head_dim", "dtype", "page_size"), CASES)
def test_extend_matches_reference(
    group: int, head_dim: int, dtype: torch.dtype, page_size: int
) -> None:
    # Prefixes 0 and > 0 (one ending mid-page), a 1-token extend, one longer than BLOCK_M (64).
    run_extend([0, 13, 40, 0], [9, 1, 25, 70], group, head_dim, dtype, page_size)


def test_extend_rounds_new_tokens_through_a_bf16_pool() -> None:
    """An fp32 model over a bf16 KV pool sees its new tokens as the pool stores them."""
    run_extend([0, 21], [12, 5], 3, 64, torch.float32, 16, kv_dtype=torch.bfloat16)


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8", "fp8_e4m3"])
def test_model_runner_with_triton_backend_matches_torch_backend(
    kv_cache_dtype: str | None, tiny_llama
) -> None:
    """A tiny random Llama (2 layers, 4 heads over 2 KV heads, head dim 64) generates the same
    greedy tokens with both backends, through a mixed extend batch with a prefix hit and batched
    decodes over ragged lengths; logits agree to fp32 round-off."""
    pytest.importorskip("transformers")
    from radixkv.model.model_runner import ModelRunner, kv_layout
    from radixkv.model.torch_backend import TorchNativeBackend
    from radixkv.model.triton_backend import TritonAttentionBackend
    from radixkv.protocol import SamplingParams
    from radixkv.testing import PoolDriver

    model = tiny_llama(DEVICE)

    def run(backend_cls: type, **extra: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        config = model.config
        layout = kv_layout(config, kv_cache_dtype, model.dtype)
        token_pool = TokenToKVPool(layout, 512, device=DEVICE)
        req_pool = ReqToTokenPool(8, 256, device=DEVICE)
        backend = backend_cls(
            token_pool=token_pool, req_pool=req_pool, num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=model.dtype, **extra,
        )  # fmt: skip
        runner = ModelRunner(model, token_pool, req_pool, backend)
        driver = PoolDriver(runner)
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        g = torch.Generator().manual_seed(1)
        base = driver.add(torch.randint(3, 128, (40,), generator=g).tolist(), params)
        driver.step([base], decode=False)
        # A 30-token prefix hit, a fresh prompt and the base request's 1-token extend, together.
        hit = driver.add([*base.tokens[:30], 7, 8, 9, 10, 11], params, base, prefix_len=30)
        fresh = driver.add(torch.randint(3, 128, (13,), generator=g).tolist(), params)
        reqs = [hit, base, fresh]
        logits = [driver.step(reqs, decode=False)]
        while running := [r for r in reqs if not r.finished]:
            logits.append(driver.step(running, decode=True))
        return [r.output for r in reqs], logits

    torch_tokens, torch_logits = run(TorchNativeBackend)
    # Three decode splits, so the split-K merge runs inside the model too.
    triton_tokens, triton_logits = run(TritonAttentionBackend, num_kv_splits=3)
    assert triton_tokens == torch_tokens
    for ours, ref in zip(triton_logits, torch_logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ---- a quantized pool: one-byte codes and a bf16 scale per slot and KV head ---------------------


@pytest.mark.parametrize("code_dtype", list(CODE_DTYPES))
def test_store_kv_quantizes_as_the_pool_does(code_dtype: torch.dtype) -> None:
    pools = Pools([5, 19, 33], 64, code_dtype, 16)
    loc = torch.cat(pools.slots).to(DEVICE)
    k, v = (pools.randn((len(loc), KV_HEADS, 64), torch.float32).to(DEVICE) for _ in range(2))
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    scales = pools.kv.get_kv_scales(0)
    with pytest.raises(ValueError, match="scales"):
        store_kv(k_buf, v_buf, loc, k, v)
    store_kv(k_buf, v_buf, loc, k, v, scales)
    for buf, scale_buf, new in ((k_buf, scales[0], k), (v_buf, scales[1], v)):
        want_codes, want_scale = quantize(new, code_dtype)  # what the torch backend writes
        assert torch.equal(scale_buf[loc], want_scale)
        assert torch.equal(buf[loc].float(), want_codes.float())


QUANT_CASES = [(3, 64, torch.float32, 1), (1, 128, torch.bfloat16, 16)]


@pytest.mark.parametrize("code_dtype", list(CODE_DTYPES))
@pytest.mark.parametrize(("group", "head_dim", "dtype", "page_size"), QUANT_CASES)
def test_decode_reads_a_quantized_pool(
    code_dtype: torch.dtype, group: int, head_dim: int, dtype: torch.dtype, page_size: int
) -> None:
    seq_lens = [1, 18, 150]
    pools = Pools(seq_lens, head_dim, code_dtype, page_size)
    q = pools.randn((len(seq_lens), KV_HEADS * group, head_dim), dtype).to(DEVICE)
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    lens = torch.tensor(seq_lens, device=DEVICE)
    scale = head_dim**-0.5
    out = decode_attention(
        q, k_buf, v_buf, pools.table, pools.kv_start, lens, scale=scale, num_kv_splits=2,
        scales=pools.kv.get_kv_scales(0),
    )  # fmt: skip
    for b, slots in enumerate(pools.slots):
        pos = torch.tensor([seq_lens[b] - 1], device=DEVICE)
        # decoded as the kernel's dots see them: in q's dtype on a GPU, fp32 under the interpreter
        k, v = pools.kv.read_kv(0, slots, torch.float32 if INTERPRET else dtype)
        check(out[b : b + 1], reference(q[b : b + 1], k, v, pos, scale), dtype)


@pytest.mark.parametrize("code_dtype", list(CODE_DTYPES))
def test_extend_reads_a_quantized_pool_new_tokens_included(code_dtype: torch.dtype) -> None:
    """Prefix and new tokens are both read as stored: the result a cached prefix would give."""
    prefix_lens, extend_lens = [0, 13, 40], [9, 1, 70]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    pools = Pools(seq_lens, 64, code_dtype, 1)
    n = sum(extend_lens)
    q = pools.randn((n, KV_HEADS * 3, 64), torch.float32).to(DEVICE)
    k, v = (pools.randn((n, KV_HEADS, 64), torch.float32).to(DEVICE) for _ in range(2))
    k_buf, v_buf = pools.kv.get_kv_buffer(0)
    scales = pools.kv.get_kv_scales(0)
    loc = torch.cat([s[p:] for s, p in zip(pools.slots, prefix_lens, strict=True)]).to(DEVICE)
    store_kv(k_buf, v_buf, loc, k, v, scales)
    ext = torch.tensor(extend_lens, device=DEVICE)
    ext_start = torch.cumsum(ext, 0) - ext
    out = extend_attention(
        q, k, v, k_buf, v_buf, pools.table, pools.kv_start,
        torch.tensor(prefix_lens, device=DEVICE), ext_start, ext, max(extend_lens), scale=0.125,
        scales=scales,
    )  # fmt: skip
    for b, slots in enumerate(pools.slots):
        rows = slice(int(ext_start[b]), int(ext_start[b] + ext[b]))
        pos = torch.arange(prefix_lens[b], seq_lens[b], device=DEVICE)
        k_all, v_all = pools.kv.read_kv(0, slots, torch.float32)
        check(out[rows], reference(q[rows], k_all, v_all, pos, 0.125), torch.float32)
