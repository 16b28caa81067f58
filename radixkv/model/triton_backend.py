"""Triton attention over the KV pool: a KV-store kernel, split-K decode and extend kernels.

K/V are never gathered into contiguous copies: the kernels read the pool through each request's
`ReqToTokenPool` row (`kv_indices = req_to_token`, `kv_start = req_rows * row stride`). Per batch
(`init_forward`) we compute those offsets, the packed start of each request's new tokens and, for
decode, the split count and the fp32 scratch every layer reuses. Per layer, `forward` launches the
store kernel, then the extend kernel or the two decode kernels (split, merge).

On CUDA this is the fast path. On the CPU it runs only under `TRITON_INTERPRET=1` (slowly, for
tests). Nothing imports this module unless the triton backend is chosen, so `radixkv.model` works
without `triton` installed; importing it without `triton` raises an error that says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model.attention import AttentionBackend
from radixkv.model.forward_batch import ForwardBatch, ForwardMode

try:
    from radixkv.kernels.decode_attention import choose_num_kv_splits, decode_attention
    from radixkv.kernels.extend_attention import extend_attention
    from radixkv.kernels.kv_store import store_kv
except ImportError as exc:  # pragma: no cover - only without triton
    raise ImportError(
        f"the triton attention backend needs the `triton` package ({exc}); install it with "
        "`pip install 'radixkv[triton]'` or choose --attention-backend torch"
    ) from exc


@dataclass(slots=True)
class _Metadata:
    kv_start: torch.Tensor  # int64 [bs]: flat offset of each request's row in req_to_token
    extend_start: torch.Tensor | None  # int64 [bs]: first packed token of each request (extend)
    mid_o: torch.Tensor | None  # decode scratch, fp32 [bs, heads, splits, head_dim]
    mid_lse: torch.Tensor | None  # decode scratch, fp32 [bs, heads, splits]


class TritonAttentionBackend(AttentionBackend):
    """Attention with the Triton kernels of `radixkv.kernels` (the CUDA default)."""

    graph_safe = True  # decode: offsets, scratch and kernels; splits from `max_seq_len` only

    def __init__(
        self,
        token_pool: TokenToKVPool,
        req_pool: ReqToTokenPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        num_kv_splits: int | None = None,
    ) -> None:
        """`num_kv_splits` fixes the decode split count; by default it is chosen per batch from
        the batch size, KV heads, longest sequence and the GPU's SM count."""
        device = token_pool.device
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"the triton attention backend needs a CUDA device, but the KV pool is on "
                f"{device}; use --attention-backend torch (TRITON_INTERPRET=1 runs the kernels on "
                "the CPU for tests, very slowly)"
            )
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of kv heads {num_kv_heads}")
        self.token_pool = token_pool
        self.req_pool = req_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.scale = head_dim**-0.5
        self.fixed_kv_splits = num_kv_splits
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 132  # interpreter: pretend to be an H100 so the split heuristic is exercised
        )
        self._md: _Metadata | None = None

    # ---- per batch --------------------------------------------------------------------------

    def init_forward(self, batch: ForwardBatch) -> None:
        table = self.req_pool.req_to_token
        kv_start = batch.req_rows * table.stride(0)
        if batch.mode is ForwardMode.EXTEND:
            extend_start = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
            self._md = _Metadata(kv_start, extend_start, None, None)
            return
        splits = self.fixed_kv_splits or choose_num_kv_splits(
            batch.batch_size, self.num_kv_heads, batch.max_seq_len, self.num_sms
        )
        shape = (batch.batch_size, self.num_heads, splits)
        f32 = torch.float32
        mid_o = torch.empty((*shape, self.head_dim), dtype=f32, device=table.device)
        mid_lse = torch.empty(shape, dtype=f32, device=table.device)
        self._md = _Metadata(kv_start, None, mid_o, mid_lse)

    # ---- per layer --------------------------------------------------------------------------

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        md = self._md
        if md is None:
            raise RuntimeError("TritonAttentionBackend.forward called before init_forward")
        k_buf, v_buf = self.token_pool.get_kv_buffer(layer)
        scales = self.token_pool.get_kv_scales(layer) if self.token_pool.layout.quantized else None
        store_kv(k_buf, v_buf, batch.out_cache_loc, k, v, scales)
        table = self.req_pool.req_to_token
        if batch.mode is ForwardMode.DECODE:
            assert md.mid_o is not None and md.mid_lse is not None
            out = decode_attention(
                q, k_buf, v_buf, table, md.kv_start, batch.seq_lens,
                scale=self.scale, num_kv_splits=md.mid_o.shape[2], mid_o=md.mid_o,
                mid_lse=md.mid_lse, scales=scales,
            )  # fmt: skip
        else:
            assert md.extend_start is not None
            out = extend_attention(
                q, k, v, k_buf, v_buf, table, md.kv_start, batch.prefix_lens, md.extend_start,
                batch.extend_lens, batch.max_extend_len, scale=self.scale, scales=scales,
            )  # fmt: skip
        return out.view(q.shape[0], self.num_heads * self.head_dim)
