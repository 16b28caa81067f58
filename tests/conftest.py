"""Session-wide test set-up."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and other libraries (transformers,
# torch) may import it before the kernel tests do. Without a GPU the kernels can only run in the
# interpreter, so set it for the whole session, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_llama() -> Callable[[str], torch.nn.Module]:
    """Makes, on a device, a random Llama of 2 layers, 4 heads over 2 KV heads of 64, a
    vocabulary of 128 (transformers' initialisation, seed 0) as radixkv's model."""

    def make(device: str) -> torch.nn.Module:
        import transformers

        from radixkv.model.config import ModelConfig
        from radixkv.model.llama import LlamaForCausalLM

        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=256, tie_word_embeddings=False,
        )  # fmt: skip
        hf = transformers.LlamaForCausalLM(hf_config).eval()
        with torch.device("meta"):
            model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf_config.to_dict()))
        model.load_hf_state_dict(hf.state_dict())
        return model.to(device)

    return make
