"""Torch-native attention over the KV pool: one padded, masked SDPA call per layer.

Per batch (`init_forward`) we gather every request's row of slots once, padded to the longest
sequence, `kv_index [bs, max_seq_len]`, and build the mask. Per layer we gather K and V through
`kv_index` and run one `scaled_dot_product_attention` for the whole batch: no Python loop over
requests. Decode groups the query heads of each KV head (`[bs, kv_heads, group, head_dim]`) so GQA
needs no K/V expansion; extend pads queries to `[bs, max_extend_len]`. A single request without a
cached prefix attends to its own fresh K/V with `is_causal` (no gather, no mask). On the CPU,
decode batches read K/V straight from the pool with a C kernel (`cpu_attention.py`), and so do
extend batches of a bf16 model (bf16 or quantized pool, `cpu_extend.py`); without the kernel, a
decode batch whose requests share a long cached prefix reads that prefix once per group
(`cascade.py`).

Deterministic mode (`deterministic=True`) sends every attention, decode and extend alike, through
that C kernel, one query at a time over its own causal length: a token's attention is then
computed the same way whether it is decoded, prefilled in one piece or in chunks, recomputed after
a retraction, or batched with anything, so its result is the same to the bit (docs/model.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.model import cpu_attention, cpu_extend, cpu_store
from radixkv.model.attention import AttentionBackend
from radixkv.model.cascade import cascade_decode, extend_over_prefix
from radixkv.model.forward_batch import ForwardBatch, ForwardMode
from radixkv.model.torch_plan import AttentionPlan, RaggedReq, per_query_plan, plan_batch


class TorchNativeBackend(AttentionBackend):
    """Attention with `torch.nn.functional.scaled_dot_product_attention` (CPU default)."""

    def __init__(
        self,
        token_pool: TokenToKVPool,
        req_pool: ReqToTokenPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        deterministic: bool = False,
    ) -> None:
        self.token_pool = token_pool
        self.req_pool = req_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.dtype = dtype
        self.scale = head_dim**-0.5
        self._md = AttentionPlan(None, None, None, False)
        # Reused gather targets: a fresh multi-MB tensor per layer costs page faults that take
        # longer than the gather itself (measured ~4x on this CPU).
        self._k_ws = torch.empty(0, dtype=token_pool.layout.dtype, device=token_pool.device)
        self._v_ws = torch.empty_like(self._k_ws)
        # Decode reads K/V straight from the pool with the C kernel where it works (CPU, K/V in
        # the model's dtype, the kernel compiled); otherwise gather + SDPA.
        layout = token_pool.layout
        self._quantized = layout.quantized
        self._decode_kernel = (
            token_pool.device.type == "cpu"
            and (layout.dtype == dtype or layout.quantized)
            and cpu_attention.supports(dtype, num_heads, head_dim, layout.dtype)
            and cpu_attention.available()
        )
        # extend batches on the C extend kernel (public: benchmarks switch it per step)
        self.extend_kernel = token_pool.device.type == "cpu" and cpu_extend.usable(
            dtype, layout.dtype, num_heads, num_kv_heads, head_dim
        )
        self._ext_ws = torch.empty(0, dtype=torch.bfloat16)  # reused, as the gather workspace
        # new K/V stored by the C kernel (CPU; K/V in the pool's dtype, or a quantized pool);
        # public: benchmarks switch it per step
        self.c_store = cpu_store.usable(token_pool, dtype)
        self.deterministic = deterministic
        if deterministic and not self._decode_kernel:
            raise RuntimeError(
                "deterministic inference runs every attention through the CPU attention kernel, "
                "which is unavailable here (a CUDA device, an unquantized KV dtype other than "
                "the model's, no C compiler, or RADIXKV_CPU_KERNEL=0)"
            )

    # ---- per batch --------------------------------------------------------------------------

    def init_forward(self, batch: ForwardBatch) -> None:
        if self.c_store:  # the kernel writes where it is told: the slots checked once a batch
            cpu_store.check_slots(self.token_pool, batch.out_cache_loc)
        if self.deterministic:
            self._md = per_query_plan(batch, self.req_pool)
        else:
            self._md = plan_batch(
                batch, self.req_pool, self.dtype, self._decode_kernel, self.extend_kernel
            )
        if self._md.gathers:
            assert self._md.kv_index is not None
            self._reserve_workspace(self._md.kv_index.numel())
        if self._md.extend_kernel:  # K and V packed per request, in blocks of 32 keys
            keys = int(((batch.seq_lens + 31) // 32).sum()) * 32
            need = 2 * keys * self.num_kv_heads * self.head_dim
            if self._ext_ws.numel() < need:
                self._ext_ws = torch.empty(need, dtype=torch.bfloat16)

    def _ragged_forward(self, q: torch.Tensor, layer: int, reqs: list[RaggedReq]) -> torch.Tensor:
        out = q.new_empty((q.shape[0], self.num_heads * self.head_dim))
        for r in reqs:
            qr = q[r.start : r.end].transpose(0, 1)[None]  # [1, heads, ext, d]
            kr, vr = self.token_pool.read_kv(layer, r.kv_index, self.dtype)
            kr, vr = kr.transpose(0, 1)[None], vr.transpose(0, 1)[None]  # [1, kv, seq, d]
            o = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=r.mask, is_causal=r.mask is None, scale=self.scale,
                enable_gqa=True,
            )  # fmt: skip
            out[r.start : r.end] = o[0].transpose(0, 1).reshape(r.end - r.start, -1)
        return out

    def _reserve_workspace(self, num_slots: int) -> None:
        need = num_slots * self.num_kv_heads * self.head_dim
        if self._k_ws.numel() < need:
            self._k_ws = torch.empty(need, dtype=self._k_ws.dtype, device=self._k_ws.device)
            self._v_ws = torch.empty_like(self._k_ws)

    # ---- per layer --------------------------------------------------------------------------

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        if self.c_store and cpu_store.heads_adjacent(k) and cpu_store.heads_adjacent(v):
            cpu_store.store_kv(self.token_pool, layer, batch.out_cache_loc, k, v)
        else:
            self.token_pool.set_kv(layer, batch.out_cache_loc, k, v)
        md = self._md
        if md.extend_kernel:
            assert md.kv_index is not None
            k_buf, v_buf = self.token_pool.get_kv_buffer(layer)
            scales = self.token_pool.get_kv_scales(layer) if self._quantized else None
            out = cpu_extend.extend_attention(
                q, k_buf, v_buf, md.kv_index, batch.prefix_lens, batch.extend_lens, self.scale,
                workspace=self._ext_ws, scales=scales,
            )  # fmt: skip
            return out.view(q.shape[0], -1)
        if md.self_causal:  # bs requests of `ext` fresh tokens each
            if self._quantized:  # attend to the K/V as stored, as every other path does: a
                # prompt then sees the same codes computed at once, in chunks or from cache
                k, v = self.token_pool.read_kv(layer, batch.out_cache_loc, q.dtype)
            bs = batch.batch_size
            ext = q.shape[0] // bs
            out = F.scaled_dot_product_attention(
                q.view(bs, ext, *q.shape[1:]).transpose(1, 2),
                k.view(bs, ext, *k.shape[1:]).transpose(1, 2),
                v.view(bs, ext, *v.shape[1:]).transpose(1, 2),
                is_causal=True,
                scale=self.scale,
                enable_gqa=True,
            )
            return out.transpose(1, 2).reshape(q.shape[0], -1)
        if md.ragged is not None:
            return self._ragged_forward(q, layer, md.ragged)
        if md.prefix_split:
            if self._quantized:  # the new tokens as stored, as every other path reads them
                k, v = self.token_pool.read_kv(layer, batch.out_cache_loc, q.dtype)
            k_pre, v_pre = self._gather(layer, md)  # [bs, kv_heads, prefix, d]
            return extend_over_prefix(q, k, v, k_pre, v_pre, batch.batch_size, self.scale)
        if md.cascade is not None:
            pool = self.token_pool
            return cascade_decode(
                q, lambda index: pool.read_kv(layer, index, q.dtype), md.cascade, self.scale
            )
        if md.seq_lens is not None:
            assert md.kv_index is not None
            k_buf, v_buf = self.token_pool.get_kv_buffer(layer)
            scales = self.token_pool.get_kv_scales(layer) if self._quantized else None
            out = cpu_attention.decode_attention(
                q, k_buf, v_buf, md.kv_index, md.seq_lens, self.scale, rows=md.rows, scales=scales
            )
            return out.view(q.shape[0], -1)
        k_all, v_all = self._gather(layer, md)
        if batch.mode is ForwardMode.DECODE:
            bs = q.shape[0]
            qg = q.view(bs, self.num_kv_heads, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(
                qg, k_all, v_all, attn_mask=md.mask, scale=self.scale
            )
            return out.reshape(bs, -1)
        return self._extend(q, k_all, v_all, md, batch)

    def _gather(self, layer: int, md: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        assert md.kv_index is not None
        bs, seq = md.kv_index.shape
        if self._quantized:  # decoded into fresh tensors
            k_q, v_q = self.token_pool.read_kv(layer, md.kv_index, self.dtype)
            return k_q.transpose(1, 2), v_q.transpose(1, 2)  # [bs, kv_heads, S, head_dim]
        flat = md.kv_index.view(-1)
        shape = (bs * seq, self.num_kv_heads, self.head_dim)
        k_buf, v_buf = self.token_pool.get_kv_buffer(layer)
        k_out = self._k_ws[: flat.numel() * shape[1] * shape[2]].view(shape)
        v_out = self._v_ws[: k_out.numel()].view(shape)
        torch.index_select(k_buf, 0, flat, out=k_out)
        torch.index_select(v_buf, 0, flat, out=v_out)
        k_all = k_out.view(bs, seq, *shape[1:]).transpose(1, 2)  # [bs, kv_heads, S, head_dim]
        v_all = v_out.view(bs, seq, *shape[1:]).transpose(1, 2)
        if k_all.dtype != self.dtype:
            k_all, v_all = k_all.to(self.dtype), v_all.to(self.dtype)
        return k_all, v_all

    def _extend(
        self,
        q: torch.Tensor,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        md: AttentionPlan,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        bs, max_ext = batch.batch_size, batch.max_extend_len
        if md.pad_index is None:
            q_pad = q
        else:
            q_pad = q.new_zeros((bs * max_ext, self.num_heads, self.head_dim))
            q_pad[md.pad_index] = q
        q_pad = q_pad.view(bs, max_ext, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q_pad, k_all, v_all, attn_mask=md.mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(bs * max_ext, self.num_heads * self.head_dim)
        return out if md.pad_index is None else out[md.pad_index]
