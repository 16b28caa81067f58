"""The runtime process's tokenizer, loaded without torch, equal to transformers' own; and the
import rule behind it: nothing under the front end imports torch or `radixkv.model`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from radixkv import tokenizer as frontend_tokenizer
from radixkv.model_source import resolve_model
from radixkv.tokenizer import load_tokenizer

FRONT_END = ("radixkv.client", "radixkv.frontend", "radixkv.http", "radixkv.router",
             "radixkv.launcher")  # fmt: skip


def test_gguf_tokenizer_is_rebuilt_once_and_equals_transformers(tmp_path: Path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("RADIXKV_CACHE_DIR", str(tmp_path))
    ours = load_tokenizer("smollm2-135m")
    saved = list(tmp_path.glob("*-tokenizer"))
    assert len(saved) == 1 and (saved[0] / "tokenizer_config.json").is_file()

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load rebuilt the tokenizer from the GGUF again")

    monkeypatch.setattr(frontend_tokenizer.subprocess, "run", no_child)
    again = load_tokenizer("smollm2-135m")
    location, kwargs = resolve_model("smollm2-135m").tokenizer_location()
    oracle = AutoTokenizer.from_pretrained(location, **kwargs)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🚀"}]
    texts = ("Hello world", "  spaces\n\ttabs", "émojis 🚀 中文", "<|im_start|>user\nhi<|im_end|>")
    for tok in (ours, again):
        assert tok.eos_token_id == oracle.eos_token_id == 2 and len(tok) == len(oracle) == 49152
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
            oracle.apply_chat_template(messages, add_generation_prompt=True)
        )
        for text in texts:
            ids = tok(text)["input_ids"]
            assert ids == oracle(text)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=True) == oracle.decode(
                ids, skip_special_tokens=True
            )


def test_a_directory_without_tokenizer_json_is_refused_clearly(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_the_front_end_never_imports_torch_or_the_model():
    """Every module of the runtime and router processes, the clients and the HTTP server,
    imported in a fresh interpreter, and the tokenizer loaded: neither torch nor radixkv.model is
    imported."""
    root = Path(__file__).resolve().parents[1] / "radixkv"
    modules = sorted(
        "radixkv." + ".".join(path.relative_to(root).with_suffix("").parts)
        for package in ("client", "frontend", "http", "router")
        for path in (root / package).glob("*.py")
        if path.name != "__init__.py"
    )
    modules.append("radixkv.launcher")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from radixkv.tokenizer import load_tokenizer\n"
        "load_tokenizer('smollm2-135m')\n"
        "bad = [m for m in sys.modules if m in ('torch', 'radixkv.model')\n"
        "       or m.startswith(('torch.', 'radixkv.model.'))]\n"
        "print(len(sys.modules), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(modules) >= 15 and all(m.startswith(FRONT_END) for m in modules)
