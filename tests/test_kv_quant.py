"""The quantized KV cache: codes and scales, the pool, the CPU kernel and the model runner."""

from __future__ import annotations

import pytest
import torch

from radixkv.mem import KVLayout, TokenToKVPool
from radixkv.mem.kv_quant import QUANTIZED, dequantize, key_rotation, quantize
from radixkv.model import cpu_attention
from radixkv.model.model_runner import ModelRunner, kv_layout
from radixkv.protocol import SamplingParams

CODES = [dtype for dtype, _ in QUANTIZED.values()]


@pytest.mark.parametrize(("name", "rel"), [("int8", 0.015), ("fp8_e4m3", 0.04), ("fp8_e5m2", 0.08)])
def test_codes_round_trip_within_the_format_precision(name, rel):
    code_dtype, qmax = QUANTIZED[name]
    x = torch.randn(500, 3, 64) * torch.logspace(-3, 2, 500)[:, None, None]  # 5 decades of scale
    codes, scale = quantize(x, code_dtype)
    assert codes.dtype == code_dtype and scale.dtype == torch.bfloat16 and scale.shape == (500, 3)
    back = dequantize(codes, scale, torch.float32)
    # per token and head: the error is relative to that head's own magnitude
    err = (back - x).norm(dim=-1) / x.norm(dim=-1)
    assert float(err.max()) < rel
    # the largest value of every head sits at the edge of the code range
    assert torch.allclose(codes.float().abs().amax(-1), torch.full((500, 3), qmax), rtol=0.01)
    if code_dtype == torch.int8:  # round to nearest: within half a step of the stored scale
        assert bool(((back - x).abs() <= scale.float()[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("code_dtype", CODES)
def test_zeros_and_tiny_heads_decode_exactly(code_dtype):
    x = torch.zeros(4, 2, 8)
    x[1, 1, 3] = 1e-30
    codes, scale = quantize(x, code_dtype)
    back = dequantize(codes, scale, torch.float32)
    assert bool((back[0] == 0).all()) and bool(torch.isfinite(back).all())


def test_a_quantized_token_costs_about_half_of_bf16_and_the_budget_holds_1_9x_the_tokens():
    bf16 = KVLayout(30, 3, 64, torch.bfloat16)
    assert bf16.bytes_per_token == 23040
    for code_dtype in CODES:
        layout = KVLayout(30, 3, 64, code_dtype)
        assert layout.quantized and layout.bytes_per_token == 2 * 30 * 3 * (64 + 2)
        budget = 64 * 2**20
        ratio = (
            TokenToKVPool.from_memory_budget(layout, budget).capacity
            / TokenToKVPool.from_memory_budget(bf16, budget).capacity
        )
        assert 1.9 < ratio < 1.95


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_the_pool_stores_codes_and_reads_back_decoded_values(name):
    layout = kv_layout(_config(), name)
    assert layout.dtype == QUANTIZED[name][0]
    pool = TokenToKVPool(layout, 64)
    slots = pool.alloc(5)
    assert slots is not None
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    pool.set_kv(1, slots, k, v)
    assert pool.k_buffer[1].dtype == layout.dtype and pool.k_scale[1].shape == (65, 2)
    k_back, v_back = pool.read_kv(1, slots.view(1, 5), torch.float32)
    assert k_back.shape == (1, 5, 2, 16)
    want_k = dequantize(*quantize(k, layout.dtype), torch.float32)
    torch.testing.assert_close(k_back[0], want_k, rtol=0, atol=0)
    assert float((v_back[0] - v).norm() / v.norm()) < 0.06


def _config():
    from test_model_tiny import tiny_hf  # tests/ is on sys.path

    from radixkv.model.config import ModelConfig

    return ModelConfig.from_hf_dict(tiny_hf(heads=4, kv_heads=2).config.to_dict())


def reference(q, k_buf, v_buf, kv_index, seq_lens, scale):
    group = q.shape[1] // k_buf.shape[1]
    out = []
    for b in range(q.shape[0]):
        slots = kv_index[b, : seq_lens[b]]
        k = k_buf[slots].float().repeat_interleave(group, dim=1)
        v = v_buf[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler")
@pytest.mark.parametrize("code_dtype", CODES)
@pytest.mark.parametrize(("q_dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("kv_heads", "group", "dim"), [(3, 3, 64), (2, 4, 128), (2, 6, 96)])
@pytest.mark.parametrize("portable", [False, True])
def test_kernel_reads_codes_as_the_decoded_values(code_dtype, q_dtype, tol, kv_heads, group, dim,
                                                  portable):  # fmt: skip
    """The C kernel over codes and scales equals attention over the decoded K/V (bf16 queries:
    the AVX512-BF16 path where the CPU has it, and the portable loops; fp32: portable)."""
    g = torch.Generator().manual_seed(dim + group)
    seq_lens = [1, 2, 17, 33, 300, 0]
    num_slots = 2048
    x = torch.randn(2, num_slots, kv_heads, dim, generator=g) * 4
    (k, ks), (v, vs) = quantize(x[0], code_dtype), quantize(x[1], code_dtype)
    q = torch.randn(len(seq_lens), kv_heads * group, dim, generator=g).to(q_dtype)
    kv_index = torch.randperm(num_slots - 1, generator=g)[: 6 * 300].view(6, 300) + 1
    lens = torch.tensor(seq_lens)
    got = cpu_attention.decode_attention(
        q, k, v, kv_index, lens, dim**-0.5, portable=portable, scales=(ks, vs)
    )
    want = reference(
        q, dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32), kv_index, lens,
        dim**-0.5,
    )  # fmt: skip
    want[lens == 0] = 0.0
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_kernel_refuses_codes_without_scales():
    q = torch.randn(1, 2, 64)
    codes = torch.zeros(4, 1, 64, dtype=torch.int8)
    idx, lens = torch.zeros(1, 2, dtype=torch.int64), torch.tensor([1])
    with pytest.raises(ValueError, match="scales given: False"):
        cpu_attention.decode_attention(q, codes, codes, idx, lens, 0.125)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_deterministic_mode_reads_a_quantized_cache_batch_invariantly(name):
    """--deterministic sends every attention through the C kernel, codes included (and, for fp8,
    queries and keys through the key rotation): a request gives the same tokens alone and in a
    batch."""
    from test_model_tiny import ours_from, prompts, tiny_hf

    from radixkv.mem import ReqToTokenPool
    from radixkv.testing import PoolDriver

    model = ours_from(tiny_hf(heads=8, kv_heads=2))

    def driver() -> PoolDriver:
        pool = TokenToKVPool(kv_layout(model.config, name, model.dtype), 4096)
        rows = ReqToTokenPool(16, model.config.max_position_embeddings)
        return PoolDriver(ModelRunner(model, pool, rows, "torch", deterministic=True))

    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batch = driver()
    together = batch.generate([batch.add(p, params) for p in prompts([5, 40, 17, 90], seed=6)])
    for prompt, want in zip(prompts([5, 40, 17, 90], seed=6), together, strict=True):
        alone = driver()
        assert alone.generate([alone.add(prompt, params)]) == [want]


@pytest.mark.parametrize("head_dim", [1, 3, 8, 16, 64, 80, 96, 128])
def test_the_key_rotation_is_orthogonal_for_any_head_size(head_dim):
    rotation = key_rotation(head_dim)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(head_dim), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [*QUANTIZED, None])
def test_fp8_pools_store_keys_rotated_and_the_others_do_not(name):
    from test_model_tiny import ours_from, tiny_hf

    runner = ModelRunner.with_pools(
        ours_from(tiny_hf()), num_slots=64, max_running_requests=2, kv_dtype=name
    )
    rotated = name is not None and name.startswith("fp8")
    assert runner.token_pool.layout.rotated_keys == rotated
    assert (runner.backend.key_rotation is not None) == rotated


def test_rotating_queries_and_keys_changes_the_stored_keys_but_not_the_outputs():
    """The model maps queries and keys through one orthogonal matrix: the pool holds the rotated
    keys and every attention path (batched prefill, a prefix hit, decode) gives the same tokens
    as without it, and the last layer's keys are the plain ones rotated: its input, the layer
    before's attention output, did not change (fp32 model and pool: no quantization hides a
    difference)."""
    from test_model_tiny import ours_from, prompts, tiny_hf

    from radixkv.testing import PoolDriver

    model = ours_from(tiny_hf())
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    runs = []
    for rotate in (False, True):
        runner = ModelRunner.with_pools(model, num_slots=1024, max_running_requests=8)
        if rotate:
            runner.backend.key_rotation = key_rotation(model.config.head_dim)
        driver = PoolDriver(runner)
        first = [driver.add(p, params) for p in prompts([30, 7, 55], seed=3)]
        driver.generate(first)
        hit = driver.add([*first[2].tokens[:40], 5, 6, 7], params, prefix_from=first[2],
                         prefix_len=40)  # fmt: skip
        driver.generate([hit])
        runs.append((runner, [*first, hit]))
    (plain, plain_reqs), (rotated, rotated_reqs) = runs
    for a, b in zip(plain_reqs, rotated_reqs, strict=True):
        assert a.output == b.output
    rotation = key_rotation(model.config.head_dim)
    k_plain, k_rotated = plain.token_pool.k_buffer[1], rotated.token_pool.k_buffer[1]
    assert not torch.allclose(k_plain, k_rotated, atol=1e-3)
    torch.testing.assert_close(k_plain @ rotation, k_rotated, atol=1e-5, rtol=0)


@pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler")
@pytest.mark.parametrize("code_dtype", CODES)
def test_kernel_over_codes_keeps_peaked_softmaxes_and_tiny_values_finite(code_dtype):
    """Scores hundreds apart (whole blocks of keys weigh < 1e-30 against the best one) and V heads
    near zero: the kernel's int16 probabilities per block (int8 pools) stay finite and right."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1025, 3, 64, generator=g)
    x[1, 1:513] *= 1e-20  # the first half of the V rows (and their scales) are tiny
    (k, ks), (v, vs) = quantize(x[0], code_dtype), quantize(x[1], code_dtype)
    q = (torch.randn(4, 9, 64, generator=g) * 60).bfloat16()
    kv_index = (torch.arange(4 * 256) + 1).view(4, 256)
    lens = torch.tensor([256, 200, 31, 1])
    got = cpu_attention.decode_attention(q, k, v, kv_index, lens, 0.125, scales=(ks, vs))
    want = reference(
        q, dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32), kv_index, lens, 0.125
    )
    assert bool(torch.isfinite(got.float()).all())
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)
