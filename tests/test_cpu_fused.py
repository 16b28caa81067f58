"""The fused small ops (`cpu_fused.py`) against the torch ops they replace; the model over them."""

from __future__ import annotations

import pytest
import torch

from radixkv.model import cpu_fused
from radixkv.model.config import ModelConfig
from radixkv.model.llama import RMSNorm
from radixkv.model.rotary import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(not cpu_fused.usable(torch.bfloat16, torch.device("cpu")),
                                reason="no C compiler for the fused ops")  # fmt: skip

gen = torch.Generator().manual_seed(0)


def activations(rows: int, cols: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows of different magnitudes (as a residual stream has), some with one large outlier."""
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 20
    x[::7, 3] *= 50
    return x.to(dtype)


def rare_mismatches(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but for a float32 sum or exp landing across a bf16 rounding boundary: at most one
    element in 10^4, each off by one bf16 step of its value."""
    differ = got != want
    assert differ.sum().item() <= max(1, want.numel() // 10_000), differ.sum()
    step = want.float().abs()[differ] * 2**-7 + 1e-30
    assert ((got.float() - want.float()).abs()[differ] <= step).all()


@pytest.mark.parametrize("rows", [1, 3, 64, 1500])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_is_the_residual_add_and_torch_rmsnorm(rows, with_delta):
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16)
    norm.weight.data = (torch.rand(576, generator=gen) * 2).bfloat16()
    x, delta = activations(rows, 576), activations(rows, 576)
    want_x = x + delta if with_delta else x.clone()
    with torch.inference_mode():
        want = norm(want_x)
    got = cpu_fused.add_rmsnorm(x, delta if with_delta else None, norm.weight, norm.eps)
    assert torch.equal(x, want_x)  # updated in place, rounded as torch's add
    rare_mismatches(got, want)


def test_add_rmsnorm_reads_strided_rows_and_rejects_mismatches():
    wide = activations(10, 1000)
    x = wide[:, :576]  # rows 1000 elements apart
    weight = torch.ones(576, dtype=torch.bfloat16)
    want = RMSNorm(576, 1e-6).bfloat16()(x.clone())
    rare_mismatches(cpu_fused.add_rmsnorm(x, None, weight, 1e-6), want.detach())
    with pytest.raises(ValueError, match="one dtype"):
        cpu_fused.add_rmsnorm(x, None, weight.float(), 1e-6)
    with pytest.raises(ValueError, match="does not match"):
        cpu_fused.add_rmsnorm(x, x[:5], weight, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        cpu_fused.add_rmsnorm(x, None, weight[:100], 1e-6)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_fused.add_rmsnorm(x.half(), None, weight.half(), 1e-6)


def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v():
    config = ModelConfig(architecture="llama", vocab_size=100, hidden_size=576,
                         intermediate_size=1536, num_layers=1, num_heads=9, num_kv_heads=3,
                         head_dim=64, rope_theta=100000.0)  # fmt: skip
    rotary = RotaryEmbedding(config, torch.bfloat16)
    rows, d = 300, config.head_dim
    qkv = activations(rows, (9 + 2 * 3) * d)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    cos, sin = rotary.lookup(positions)
    want = apply_rotary(qkv[:, : 12 * d].reshape(rows, 12, d), cos, sin)
    got = qkv.clone()
    cpu_fused.rope(got, 12, d, positions, rotary.cos, rotary.sin)
    assert torch.equal(got[:, : 12 * d].reshape(rows, 12, d), want)  # no reduction: exact
    assert torch.equal(got[:, 12 * d :], qkv[:, 12 * d :])
    with pytest.raises(ValueError, match="positions"):
        cpu_fused.rope(got, 12, d, positions.int(), rotary.cos, rotary.sin)
    with pytest.raises(ValueError, match="cannot rotate"):
        cpu_fused.rope(got, 16, d, positions, rotary.cos, rotary.sin)
    # the model checks positions once per forward, on the host (the kernel trusts them)
    rotary.check(4096)
    with pytest.raises(ValueError, match="position 4096 is past max_position_embeddings"):
        rotary.check(4097)


def test_a_row_gives_the_same_result_in_any_batch():
    x, delta, weight = activations(300, 576), activations(300, 576), torch.ones(576).bfloat16()
    full = cpu_fused.add_rmsnorm(x.clone(), delta, weight, 1e-5)
    for rows in (slice(299, 300), slice(296, 300), slice(0, 17)):
        alone = cpu_fused.add_rmsnorm(x[rows].clone(), delta[rows], weight, 1e-5)
        assert torch.equal(alone, full[rows])


@pytest.mark.slow
def test_the_model_over_fused_ops_gives_the_unfused_logits():
    from radixkv.model.model_runner import ModelRunner
    from radixkv.testing import PoolDriver

    runner = ModelRunner.from_pretrained(
        "smollm2-135m", dtype="bf16", num_slots=4096, max_running_requests=8
    )
    assert runner.model.fused_ops  # the runner turns them on for bf16 on the CPU
    drv = PoolDriver(runner)
    prompts = [[(i * 7919 + j * 104729) % 40000 + 100 for j in range(n)] for i, n in
               enumerate((5, 40, 300))]  # fmt: skip
    logits = {}
    for fused in (False, True):
        runner.model.fused_ops = fused
        reqs = [drv.add(p) for p in prompts]
        prefill = drv.step(reqs, decode=False)
        for r, token in zip(reqs, [101, 202, 303], strict=True):
            r.tokens[-1] = token  # the same next token in both runs
        logits[fused] = (prefill, drv.step(reqs, decode=True))
        for r in reqs:
            drv.release(r)
    for ref, got in zip(logits[False], logits[True], strict=True):
        # equal until a rounding-boundary event, then bf16 noise: well under the logit range
        spread = ref.max(-1).values - ref.min(-1).values
        assert ((got - ref).abs().max(-1).values < 0.03 * spread).all()
        top3 = ref.topk(3, dim=-1).indices
        assert (top3 == got.argmax(-1, keepdim=True)).any(-1).all()


def test_float32_models_keep_torch_ops(monkeypatch):
    assert not cpu_fused.usable(torch.float32, torch.device("cpu"))
    monkeypatch.setenv("RADIXKV_FUSED_OPS", "0")
    cpu_fused._library.cache_clear()
    try:
        assert not cpu_fused.usable(torch.bfloat16, torch.device("cpu"))
    finally:
        monkeypatch.undo()
        cpu_fused._library.cache_clear()
    assert cpu_fused.usable(torch.bfloat16, torch.device("cpu"))
