"""The attention backend interface: store new K/V in the pool, attend through request rows."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radixkv.model.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """Computes attention of a `ForwardBatch` over the paged KV pool.

    `init_forward` runs once per batch (per model step) and prepares whatever index metadata every
    layer shares; `forward` runs once per layer: it writes the batch's new K/V into
    `batch.out_cache_loc` of that layer, then attends each request's queries to its prefix (read
    through its `req_to_token` row) and, causally, to its new tokens.

    `key_rotation`, where the pool stores keys rotated (fp8 pools, `kv_quant.key_rotation`), is
    the matrix the model maps queries and keys through before `forward`, set by the model runner:
    scores are unchanged and every attention path reads keys as the pool stores them.
    """

    key_rotation: torch.Tensor | None = None
    # whether a decode step's `init_forward` and `forward` are all device work, with no host
    # sync and no host data beyond shapes, so a CUDA graph can replay them (`decode_graphs.py`)
    graph_safe: bool = False

    @abstractmethod
    def init_forward(self, batch: ForwardBatch) -> None:
        """Prepare per-batch metadata shared by all layers."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """`q` `[num_tokens, heads, head_dim]`, `k`/`v` `[num_tokens, kv_heads, head_dim]`
        -> attention output `[num_tokens, heads * head_dim]`."""
