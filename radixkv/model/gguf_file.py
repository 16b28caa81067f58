"""Read a Llama-family GGUF file: config from its metadata, tensors dequantised to HF names.

The tensors come out exactly as `transformers` loads the same file (its GGUF integration is our
correctness oracle): dequantised to float32 by `gguf.quants.dequantize`, and for the `llama`
architecture the Q/K rows un-permuted (llama.cpp's converter interleaves the two rotary halves of
every head; HF models use the half-split layout).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixkv.model.config import ModelConfig, RopeScaling

# GGUF tensor name (without the `.weight` / `.bias` suffix) -> HF parameter name.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over `path` (memory-mapped; cheap until tensors are read)."""
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_config(reader: Any) -> ModelConfig:
    """Build a `ModelConfig` from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama, qwen2")
    name = str(_field(reader, "general.name", "")).lower()
    family = "mistral" if arch == "llama" and "mistral" in name else arch
    tensor_names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = None
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling = RopeScaling.from_dict(
            {
                "rope_type": scaling_type,
                "factor": _field(reader, f"{arch}.rope.scaling.factor", 1.0),
                "original_max_position_embeddings": _field(
                    reader, f"{arch}.rope.scaling.original_context_length", 8192
                ),
            }
        )
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    head_dim = _field(reader, f"{arch}.rope.dimension_count") if arch == "llama" else None
    return ModelConfig(
        architecture=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor, or None for tensors we do not use (e.g. rope_freqs)."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, suffix = m.groups()
        if part not in _LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved pairs -> two halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_tensors(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every used tensor of the file, dequantised to float32, under its HF parameter name."""
    from gguf.quants import dequantize

    permute = _field(reader, "general.architecture") == "llama"
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if permute and ".self_attn.q_proj." in name:
            w = unpermute_rope_rows(w, config.num_heads)
        elif permute and ".self_attn.k_proj." in name:
            w = unpermute_rope_rows(w, config.num_kv_heads)
        out[name] = torch.from_numpy(
            np.array(w, copy=True)
        )  # dequantize may return read-only views
    return out
