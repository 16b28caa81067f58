"""The C extend attention kernel (`cpu_extend.py`) against a float32 SDPA reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixkv.model import cpu_extend

pytestmark = pytest.mark.skipif(
    not cpu_extend.usable(torch.bfloat16, torch.bfloat16, 9, 3, 64),
    reason="no AVX512-BF16 build of the attention kernels here",
)


def reference(q, k_buf, v_buf, kv_index, prefix, ext, scale):
    outs, start = [], 0
    for b, (p, e) in enumerate(zip(prefix, ext, strict=True)):
        slots = kv_index[b, : p + e]
        k = k_buf[slots].float().transpose(0, 1)[None]
        v = v_buf[slots].float().transpose(0, 1)[None]
        qq = q[start : start + e].float().transpose(0, 1)[None]
        allowed = torch.ones(e, p + e, dtype=torch.bool).tril(p)  # query i sees keys <= p + i
        o = F.scaled_dot_product_attention(qq, k, v, attn_mask=allowed, scale=scale,
                                           enable_gqa=True)  # fmt: skip
        outs.append(o[0].transpose(0, 1))
        start += e
    return torch.cat(outs)


@pytest.mark.parametrize(
    ("kvh", "group", "d"), [(3, 3, 64), (2, 4, 128), (1, 8, 128), (2, 2, 32), (1, 5, 96)]
)
@pytest.mark.parametrize(
    ("prefix", "ext"),
    [
        ([0], [1]),
        ([0], [5]),
        ([0, 7, 100], [40, 33, 1]),  # mixed: fresh, short prefix, one token after 100
        ([31, 32, 33], [1, 2, 64]),  # prefixes around a block edge
        ([3], [70]),  # query blocks cross key blocks off their edges
        ([200, 0], [64, 130]),
    ],
)
def test_matches_causal_attention_over_the_slots(kvh, group, d, prefix, ext):
    gen = torch.Generator().manual_seed(kvh * 100 + d + sum(ext))
    slots = 600
    k_buf = torch.randn(slots, kvh, d, generator=gen).bfloat16()
    v_buf = torch.randn(slots, kvh, d, generator=gen).bfloat16()
    longest = max(p + e for p, e in zip(prefix, ext, strict=True))
    # each request's slots scattered over the pool; rows padded with junk past their length
    kv_index = torch.stack([torch.randperm(slots, generator=gen)[: longest + 3]
                            for _ in prefix])  # fmt: skip
    q = (torch.randn(sum(ext), kvh * group, d, generator=gen) * 2).bfloat16()
    scale = d**-0.5
    got = cpu_extend.extend_attention(
        q, k_buf, v_buf, kv_index, torch.tensor(prefix), torch.tensor(ext), scale
    )
    want = reference(q, k_buf, v_buf, kv_index, prefix, ext, scale)
    # bf16 output and bf16 probabilities in P.V (as flash attention on GPUs)
    assert (got.float() - want).abs().max() < 0.02


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_a_quantized_pool_is_read_as_its_dequantized_values(kind):
    from radixkv.mem.kv_quant import QUANTIZED, dequantize, quantize

    gen = torch.Generator().manual_seed(2)
    k_buf, v_buf = (torch.randn(400, 3, 64, generator=gen).bfloat16() for _ in range(2))
    (k_codes, ks), (v_codes, vs) = (quantize(x, QUANTIZED[kind][0]) for x in (k_buf, v_buf))
    kv_index = torch.stack([torch.randperm(400, generator=gen)[:200] for _ in range(2)])
    prefix, ext = [100, 0], [37, 200]
    q = torch.randn(sum(ext), 9, 64, generator=gen).bfloat16()
    got = cpu_extend.extend_attention(
        q, k_codes, v_codes, kv_index, torch.tensor(prefix), torch.tensor(ext), 0.125,
        scales=(ks, vs),
    )  # fmt: skip
    k_vals = dequantize(k_codes, ks, torch.bfloat16)
    v_vals = dequantize(v_codes, vs, torch.bfloat16)
    want = reference(q, k_vals, v_vals, kv_index, prefix, ext, 0.125)
    assert (got.float() - want).abs().max() < 0.02
    with pytest.raises(ValueError, match="scales"):
        cpu_extend.extend_attention(q, k_codes, v_codes, kv_index, torch.tensor(prefix),
                                    torch.tensor(ext), 0.125)  # fmt: skip


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_a_head_major_pool_reads_as_the_same_values_slot_major(kind):
    """The pool's head-major buffers (`[kv_heads, slots, d]` seen as `[slots, kv_heads, d]`) and
    slot-major copies of them: identical results."""
    from radixkv.mem.kv_quant import QUANTIZED, quantize

    gen = torch.Generator().manual_seed(4)
    k_buf, v_buf = (torch.randn(600, 3, 64, generator=gen).bfloat16() for _ in range(2))
    scales = None
    if kind in QUANTIZED:
        (k_buf, ks), (v_buf, vs) = (quantize(x, QUANTIZED[kind][0]) for x in (k_buf, v_buf))
        scales = (ks, vs)
    kv_index = torch.stack([torch.randperm(599, generator=gen)[:290] + 1 for _ in range(2)])
    prefix, ext = torch.tensor([200, 0]), torch.tensor([37, 290])
    q = torch.randn(327, 9, 64, generator=gen).bfloat16()
    hm = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (k_buf, v_buf)]
    want = cpu_extend.extend_attention(q, k_buf, v_buf, kv_index, prefix, ext, 0.125,
                                       scales=scales)  # fmt: skip
    got = cpu_extend.extend_attention(q, *hm, kv_index, prefix, ext, 0.125, scales=scales)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="equal strides"):
        cpu_extend.extend_attention(q, hm[0], v_buf, kv_index, prefix, ext, 0.125, scales=scales)


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "fp8_e4m3"])
def test_one_token_requests_take_the_decode_path_beside_the_others(kind):
    """A decoding request riding in a prefill batch (one new token after its context) attends
    from the pool through the decode kernel's path: its rows equal that kernel's to the bit,
    the other requests' rows are unchanged by its presence."""
    from radixkv.mem.kv_quant import QUANTIZED, quantize
    from radixkv.model import cpu_attention

    gen = torch.Generator().manual_seed(6)
    k_buf, v_buf = (torch.randn(3000, 3, 64, generator=gen).bfloat16() for _ in range(2))
    scales = None
    if kind in QUANTIZED:
        (k_buf, ks), (v_buf, vs) = (quantize(x, QUANTIZED[kind][0]) for x in (k_buf, v_buf))
        scales = (ks, vs)
    prefix, ext = [1000, 0, 37, 700], [1, 45, 1, 64]
    kv_index = torch.stack([torch.randperm(2999, generator=gen)[:1001] + 1 for _ in range(4)])
    q = torch.randn(sum(ext), 9, 64, generator=gen).bfloat16()
    mixed = cpu_extend.extend_attention(q, k_buf, v_buf, kv_index, torch.tensor(prefix),
                                        torch.tensor(ext), 0.125, scales=scales)  # fmt: skip
    rows = [0, 46]  # the one-token requests' query rows
    lens = torch.tensor([1001, 38])
    alone = cpu_attention.decode_attention(q[rows], k_buf, v_buf, kv_index[[0, 2]], lens, 0.125,
                                           scales=scales)  # fmt: skip
    assert torch.equal(mixed[rows], alone)
    others = cpu_extend.extend_attention(
        torch.cat([q[1:46], q[47:]]), k_buf, v_buf, kv_index[[1, 3]], torch.tensor([0, 700]),
        torch.tensor([45, 64]), 0.125, scales=scales,
    )  # fmt: skip
    assert torch.equal(torch.cat([mixed[1:46], mixed[47:]]), others)


def test_a_reused_workspace_and_long_sequences():
    gen = torch.Generator().manual_seed(1)
    k_buf = torch.randn(2300, 3, 64, generator=gen).bfloat16()
    v_buf = torch.randn(2300, 3, 64, generator=gen).bfloat16()
    kv_index = torch.arange(2 * 1100).view(2, 1100) + 1
    prefix, ext = [1000, 0], [100, 1100]
    q = torch.randn(1200, 9, 64, generator=gen).bfloat16()
    ws = torch.empty(10, dtype=torch.bfloat16)  # too small: replaced
    args = (q, k_buf, v_buf, kv_index, torch.tensor(prefix), torch.tensor(ext), 0.125)
    first = cpu_extend.extend_attention(*args, workspace=ws)
    big = torch.full((10**7,), float("nan"), dtype=torch.bfloat16)  # stale NaNs never read
    again = cpu_extend.extend_attention(*args, workspace=big)
    assert torch.equal(first, again)
    want = reference(q, k_buf, v_buf, kv_index, prefix, ext, 0.125)
    assert (first.float() - want).abs().max() < 0.02


def test_bad_calls_are_refused():
    q = torch.zeros(4, 9, 64, dtype=torch.bfloat16)
    kv = torch.zeros(10, 3, 64, dtype=torch.bfloat16)
    index = torch.zeros(1, 8, dtype=torch.int64)
    lens = torch.tensor([0]), torch.tensor([4])
    with pytest.raises(ValueError, match="unsupported"):
        cpu_extend.extend_attention(q.float(), kv, kv, index, *lens, 0.1)
    with pytest.raises(ValueError, match="int64"):
        cpu_extend.extend_attention(q, kv, kv, index.int(), *lens, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_extend.extend_attention(q, kv, kv, index, torch.tensor([6]), torch.tensor([4]), 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_extend.extend_attention(q, kv, kv, index, torch.tensor([0]), torch.tensor([3]), 0.1)
    two = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="negative"):  # sums to the 4 queries, but -1
        cpu_extend.extend_attention(q, kv, kv, two, torch.tensor([0, 0]), torch.tensor([5, -1]),
                                    0.1)  # fmt: skip
    with pytest.raises(ValueError, match="heads of 64"):
        cpu_extend.extend_attention(q, kv[..., :32], kv[..., :32], index, *lens, 0.1)


@pytest.mark.slow
def test_the_backend_sends_extends_to_the_kernel_with_sdpas_results():
    from radixkv.model import torch_plan
    from radixkv.model.model_runner import ModelRunner
    from radixkv.testing import PoolDriver

    runner = ModelRunner.from_pretrained(
        "smollm2-135m", dtype="bf16", num_slots=4096, max_running_requests=8
    )
    backend = runner.backend
    assert getattr(backend, "extend_kernel", False)  # bf16 model, bf16 pool, this CPU
    drv = PoolDriver(runner)
    base = drv.add([(j * 7919) % 30000 + 100 for j in range(200)])
    drv.step([base])
    prompts = [[(j * 104729 + i) % 30000 + 100 for j in range(n)] for i, n in
               enumerate((3, 90, 150))]  # fmt: skip
    plans, logits = [], {}
    real_plan = torch_plan.plan_batch

    def spy(*args):
        plans.append(real_plan(*args))
        return plans[-1]

    torch_plan_name = "radixkv.model.torch_backend.plan_batch"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_plan_name, spy)
        for on in (True, False):
            backend.extend_kernel = on
            reqs = [drv.add(p) for p in prompts]
            hit = drv.add([*base.tokens[:200], 5, 6, 7, 8], prefix_from=base, prefix_len=200)
            logits[on] = drv.step([*reqs, hit], decode=False)  # fresh prompts and a prefix hit
            for r in [*reqs, hit]:
                drv.release(r)
    assert plans[0].extend_kernel and not plans[1].extend_kernel
    ref, got = logits[False], logits[True]
    spread = ref.max(-1).values - ref.min(-1).values
    assert ((got - ref).abs().max(-1).values < 0.03 * spread).all()
    assert (ref.topk(3, dim=-1).indices == got.argmax(-1, keepdim=True)).any(-1).all()
