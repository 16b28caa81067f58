"""Rotary position embeddings (half-split layout), with linear and Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from radixkv.model.config import ModelConfig, RopeScaling


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """float32 `[head_dim // 2]` inverse frequencies, scaled as `scaling` says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, the band in between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin tables `[max_positions, head_dim]`, looked up once per forward."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self.head_dim = config.head_dim
        self.max_positions = config.max_position_embeddings
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        # An outer product with K=1 rounds exactly like HF's float32 matmul of the same factors.
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def check(self, max_seq_len: int) -> None:
        """Raise ValueError when a batch whose longest sequence is `max_seq_len` tokens would
        read past the tables. A host-side check (a `ForwardBatch`'s positions all lie below its
        `max_seq_len`): it never waits for the device, so a CUDA graph can hold the lookup."""
        if max_seq_len > self.max_positions:
            raise ValueError(
                f"position {max_seq_len - 1} is past max_position_embeddings "
                f"{self.max_positions} of this model; shorten the request"
            )

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape `[num_tokens, 1, head_dim]` (broadcast over heads); positions must
        lie in the tables (`check`)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[num_tokens, heads, head_dim]` by its positions' angles (HF `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
