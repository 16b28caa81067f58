"""Extends over a cached prefix of one length: two mask-free SDPA calls merged by log-sum-exp
(`torch_plan.PREFIX_SPLIT`) against the padded-mask path."""

from __future__ import annotations

import pytest
import torch

from radixkv.model import torch_plan
from radixkv.model.model_runner import ModelRunner
from radixkv.protocol import SamplingParams


def run(split: bool, dtype: torch.dtype, kv_dtype: str | None, monkeypatch) -> list[torch.Tensor]:
    from test_model_tiny import ours_from, prompts, tiny_hf  # tests/ is on sys.path

    from radixkv.testing import PoolDriver

    monkeypatch.setattr(torch_plan, "PREFIX_SPLIT", split)
    model = ours_from(tiny_hf(heads=8, kv_heads=2), dtype=dtype)
    runner = ModelRunner.with_pools(model, num_slots=2048, max_running_requests=8,
                                    kv_dtype=kv_dtype)  # fmt: skip
    driver = PoolDriver(runner)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    system = prompts([70], seed=3)[0]
    base = driver.add(system, params)
    driver.step([base], decode=False)
    # three questions of 9 tokens after the same 70-token cached prefix, in one extend batch
    questions = prompts([9, 9, 9], seed=5)
    reqs = [driver.add(system + q, params, base, prefix_len=70) for q in questions]
    seen: list[torch.Tensor] = []
    original = runner.backend.forward

    def spy(q, k, v, layer, batch):
        seen.append(runner.backend._md.prefix_split)  # type: ignore[attr-defined]
        return original(q, k, v, layer, batch)

    runner.backend.forward = spy  # type: ignore[method-assign]
    logits = [driver.step(reqs, decode=False)]
    assert all(s == split for s in seen)
    while running := [r for r in reqs if not r.finished]:
        logits.append(driver.step(running, decode=True))
    return logits


@pytest.mark.parametrize(
    ("dtype", "kv_dtype", "tol"),
    [(torch.float32, None, 1e-4), (torch.bfloat16, None, 5e-2), (torch.float32, "int8", 1e-4)],
)
def test_prefix_split_equals_the_masked_path(dtype, kv_dtype, tol, monkeypatch):
    split = run(True, dtype, kv_dtype, monkeypatch)
    masked = run(False, dtype, kv_dtype, monkeypatch)
    for ours, ref in zip(split, masked, strict=True):
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
