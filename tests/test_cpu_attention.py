"""The C decode-attention kernel against a plain torch reference, and inside the model runner."""

from __future__ import annotations

import pytest
import torch

from radixkv.model import cpu_attention
from radixkv.model.model_runner import ModelRunner
from radixkv.protocol import SamplingParams

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(), reason="no C compiler: the backend uses gather + SDPA"
)


def reference(q, k_buf, v_buf, kv_index, seq_lens, scale):
    """float32 softmax attention of each request over its own slots, GQA by repetition."""
    group = q.shape[1] // k_buf.shape[1]
    out = []
    for b in range(q.shape[0]):
        slots = kv_index[b, : seq_lens[b]]
        k = k_buf[slots].float().repeat_interleave(group, dim=1)  # [L, heads, d]
        v = v_buf[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def scattered_rows(seq_lens, num_slots, page, generator):
    """Each request's slots: whole pages in random order, as the pool hands them out."""
    pages = torch.randperm(num_slots // page - 1, generator=generator) + 1  # page 0: padding
    width = max(seq_lens)
    kv_index = torch.zeros((len(seq_lens), width), dtype=torch.int64)
    used = 0
    for b, n in enumerate(seq_lens):
        need = -(-n // page)
        slots = (pages[used : used + need, None] * page + torch.arange(page)).reshape(-1)
        kv_index[b, :n] = slots[:n]
        used += need
    return kv_index


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    ("kv_heads", "group", "dim"), [(4, 1, 64), (3, 3, 64), (1, 8, 128), (2, 6, 96)]
)
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("seq_lens", [[1, 37, 300, 64, 999], [5] * 9 + [130], [0, 700, 2, 17]])
@pytest.mark.parametrize("split", ["request", "kv_head", "auto"])
def test_kernel_equals_reference(dtype, tol, kv_heads, group, dim, page, seq_lens, split):
    """Ragged lengths (0 to 999 keys, odd and across blocks of 16 and 32), GQA 1/3/6/8, head dims
    64/96/128 (96: a shape the AVX512 path does not specialise), scattered pages; both task
    layouts (a task per request, a task per request and KV head). In bf16 this is the AVX512-BF16
    path where the CPU has it; the portable loops are checked below."""
    g = torch.Generator().manual_seed(len(seq_lens) * 7 + page)
    num_slots = 16 * 1024
    k_buf = torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype)
    v_buf = torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(len(seq_lens), kv_heads * group, dim, generator=g).to(dtype)
    kv_index = scattered_rows(seq_lens, num_slots, page, g)
    lens = torch.tensor(seq_lens)
    layout = {"request": 1, "kv_head": kv_heads, "auto": 0}[split]
    got = cpu_attention.decode_attention(q, k_buf, v_buf, kv_index, lens, dim**-0.5, layout)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference(q, k_buf, v_buf, kv_index, lens, dim**-0.5)
    want[lens == 0] = 0.0  # nothing to attend to: the kernel writes zeros
    # bf16: inputs and output are rounded to bf16 (8 bits of mantissa); accumulation is float32
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.skipif(not cpu_attention.fast_bf16(), reason="no AVX512-BF16 path on this CPU")
@pytest.mark.parametrize(("kv_heads", "group", "dim"), [(3, 3, 64), (2, 4, 128), (1, 2, 256)])
def test_vector_and_portable_bf16_paths_agree(kv_heads, group, dim):
    """Both bf16 implementations against the float32 reference: the vector path rounds the
    probabilities to bf16 before P.V, the portable one does not (measured here: the same max
    error, 7.6e-3, the output's own bf16 rounding; mean error 6.6e-4 against 6.1e-4)."""
    g = torch.Generator().manual_seed(dim)
    seq_lens = [1, 2, 15, 16, 33, 64, 257, 1000]
    k_buf = torch.randn(4096, kv_heads, dim, generator=g).bfloat16()
    v_buf = torch.randn(4096, kv_heads, dim, generator=g).bfloat16()
    q = (3 * torch.randn(len(seq_lens), kv_heads * group, dim, generator=g)).bfloat16()
    kv_index = scattered_rows(seq_lens, 4096, 16, g)
    lens = torch.tensor(seq_lens)
    want = reference(q, k_buf, v_buf, kv_index, lens, dim**-0.5)
    for portable in (False, True):
        got = cpu_attention.decode_attention(
            q, k_buf, v_buf, kv_index, lens, dim**-0.5, portable=portable
        )
        torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


def test_kernel_at_its_limits_and_with_a_strided_query():
    g = torch.Generator().manual_seed(1)
    k_buf, v_buf = torch.randn(600, 8, 256, generator=g), torch.randn(600, 8, 256, generator=g)
    qkv = torch.randn(3, 64 + 8, 256, generator=g)
    q = qkv[:, :64]  # 64 heads of 256, a view into a fused projection as the model passes it
    kv_index = torch.randperm(599, generator=g)[:450].view(3, 150) + 1
    lens = torch.tensor([150, 1, 77])
    got = cpu_attention.decode_attention(q, k_buf, v_buf, kv_index, lens, 256**-0.5)
    torch.testing.assert_close(got, reference(q, k_buf, v_buf, kv_index, lens, 256**-0.5),
                               atol=2e-5, rtol=2e-5)  # fmt: skip


def head_major(x):
    """The pool's layout: stored `[kv_heads, slots, d]`, seen as `[slots, kv_heads, d]`."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8", "fp8_e4m3"])
def test_a_head_major_pool_reads_as_the_same_values_slot_major(kind):
    """The kernel follows the buffers' slot and head strides: the pool's head-major buffers and
    slot-major copies of them give identical results (the same sums in the same order)."""
    from radixkv.mem.kv_quant import QUANTIZED, quantize

    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    k_buf, v_buf = (torch.randn(2048, 3, 64, generator=g).to(dtype) for _ in range(2))
    scales = None
    if kind in QUANTIZED:
        (k_buf, ks), (v_buf, vs) = (quantize(x, QUANTIZED[kind][0]) for x in (k_buf, v_buf))
        scales = (ks, vs)
    q = torch.randn(5, 9, 64, generator=g).to(dtype)
    lens = torch.tensor([1, 33, 700, 64, 1000])
    kv_index = scattered_rows(lens.tolist(), 2048, 16, g)
    for split in (1, 3):
        want = cpu_attention.decode_attention(q, k_buf, v_buf, kv_index, lens, 0.125, split,
                                              scales=scales)  # fmt: skip
        got = cpu_attention.decode_attention(q, head_major(k_buf), head_major(v_buf), kv_index,
                                             lens, 0.125, split, scales=scales)  # fmt: skip
        assert torch.equal(got, want)


def test_buffers_laid_out_apart_or_with_strided_head_dims_are_refused():
    q = torch.randn(2, 4, 64)
    buf = torch.randn(8, 2, 64)
    idx, lens = torch.zeros(2, 4, dtype=torch.int64), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="equal strides"):
        cpu_attention.decode_attention(q, head_major(buf), buf, idx, lens, 0.125)
    strided = torch.randn(64, 8, 2).permute(1, 2, 0)  # [8, 2, 64], the head dim strided
    with pytest.raises(ValueError, match="contiguous head dims"):
        cpu_attention.decode_attention(q, strided, strided, idx, lens, 0.125)


def test_loading_the_kernel_leaves_float_semantics_alone():
    """Linked with -ffast-math, a library turns on flush-to-zero for the process when loaded."""
    assert cpu_attention.available()
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a subnormal
    assert (tiny * 1.0).item() != 0.0


def test_kernel_refuses_what_it_cannot_do():
    q = torch.randn(2, 4, 64, dtype=torch.float16)
    buf = torch.randn(8, 2, 64, dtype=torch.float16)
    idx, lens = torch.zeros(2, 4, dtype=torch.int64), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unsupported"):
        cpu_attention.decode_attention(q, buf, buf, idx, lens, 0.125)
    q, buf = q.float(), buf.float()
    with pytest.raises(ValueError, match="int64"):
        cpu_attention.decode_attention(q, buf, buf, idx.int(), lens, 0.125)
    with pytest.raises(ValueError, match="rows of 4 slots"):
        cpu_attention.decode_attention(q, buf, buf, idx, torch.tensor([1, 5]), 0.125)
    with pytest.raises(ValueError, match="group evenly"):
        cpu_attention.decode_attention(q[:, :3], buf, buf, idx, lens, 0.125)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3", "fp8_e5m2"])
def test_runner_decodes_the_same_tokens_with_and_without_the_kernel(kv_dtype):
    """fp32 tiny model: the C kernel (over codes, in a quantized pool) and the gather + SDPA
    path (over the decoded K/V) give the same greedy tokens."""
    from test_model_tiny import ours_from, prompts, tiny_hf  # tests/ is on sys.path

    from radixkv.testing import PoolDriver

    outputs = []
    for use_kernel in (True, False):
        model = ours_from(tiny_hf(heads=8, kv_heads=2))
        runner = ModelRunner.with_pools(
            model, num_slots=4096, max_running_requests=16, kv_dtype=kv_dtype
        )
        assert runner.token_pool.layout.quantized == (kv_dtype is not None)
        assert runner.backend._decode_kernel  # type: ignore[attr-defined]
        runner.backend._decode_kernel = use_kernel  # type: ignore[attr-defined]
        driver = PoolDriver(runner)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        reqs = [driver.add(p, params) for p in prompts([5, 40, 17, 90, 3], seed=4)]
        outputs.append(driver.generate(reqs))
    assert outputs[0] == outputs[1]
