"""Shared-prefix (cascade) decode attention for the torch backend.

Requests that hit the same cached prefix hold the very same KV slots for it in their rows. Plain
decode attention gathers and reads that prefix once per request; here it is read once per group:

    prefix part   queries of all G members  x  the group's shared prefix K/V    (one matmul/group)
    suffix part   each request's query      x  its own tokens after the prefix  (padded batch)
    merge         out = (out_p * w_p + out_s * w_s) / (w_p + w_s),  w_x = exp(lse_x - max lse)

Both parts are exact softmax attention over disjoint key sets, so the merge by log-sum-exp gives the
same result as attending to everything at once (up to float rounding).

`extend_over_prefix` does the same for an extend batch whose requests add one number of tokens to
cached prefixes of one length (questions after a shared system prompt): the prefix part needs no
mask (every query sees every prefix key) and the new-token part is plain causal, so both run as
mask-free flash SDPA instead of one call over a padded `[bs, extend, seq]` additive mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MIN_SHARED = 32  # a shorter common prefix is not worth a group
MIN_SAVED = 2048  # cascade only when it avoids reading at least this many token K/Vs per layer


@dataclass(slots=True)
class CascadePlan:
    """Index tensors of one decode batch, shared by every layer."""

    prefix_index: torch.Tensor  # [G, Lmax] slots of each group's shared prefix (padding: 0)
    prefix_mask: torch.Tensor  # additive float [G, 1, 1, Lmax]
    members: torch.Tensor  # [G, Mmax] batch index of each member (padding: bs, a zero row)
    member_valid: torch.Tensor  # bool [G, Mmax]
    suffix_index: torch.Tensor  # [bs, Smax] each request's slots after its group's prefix
    suffix_mask: torch.Tensor  # additive float [bs, 1, 1, Smax]


def plan_shared_prefixes(
    kv_index: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype
) -> CascadePlan | None:
    """Group requests whose rows start with the same slots; None when that saves too little."""
    bs, width = kv_index.shape
    _, group_ids, counts = torch.unique(kv_index[:, 0], return_inverse=True, return_counts=True)
    groups: list[tuple[torch.Tensor, int]] = []
    saved = 0
    for g in torch.nonzero(counts >= 2).flatten().tolist():
        members = torch.nonzero(group_ids == g).flatten()
        rows = kv_index[members]
        limit = int(seq_lens[members].min()) - 1  # the newest token is always a request's own
        same = (rows[:, :limit] == rows[:1, :limit]).all(0)
        shared = int(same.to(torch.int64).cumprod(0).sum())
        if shared >= MIN_SHARED:
            groups.append((members, shared))
            saved += (len(members) - 1) * shared
    if saved < MIN_SAVED:
        return None
    num, lmax = len(groups), max(s for _, s in groups)
    mmax = max(len(m) for m, _ in groups)
    device = kv_index.device
    prefix_index = torch.zeros((num, lmax), dtype=torch.int64, device=device)
    members_t = torch.full((num, mmax), bs, dtype=torch.int64, device=device)
    prefix_len = torch.zeros(num, dtype=torch.int64, device=device)
    start = torch.zeros(bs, dtype=torch.int64, device=device)
    for i, (members, shared) in enumerate(groups):
        prefix_index[i, :shared] = kv_index[members[0], :shared]
        members_t[i, : len(members)] = members
        prefix_len[i] = shared
        start[members] = shared
    suffix_len = seq_lens - start
    smax = int(suffix_len.max())
    cols = torch.arange(smax, device=device)
    src = (start[:, None] + cols).clamp(max=width - 1)
    suffix_valid = cols[None, :] < suffix_len[:, None]
    suffix_index = kv_index.gather(1, src).masked_fill_(~suffix_valid, 0)
    prefix_valid = torch.arange(lmax, device=device)[None, :] < prefix_len[:, None]
    return CascadePlan(
        prefix_index=prefix_index,
        prefix_mask=_additive(prefix_valid, dtype)[:, None, None, :],
        members=members_t,
        member_valid=members_t < bs,
        suffix_index=suffix_index,
        suffix_mask=_additive(suffix_valid, dtype)[:, None, None, :],
    )


def _additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~valid, float("-inf"))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., n, d], k/v [..., L, d] -> (output [..., n, d], log-sum-exp [..., n]) in float32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs.to(v.dtype), v).float(), lse


def cascade_decode(
    q: torch.Tensor,
    read_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    plan: CascadePlan,
    scale: float,
) -> torch.Tensor:
    """Decode attention for `q [bs, heads, head_dim]` over the pool; `read_kv(index)` returns
    the K and V of the slots in `index` as `[*index.shape, kv_heads, head_dim]` in q's dtype
    (`TokenToKVPool.read_kv`: decoded when the pool is quantized). Returns `[bs, heads *
    head_dim]` in q's dtype."""
    bs, heads, dim = q.shape
    ks, vs = read_kv(plan.suffix_index)
    ks, vs = ks.transpose(1, 2), vs.transpose(1, 2)  # [bs, kv, Smax, d]
    kv_heads = ks.shape[1]
    group = heads // kv_heads
    qg = q.view(bs, kv_heads, group, dim)
    out_s, lse_s = _attend(qg, ks, vs, plan.suffix_mask, scale)  # [bs, kv, group, d], [bs, kv, g]

    num, mmax = plan.members.shape
    q_pad = torch.cat([qg, qg.new_zeros((1, kv_heads, group, dim))])[plan.members]
    q_pad = q_pad.permute(0, 2, 1, 3, 4).reshape(num, kv_heads, mmax * group, dim)
    kp, vp = read_kv(plan.prefix_index)
    kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # [G, kv, Lmax, d]
    out_p, lse_p = _attend(q_pad, kp, vp, plan.prefix_mask, scale)  # [G, kv, M*g, d]
    out_p = out_p.view(num, kv_heads, mmax, group, dim).permute(0, 2, 1, 3, 4)
    lse_p = lse_p.view(num, kv_heads, mmax, group).permute(0, 2, 1, 3)

    # scatter the groups' results back to their requests; non-members keep lse = -inf
    prefix_out = out_s.new_zeros((bs + 1, kv_heads, group, dim))
    prefix_lse = lse_s.new_full((bs + 1, kv_heads, group), float("-inf"))
    prefix_out[plan.members] = out_p
    prefix_lse[plan.members] = lse_p
    prefix_out, prefix_lse = prefix_out[:bs], prefix_lse[:bs]

    m = torch.maximum(lse_s, prefix_lse)
    w_s = torch.exp(lse_s - m)[..., None]
    w_p = torch.exp(prefix_lse - m)[..., None]
    out = (out_s * w_s + prefix_out * w_p) / (w_s + w_p)
    return out.to(q.dtype).reshape(bs, heads * dim)


def extend_over_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    bs: int,
    scale: float,
) -> torch.Tensor:
    """`q [bs * ext, heads, d]` and its new `k`, `v` `[bs * ext, kv_heads, d]` (packed, request
    after request) over each request's cached prefix `k_prefix`, `v_prefix` `[bs, kv_heads,
    prefix, d]`; returns `[bs * ext, heads * d]` in q's dtype. CPU: SDPA's flash kernel, which
    returns the log-sum-exp."""
    ext, heads, dim = q.shape[0] // bs, q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qh = q.view(bs, ext, heads, dim).transpose(1, 2)  # [bs, heads, ext, d]
    # every query sees every prefix key: a KV head's query heads fold into the query axis
    out_p, lse_p = _flash(qh.reshape(bs, kv_heads, group * ext, dim), k_prefix, v_prefix, False,
                          scale)  # fmt: skip
    out_p, lse_p = out_p.reshape(bs, heads, ext, dim), lse_p.reshape(bs, heads, ext)
    kn = k.view(bs, ext, kv_heads, dim).transpose(1, 2).repeat_interleave(group, dim=1)
    vn = v.view(bs, ext, kv_heads, dim).transpose(1, 2).repeat_interleave(group, dim=1)
    out_n, lse_n = _flash(qh, kn, vn, True, scale)
    top = torch.maximum(lse_p, lse_n)
    w_p, w_n = torch.exp(lse_p - top)[..., None], torch.exp(lse_n - top)[..., None]
    out = (out_p.float() * w_p + out_n.float() * w_n) / (w_p + w_n)
    return out.to(q.dtype).transpose(1, 2).reshape(bs * ext, heads * dim)


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU flash kernel, which also returns the log-sum-exp `[bs, heads, q_len]`."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out, lse
