"""Random-weight tiny models vs transformers: shapes, GQA ratios, rope scaling, batching paths."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from radixkv.model import dtype as dtype_mod
from radixkv.model.config import ModelConfig, RopeScaling
from radixkv.model.dtype import resolve_dtype
from radixkv.model.llama import LlamaForCausalLM as OurLlama
from radixkv.model.model_runner import ModelRunner
from radixkv.model.rotary import inverse_frequencies
from radixkv.protocol import SamplingParams
from radixkv.testing import PoolDriver

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_hf(heads: int = 4, kv_heads: int = 2, rope: dict | None = None, qwen: bool = False):
    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = (
        Qwen2ForCausalLM(Qwen2Config(**kwargs)) if qwen else LlamaForCausalLM(LlamaConfig(**kwargs))
    )
    if qwen:  # random init leaves biases at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def ours_from(hf, dtype: torch.dtype = torch.float32) -> OurLlama:
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    with torch.device("meta"):
        model = OurLlama(config)
    model.load_hf_state_dict(hf.state_dict(), dtype=dtype)
    return model


def driver_for(model: OurLlama, slots: int = 2048) -> PoolDriver:
    return PoolDriver(ModelRunner.with_pools(model, num_slots=slots, max_running_requests=16))


def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_gqa_ratios_match_transformers(heads: int, kv_heads: int) -> None:
    hf = tiny_hf(heads, kv_heads)
    driver = driver_for(ours_from(hf))
    ps = prompts([5, 17, 9])
    reqs = [driver.add(p) for p in ps]
    logits = driver.step(reqs, decode=False)  # one padded extend batch
    assert logits.shape == (3, 96) and logits.dtype == torch.float32
    for i, p in enumerate(ps):
        torch.testing.assert_close(logits[i], hf_last_logits(hf, p), atol=1e-4, rtol=1e-4)
    for _ in range(3):  # batched decode over different lengths
        logits = driver.step(reqs)
        for i, r in enumerate(reqs):
            torch.testing.assert_close(
                logits[i], hf_last_logits(hf, r.tokens[:-1]), atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_matches_transformers(rope: dict) -> None:
    rope = {"rope_theta": 10000.0, **rope}
    hf = tiny_hf(rope=rope)
    ours = ours_from(hf)
    assert ours.config.rope_scaling == RopeScaling.from_dict(rope)
    ref_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf.config, "cpu")
    mine = inverse_frequencies(16, 10000.0, ours.config.rope_scaling)
    torch.testing.assert_close(mine, ref_inv_freq, atol=0, rtol=0)
    # Positions well past original_max_position_embeddings (32).
    (p,) = prompts([120])
    driver = driver_for(ours)
    logits = driver.step([driver.add(p)], decode=False)
    torch.testing.assert_close(logits[0], hf_last_logits(hf, p), atol=1e-4, rtol=1e-4)


def test_qwen2_bias_matches_transformers() -> None:
    hf = tiny_hf(qwen=True)
    ours = ours_from(hf)
    assert ours.config.attention_bias and ours.config.architecture == "qwen2"
    driver = driver_for(ours)
    ps = prompts([7, 12])
    logits = driver.step([driver.add(p) for p in ps], decode=False)
    for i, p in enumerate(ps):
        torch.testing.assert_close(logits[i], hf_last_logits(hf, p), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ragged_waste", [1.5, 100.0])  # per-request attention / one padded call
def test_prefix_and_mixed_extend_match_single_requests(ragged_waste, monkeypatch) -> None:
    monkeypatch.setattr("radixkv.model.torch_plan.RAGGED_WASTE", ragged_waste)
    hf = tiny_hf()
    driver = driver_for(ours_from(hf))
    base = driver.add(prompts([30])[0])
    driver.step([base], decode=False)
    # A prefix hit of 20 tokens, a fresh prompt and a decode-like 1-token extend, in one batch.
    hit = driver.add([*base.tokens[:20], 5, 6, 7], prefix_from=base, prefix_len=20)
    fresh = driver.add(prompts([11], seed=3)[0])
    logits = driver.step([hit, base, fresh], decode=False)
    for i, r in enumerate([hit, base, fresh]):
        ref = hf_last_logits(hf, r.tokens[:-1])
        torch.testing.assert_close(logits[i], ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_generate() -> None:
    hf = tiny_hf()
    driver = driver_for(ours_from(hf))
    ps = prompts([4, 9, 15])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outs = driver.generate([driver.add(p, params) for p in ps])
    for p, out in zip(ps, outs, strict=True):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        assert out == ref[0, len(p) :].tolist()


def test_bf16_model_runs_and_uses_bf16_kv() -> None:
    hf = tiny_hf()
    driver = driver_for(ours_from(hf, torch.bfloat16))
    assert driver.runner.token_pool.layout.dtype == torch.bfloat16
    (p,) = prompts([10])
    logits = driver.step([driver.add(p)], decode=False)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], hf_last_logits(hf, p), atol=0.1, rtol=0.05)


def test_moving_the_model_moves_its_rotary_tables() -> None:
    """`.to(dtype or device)` rebuilds the rotary tables where the weights went (a model moved to
    CUDA after loading looked its positions up in CPU tables before)."""
    hf = tiny_hf()
    loaded_bf16 = ours_from(hf, torch.bfloat16)
    moved = ours_from(hf).to(torch.bfloat16)
    assert loaded_bf16.rotary is not None and moved.rotary is not None
    assert moved.rotary.cos.dtype == torch.bfloat16 and moved.rotary.cos.device == moved.device
    assert torch.equal(moved.rotary.cos, loaded_bf16.rotary.cos)
    assert torch.equal(moved.rotary.sin, loaded_bf16.rotary.sin)


def test_config_from_hf_dict_reads_everything() -> None:
    d = tiny_hf(rope={"rope_theta": 500000.0, **LLAMA3_ROPE}).config.to_dict()
    d.update(eos_token_id=[2, 7], bos_token_id=1)
    c = ModelConfig.from_hf_dict(d)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_kv_groups) == (4, 2, 16, 2)
    assert c.rope_scaling is not None and c.rope_scaling.rope_type == "llama3"
    assert c.eos_token_ids == (2, 7) and c.bos_token_id == 1
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    legacy.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    c2 = ModelConfig.from_hf_dict(legacy)
    assert c2.rope_theta == 500000.0 and c2.rope_scaling == RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_dict({**legacy, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf_dict({**legacy, "model_type": "gpt2"})


def test_resolve_dtype() -> None:
    # AVX512-BF16 without AMX is slower than fp32 for matmuls (measured): auto keeps fp32
    slow, fast = (lambda: 0.57), (lambda: 2.5)  # bf16 matmul / fp32, measured on two CPUs
    assert resolve_dtype("auto", "cpu", frozenset({"avx512_bf16"}), slow) == torch.float32
    assert resolve_dtype("auto", "cpu", frozenset({"avx512_bf16"}), fast) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", frozenset({"avx2"}), fast) == torch.float32
    assert resolve_dtype("auto", "cpu", frozenset({"amx_bf16", "avx2"})) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", frozenset({"avx2"})) == torch.float32
    assert resolve_dtype("auto", "cuda", frozenset()) == torch.bfloat16
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("BF16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_bf16_speedup_is_measured_once_and_kept(tmp_path, monkeypatch) -> None:
    """`auto` on an AVX512-BF16 CPU reads one kept measurement: a busy machine at a later start
    cannot flip the dtype."""
    monkeypatch.setenv("RADIXKV_CACHE_DIR", str(tmp_path))
    assert 0.1 < dtype_mod.measure_bf16_speedup(rounds=3) < 50  # a real timing, sane
    measured = iter([2.5, 0.6])
    monkeypatch.setattr(dtype_mod, "measure_bf16_speedup", lambda: next(measured))
    dtype_mod.bf16_matmul_speedup.cache_clear()
    try:
        assert dtype_mod.bf16_matmul_speedup() == 2.5
        dtype_mod.bf16_matmul_speedup.cache_clear()  # a new process
        assert dtype_mod.bf16_matmul_speedup() == 2.5  # kept, not the 0.6 a new timing gives
        (kept,) = (tmp_path / "dtype").iterdir()
        kept.write_text("not json")
        dtype_mod.bf16_matmul_speedup.cache_clear()
        assert dtype_mod.bf16_matmul_speedup() == 0.6  # unreadable: measured again
    finally:
        dtype_mod.bf16_matmul_speedup.cache_clear()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prepacked_linears_compute_what_plain_ones_do(dtype: torch.dtype, tol: float) -> None:
    from radixkv.model.prepack import PackedLinear

    hf = tiny_hf(qwen=True)  # q/k/v biases too
    plain, packed = ours_from(hf, dtype), ours_from(hf, dtype)
    if not packed.prepack():
        pytest.skip("oneDNN weight packing is not available in this torch build")
    assert packed.prepack()  # idempotent
    kinds = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    g = torch.Generator().manual_seed(3)
    for layer_p, layer_q in zip(plain.layers, packed.layers, strict=True):
        for kind in kinds:
            p, q = layer_p.get_submodule(kind), layer_q.get_submodule(kind)
            assert isinstance(q, PackedLinear) and not isinstance(p, PackedLinear)
            x = torch.randn(7, p.in_features, generator=g).to(dtype)
            ref = p(x).float()
            assert torch.allclose(q(x).float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert packed.lm_head is not None and packed.packed_head is not None
    x = torch.randn(4, 64, generator=g).to(dtype)
    ref = packed.lm_head(x).float()
    got = packed.packed_head(x).float()
    assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_prepack_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("RADIXKV_PREPACK", "0")
    model = ours_from(tiny_hf())
    assert not model.prepack()
    assert not any(type(m).__name__ == "PackedLinear" for m in model.modules())
