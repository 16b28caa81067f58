"""How the torch backend attends a batch: planned once per batch, used by every layer.

`plan_batch` looks at a `ForwardBatch` and picks one of the backend's paths, with the index
tensors that path needs (docs/model.md, "Attention backend"):

- `self_causal`: prompts of one length with nothing cached attend to their own fresh K/V with one
  `is_causal` SDPA call (no gather, no mask);
- `prefix_split`: requests adding one number of tokens to cached prefixes of one length attend to
  the prefix and to their new tokens in two mask-free calls (`cascade.extend_over_prefix`);
- `cascade`: a decode batch whose requests share a long cached prefix reads it once per group
  (where the C decode kernel is unavailable: the kernel is faster, `CASCADE_OVER_KERNEL`);
- `seq_lens`: decode on the CPU reads K/V straight from the pool with the C kernel (and, in
  deterministic mode, every query, decode or extend, one at a time: `per_query_plan`);
- `ragged`: an extend batch too uneven to pad attends request by request;
- `extend_kernel`: on the CPU, for a bf16 model (bf16 or quantized pool), every extend batch
  goes to the C extend kernel (`cpu_extend.py`), which reads each request's row of slots
  itself: the paths above are then for decode, other dtypes and devices;
- otherwise one padded SDPA call over `kv_index`, with an additive mask where needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.model.cascade import CascadePlan, plan_shared_prefixes
from radixkv.model.forward_batch import ForwardBatch, ForwardMode

RAGGED_WASTE = 1.5  # pad an extend batch only while padded queries <= 1.5x the real ones
# Prompts of one length with nothing cached attend to their fresh K/V with one `is_causal` SDPA
# call (no gather, no mask), faster than the additive mask (docs/model.md: `bench/profile_step.py`
# with and without it). RADIXKV_BATCHED_CAUSAL=0 turns it off (A/B runs).
BATCHED_CAUSAL = os.environ.get("RADIXKV_BATCHED_CAUSAL", "1") != "0"
# Requests that extend a cached prefix of one length by one length (questions after a shared
# system prompt) attend in two mask-free SDPA calls, the prefix (every query sees every key) and
# their own new tokens (causal), merged by log-sum-exp, instead of one call over the padded
# [bs, extend, seq] mask. RADIXKV_PREFIX_SPLIT=0 turns it off (A/B runs).
PREFIX_SPLIT = os.environ.get("RADIXKV_PREFIX_SPLIT", "1") != "0"
# A decode batch whose requests share cached prefixes: with the C decode kernel available, the
# kernel reads every request's whole row, the shared part from the cache once a group's first
# request has pulled it in, and beats the cascade's torch calls (`bench/cpu_switches.py --switch
# cascade`); the cascade remains for decode without the kernel. Switchable for A/B runs
# (RADIXKV_CASCADE_OVER_KERNEL=1, or this attribute).
CASCADE_OVER_KERNEL = os.environ.get("RADIXKV_CASCADE_OVER_KERNEL", "0") == "1"


@dataclass(slots=True)
class AttentionPlan:
    kv_index: torch.Tensor | None  # int64 [bs, max_seq_len]; padding points at slot 0
    mask: torch.Tensor | None  # additive float [bs, 1, q_len, max_seq_len]; None = attend all
    pad_index: torch.Tensor | None  # extend: packed token -> row of [bs * max_extend_len]
    self_causal: bool  # nothing cached, one length: attend to the fresh K/V causally
    cascade: CascadePlan | None = None  # decode: groups sharing a cached prefix read it once
    ragged: list[RaggedReq] | None = None  # extend with very uneven lengths: one call per request
    seq_lens: torch.Tensor | None = None  # the CPU kernel: per query, its keys (`kv_index` rows)
    rows: torch.Tensor | None = None  # the CPU kernel over extend queries: each one's kv_index row
    prefix_split: bool = False  # extend of one length over cached prefixes of one length
    extend_kernel: bool = False  # extend on the CPU kernel, reading `kv_index` rows

    @property
    def gathers(self) -> bool:
        """Whether every layer gathers `kv_index`'s K/V into the backend's workspace."""
        return self.prefix_split or (
            self.kv_index is not None and self.seq_lens is None and not self.extend_kernel
        )


@dataclass(slots=True)
class RaggedReq:
    start: int  # first packed token of the request
    end: int
    kv_index: torch.Tensor  # [seq_len] its slots
    mask: torch.Tensor | None  # additive [extend, seq_len]; None: no prefix, plain causal


def plan_batch(
    batch: ForwardBatch,
    req_pool: ReqToTokenPool,
    dtype: torch.dtype,
    decode_kernel: bool,
    extend_kernel: bool = False,
) -> AttentionPlan:
    """The path for `batch` and its index tensors; `decode_kernel`: the C kernel can read the
    pool (CPU), so decode uses it and an extend over cached prefixes may split;
    `extend_kernel`: extend batches go to the C extend kernel."""
    if batch.mode is ForwardMode.EXTEND and extend_kernel:
        rows = req_pool.req_to_token[batch.req_rows, : batch.max_seq_len].to(torch.int64)
        return AttentionPlan(rows, None, None, False, extend_kernel=True)
    if (
        batch.mode is ForwardMode.EXTEND
        and batch.max_seq_len == batch.max_extend_len  # nothing cached (no prefix)
        and (batch.batch_size == 1 or (BATCHED_CAUSAL and _equal(batch.extend_lens_list)))
    ):
        return AttentionPlan(None, None, None, True)  # the fresh K/V, causally
    if (
        PREFIX_SPLIT
        and batch.mode is ForwardMode.EXTEND
        and batch.max_seq_len > batch.max_extend_len  # a cached prefix
        and _equal(batch.extend_lens_list)
        and int(batch.seq_lens.min()) == batch.max_seq_len  # so every prefix is as long
        and req_pool.req_to_token.device.type == "cpu"
    ):
        prefix = batch.max_seq_len - batch.max_extend_len
        rows = req_pool.req_to_token[batch.req_rows, :prefix].to(torch.int64)
        return AttentionPlan(rows, None, None, False, prefix_split=True)
    seq_lens = batch.seq_lens
    cols = torch.arange(batch.max_seq_len, device=seq_lens.device)
    valid = cols[None, :] < seq_lens[:, None]  # [bs, S]
    rows = req_pool.req_to_token[batch.req_rows, : batch.max_seq_len].to(torch.int64)
    kv_index = rows.masked_fill_(~valid, 0)
    if (
        batch.mode is ForwardMode.DECODE
        and batch.batch_size > 1
        and (CASCADE_OVER_KERNEL or not decode_kernel)
    ):
        cascade = plan_shared_prefixes(kv_index, seq_lens, dtype)
        if cascade is not None:
            return AttentionPlan(None, None, None, False, cascade)
    if batch.mode is ForwardMode.DECODE and decode_kernel:
        return AttentionPlan(kv_index, None, None, False, seq_lens=seq_lens)
    if batch.mode is ForwardMode.DECODE:
        mask = None if bool(valid.all()) else additive_mask(valid[:, None, None, :], dtype)
        return AttentionPlan(kv_index, mask, None, False)
    bs, max_ext = batch.batch_size, batch.max_extend_len
    if bs * max_ext > RAGGED_WASTE * batch.num_tokens:
        return ragged_plan(batch, kv_index, dtype)
    # Query i of request b sits at position prefix_b + i and sees keys j <= that position.
    q_pos = batch.prefix_lens[:, None] + torch.arange(max_ext, device=seq_lens.device)
    allowed = (cols[None, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [bs, E, S]
    allowed[:, :, 0] |= ~allowed.any(-1)  # padded queries look at key 0: no NaN rows
    token_req = torch.repeat_interleave(
        torch.arange(bs, device=seq_lens.device),
        batch.extend_lens,
        output_size=batch.num_tokens,
    )
    starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
    local = torch.arange(batch.num_tokens, device=seq_lens.device) - starts[token_req]
    # None when every request extends by the same length: nothing to pad.
    pad_index = None if max_ext * bs == batch.num_tokens else token_req * max_ext + local
    return AttentionPlan(kv_index, additive_mask(allowed[:, None], dtype), pad_index, False)


def per_query_plan(batch: ForwardBatch, req_pool: ReqToTokenPool) -> AttentionPlan:
    """Deterministic mode: every query token reads its request's row up to its position."""
    seq_lens = batch.seq_lens
    rows = req_pool.req_to_token[batch.req_rows, : batch.max_seq_len].to(torch.int64)
    if batch.mode is ForwardMode.DECODE:
        return AttentionPlan(rows, None, None, False, seq_lens=seq_lens)
    token_req = torch.repeat_interleave(
        torch.arange(batch.batch_size), batch.extend_lens, output_size=batch.num_tokens
    )
    starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
    local = torch.arange(batch.num_tokens) - starts[token_req]
    lens = batch.prefix_lens[token_req] + local + 1
    return AttentionPlan(rows, None, None, False, seq_lens=lens, rows=token_req)


def ragged_plan(batch: ForwardBatch, kv_index: torch.Tensor, dtype: torch.dtype) -> AttentionPlan:
    """Padding every request to the longest extend would multiply the attention work (one
    1088-token prefill beside nine 64-token ones pads 10x): attend request by request."""
    reqs, start = [], 0
    for b, ext in enumerate(batch.extend_lens_list):
        prefix = int(batch.prefix_lens[b])
        seq = prefix + ext
        mask = None
        if prefix:
            device = kv_index.device
            q_pos = prefix + torch.arange(ext, device=device)[:, None]
            mask = additive_mask(torch.arange(seq, device=device)[None, :] <= q_pos, dtype)
        reqs.append(RaggedReq(start, start + ext, kv_index[b, :seq], mask))
        start += ext
    return AttentionPlan(None, None, None, False, ragged=reqs)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, -inf elsewhere: additive float masks run SDPA's fast CPU kernel;
    boolean ones fall back to a slower one."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))


def _equal(values: list[int]) -> bool:
    return all(v == values[0] for v in values)
