"""The model's tokenizer (with its chat template), loaded without torch.

The runtime process never imports torch. `transformers`' fast tokenizer class does not, but its
`AutoTokenizer` and its GGUF reader do; so the tokenizer of a GGUF file is rebuilt once, in a short
child process, and saved as a Hugging Face tokenizer directory next to the converted weights (keyed,
like them, by the source file's identity). Every later load reads that directory (well under a
second; rebuilding takes about 7 s for SmolLM2 here).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from radixkv.model_source import ModelSource, cache_dir, resolve_model, source_key

log = logging.getLogger("radixkv.tokenizer")

_EXPORT = "import sys; from radixkv.tokenizer import export_gguf_tokenizer as e; e(*sys.argv[1:])"


def load_tokenizer(model: str | Path | ModelSource) -> Any:
    """The model's `transformers` fast tokenizer; raises ModelNotFoundError or RuntimeError."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    if source.kind == "gguf":
        directory = gguf_tokenizer_dir(source.path)
        if not (directory / "tokenizer_config.json").exists():
            _export_in_child(source.path, directory)
    else:
        directory = source.path
        if not (directory / "tokenizer.json").is_file():
            raise RuntimeError(
                f"{directory} has no tokenizer.json; radixkv loads fast (tokenizers) tokenizers "
                "only: save one with transformers' tokenizer.save_pretrained()"
            )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def gguf_tokenizer_dir(gguf: Path) -> Path:
    """Where the tokenizer rebuilt from `gguf` is kept (whether or not it exists yet)."""
    return cache_dir() / f"{gguf.stem}-{source_key(gguf)}-tokenizer"


def _export_in_child(gguf: Path, directory: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT, str(gguf), str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not (directory / "tokenizer_config.json").exists():
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise RuntimeError(f"cannot rebuild the tokenizer of {gguf}: {detail[0]}")


def export_gguf_tokenizer(gguf: str, directory: str) -> None:
    """Rebuild the tokenizer of a GGUF file and save it to `directory` (runs in a child process:
    it imports torch through transformers' GGUF reader). Written to a temporary directory and
    renamed, so readers never see half a tokenizer; another process renaming first is fine."""
    from transformers import AutoTokenizer

    path = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent)
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as exc:  # another process renamed first: use theirs
        log.debug("tokenizer not cached (%s)", exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "tokenizer_config.json").exists():
            raise
