"""Shared-prefix (cascade) decode attention equals plain attention over each request's row."""

from __future__ import annotations

import pytest
import torch

from radixkv.model import cascade
from radixkv.model.cascade import cascade_decode, plan_shared_prefixes


def reference(q, k_buf, v_buf, kv_index, seq_lens, scale):
    bs, heads, _dim = q.shape
    group = heads // k_buf.shape[1]
    out = []
    for b in range(bs):
        slots = kv_index[b, : seq_lens[b]]
        k = k_buf[slots].float().repeat_interleave(group, dim=1)  # [L, heads, d]
        v = v_buf[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v).reshape(-1))
    return torch.stack(out)


def make_rows(seq_lens, groups, shared):
    """Rows of slots: requests in the same group share their first `shared[g]` slots."""
    width = max(seq_lens)
    kv_index = torch.zeros((len(seq_lens), width), dtype=torch.int64)
    next_slot = 1
    prefixes = {}
    for b, (n, g) in enumerate(zip(seq_lens, groups, strict=True)):
        if g is not None and g not in prefixes:
            prefixes[g] = torch.arange(next_slot, next_slot + shared[g])
            next_slot += shared[g]
        start = 0
        if g is not None:
            kv_index[b, : shared[g]] = prefixes[g]
            start = shared[g]
        kv_index[b, start:n] = torch.arange(next_slot, next_slot + n - start)
        next_slot += n - start
    return kv_index, next_slot


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_cascade_equals_plain_attention(dtype, tol, kv_heads, monkeypatch):
    monkeypatch.setattr(cascade, "MIN_SAVED", 1)
    torch.manual_seed(0)
    seq_lens = [70, 75, 66, 90, 40, 81, 72]
    groups = [0, 0, 1, 1, None, 0, 1]  # one request shares nothing
    kv_index, slots = make_rows(seq_lens, groups, {0: 64, 1: 48})
    heads, dim = 3 * kv_heads, 16
    k_buf = torch.randn(slots, kv_heads, dim).to(dtype)
    v_buf = torch.randn(slots, kv_heads, dim).to(dtype)
    q = torch.randn(len(seq_lens), heads, dim).to(dtype)
    lens = torch.tensor(seq_lens)
    plan = plan_shared_prefixes(kv_index, lens, dtype)
    assert plan is not None and plan.prefix_index.shape[0] == 2
    got = cascade_decode(q, lambda i: (k_buf[i], v_buf[i]), plan, dim**-0.5).float()
    want = reference(q, k_buf, v_buf, kv_index, lens, dim**-0.5)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_no_plan_when_sharing_saves_little():
    kv_index, _ = make_rows([40, 41], [0, 0], {0: 36})
    assert plan_shared_prefixes(kv_index, torch.tensor([40, 41]), torch.float32) is None
    kv_index, _ = make_rows([40, 41], [None, None], {})
    assert plan_shared_prefixes(kv_index, torch.tensor([40, 41]), torch.float32) is None
