"""A compact Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) over the paged KV pool.

Numerics follow `transformers`' LlamaForCausalLM (RMSNorm in float32, rotate-half rope, SDPA);
Q/K/V and gate/up projections are fused into one matmul each. With `fused_ops` (bf16 on the CPU,
set by the runner) the small ops between the matmuls run as one-pass C kernels (`cpu_fused.py`):
the residual stream is then updated in place and each layer hands its MLP output to the next
layer's fused residual-add + RMSNorm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixkv.model import cpu_fused
from radixkv.model.attention import AttentionBackend
from radixkv.model.config import ModelConfig
from radixkv.model.forward_batch import ForwardBatch
from radixkv.model.prepack import pack_weight, prepack_linears
from radixkv.model.rotary import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    """Fused QKV projection, rope, attention through the backend, output projection."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        backend: AttentionBackend,
        fused: bool = False,
    ) -> torch.Tensor:
        """`cos`, `sin`: the batch's `[tokens, 1, d]` angles, or with `fused` the whole tables
        (read by `batch.positions` in the kernel)."""
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k share positions: rotate both heads blocks in one go.
        if fused:
            heads = self.num_heads + self.num_kv_heads
            cpu_fused.rope(qkv, heads, self.head_dim, batch.positions, cos, sin)
            qk = qkv[:, : self.q_size + self.kv_size].view(n, -1, self.head_dim)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(n, -1, self.head_dim)
            qk = apply_rotary(qk, cos, sin)
        if backend.key_rotation is not None:  # the basis the pool stores keys in (fp8)
            rotation = backend.key_rotation
            qk = (qk.to(rotation.dtype) @ rotation).to(qk.dtype)
        q = qk[:, : self.num_heads]
        k = qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, self.layer, batch)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with one fused gate/up matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block and pre-norm MLP block, each with a residual connection."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, backend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """The same layer over the fused kernels: `x` (the residual stream) is first advanced
        by the previous layer's `delta` and then by this layer's attention, in place; returns
        this layer's MLP output, the next `delta`. `cos`, `sin`: the rotary tables."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = cpu_fused.add_rmsnorm(x, delta, norm1.weight, norm1.eps)
        attn = self.self_attn(h, cos, sin, batch, backend, fused=True)
        h = cpu_fused.add_rmsnorm(x, attn, norm2.weight, norm2.eps)
        return self.mlp(h)


class LlamaForCausalLM(nn.Module):
    """The decoder stack and LM head; `forward` returns float32 logits of each request's last
    token only."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        self.packed_head: nn.Module | None = None  # set by prepack()
        self.fused_ops = False  # one-pass C kernels for the small ops (the runner sets it)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(
        self, batch: ForwardBatch, backend: AttentionBackend, hidden: bool = False
    ) -> torch.Tensor:
        """float32 logits of each request's last token; with `hidden`, the final (normed)
        hidden states of `batch.output_rows` instead (`logits` turns rows of them into logits)."""
        if self.rotary is None:
            raise RuntimeError("weights are not loaded: call load_hf_state_dict first")
        self.rotary.check(batch.max_seq_len)
        if self.fused_ops:
            x = self._forward_fused(batch, backend, hidden)
        else:
            cos, sin = self.rotary.lookup(batch.positions)
            x = self.embed_tokens(batch.input_ids)
            for layer in self.layers:
                x = layer(x, cos, sin, batch, backend)
            x = self.norm(x[self._output_rows(batch, hidden)])
        return x if hidden else self.logits(x)

    def _forward_fused(
        self, batch: ForwardBatch, backend: AttentionBackend, hidden: bool
    ) -> torch.Tensor:
        assert self.rotary is not None
        cos, sin = self.rotary.cos, self.rotary.sin
        x = self.embed_tokens(batch.input_ids)
        delta = None
        for layer in self.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            delta = layer.forward_fused(x, delta, cos, sin, batch, backend)
        rows = self._output_rows(batch, hidden)
        x, delta = x[rows], None if delta is None else delta[rows]
        return cpu_fused.add_rmsnorm(x, delta, self.norm.weight, self.norm.eps)

    @staticmethod
    def _output_rows(batch: ForwardBatch, hidden: bool) -> slice | torch.Tensor:
        """The rows whose final hidden states are wanted: `output_rows` (with `hidden`), each
        request's last token, or all rows of a decode batch."""
        if hidden and batch.output_rows is not None:
            return batch.output_rows
        if batch.num_tokens != batch.batch_size:
            return batch.last_token_index
        return slice(None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of final hidden states `[n, hidden]`."""
        if self.packed_head is not None:
            return self.packed_head(x).float()
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def _apply(self, fn: Any, recurse: bool = True) -> LlamaForCausalLM:
        """`.to(device or dtype)` and friends move the rotary tables too (they are not
        parameters): rebuilt for the weights' new device and dtype, as a load makes them."""
        super()._apply(fn, recurse)
        if self.rotary is not None:
            self.rotary = RotaryEmbedding(self.config, self.dtype, self.device)
        return self

    def prepack(self) -> bool:
        """On the CPU, hold every projection and the LM head in oneDNN's packed layout
        (`prepack.py`); False where that is unavailable (the model then runs as it was)."""
        if self.packed_head is not None:
            return True
        if self.lm_head is not None:
            self.packed_head = pack_weight(self.lm_head.weight)
        else:
            self.packed_head = pack_weight(self.embed_tokens.weight)
        if self.packed_head is None:
            return False
        prepack_linears(self.layers)
        return True

    def load_hf_state_dict(
        self,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """Load weights named as in HF's `LlamaForCausalLM`, fusing q/k/v and gate/up."""
        own = fuse_hf_state_dict(tensors, self.config)
        own = {k: v.to(device=device, dtype=dtype) for k, v in own.items()}
        missing, unexpected = self.load_state_dict(own, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith("lm_head")]  # tied head
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the config: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )
        if self.lm_head is not None and "lm_head.weight" not in own:
            raise ValueError("config says the LM head is not tied, but lm_head.weight is missing")
        self.rotary = RotaryEmbedding(self.config, dtype, device)


def fuse_hf_state_dict(
    tensors: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Rename HF parameters to ours and concatenate q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("model."):
            name = name[len("model.") :]
        if ".self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            continue
        if ".mlp." in name and name.rsplit(".", 2)[-2] in ("gate_proj", "up_proj"):
            continue
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[name] = t
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        for suffix in ("weight", "bias") if config.attention_bias else ("weight",):
            parts = [tensors[f"{p}.self_attn.{n}_proj.{suffix}"] for n in "qkv"]
            out[f"layers.{i}.self_attn.qkv_proj.{suffix}"] = torch.cat(parts, 0)
        gate_up = [tensors[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up")]
        out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(gate_up, 0)
    return out
