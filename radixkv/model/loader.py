"""Load a model's config and weights from the files `radixkv.model_source` resolved.

The tokenizer is not loaded here (it belongs to the runtime process, which never imports torch:
see `radixkv.tokenizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from radixkv.model import weight_cache
from radixkv.model.config import ModelConfig
from radixkv.model.dtype import resolve_dtype
from radixkv.model.gguf_file import open_gguf, read_gguf_config, read_gguf_tensors
from radixkv.model_source import ModelNotFoundError, ModelSource, resolve_model

__all__ = [
    "LoadedWeights",
    "ModelNotFoundError",
    "ModelSource",
    "load_config",
    "load_model",
    "load_weights",
    "resolve_model",
]

if TYPE_CHECKING:
    from radixkv.model.llama import LlamaForCausalLM


def load_config(source: ModelSource) -> ModelConfig:
    if source.kind == "gguf":
        return read_gguf_config(open_gguf(source.path))
    config = ModelConfig.from_hf_dict(json.loads((source.path / "config.json").read_text()))
    gen = source.path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
            config = ModelConfig(**{**config.__dict__, "eos_token_ids": ids})
    return config


@dataclass(frozen=True)
class LoadedWeights:
    """Tensors under HF parameter names, and whether the on-disk cache provided them."""

    tensors: dict[str, torch.Tensor]
    cache_path: Path | None
    cache_hit: bool


def load_weights(
    source: ModelSource, config: ModelConfig, cache_directory: Path | None = None
) -> LoadedWeights:
    """HF-named tensors. GGUF files are dequantised once and then read from the weight cache."""
    if source.kind == "hf":
        from safetensors.torch import load_file

        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(source.path.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        return LoadedWeights(tensors, None, False)
    path = weight_cache.cache_path(source.path, cache_directory)
    cached = weight_cache.load_cached(path)
    if cached is not None:
        return LoadedWeights(cached, path, True)
    tensors = read_gguf_tensors(open_gguf(source.path), config)
    weight_cache.store(path, tensors)
    return LoadedWeights(tensors, path, False)


def load_model(
    model: str | Path | ModelSource,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str = "cpu",
    cache_directory: Path | None = None,
) -> LlamaForCausalLM:
    """Build our Llama-family model with its weights, in `dtype` (`auto`: see `resolve_dtype`)."""
    from radixkv.model.llama import LlamaForCausalLM

    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config = load_config(source)
    weights = load_weights(source, config, cache_directory)
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        net = LlamaForCausalLM(config)
    net.load_hf_state_dict(weights.tensors, dtype=torch_dtype, device=device)
    return net.eval()
