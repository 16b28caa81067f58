"""On-disk cache of converted (dequantised, renamed) weights, keyed by the source file identity."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from radixkv.model_source import cache_dir, source_key


def cache_path(source: Path, directory: Path | None = None) -> Path:
    """Where the converted weights of `source` live (whether or not they exist yet)."""
    return (directory or cache_dir()) / f"{source.stem}-{source_key(source)}.safetensors"


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when there is no (readable) cache file."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # a truncated or foreign file: convert again and overwrite it
        return None


def store(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (temporary file + rename), so a crash never leaves a half file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
