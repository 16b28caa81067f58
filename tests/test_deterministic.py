"""Deterministic mode (`--deterministic`) with the real SmolLM2 weights in the default dtype
(`auto`: bf16 on CPUs with AMX or AVX512-BF16, where outputs used to depend on the batch):

- a stress test in the style of SGLang's radix-attention test: a random tree of prompts (a few
  hundred nodes), 64 requests along its paths sent at once into a KV cache far smaller than their
  tokens, so that prefixes are shared, evicted, chunked and retracted; every request completes
  with the tokens it gets when it runs alone, and the idle invariant check passes afterwards;
- the CPU attention kernel's per-query extend equals its decode bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch

from radixkv.config import ServerArgs
from radixkv.model import cpu_attention
from radixkv.model.loader import load_model
from radixkv.protocol import SamplingParams
from radixkv.scheduler.process import build_scheduler
from radixkv.scheduler.scheduler import Scheduler

pytestmark = pytest.mark.slow

NEW = 16


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2-135m", dtype="auto")


def prompt_tree(seed: int = 0, nodes: int = 300) -> list[list[int]]:
    """Each node extends a random earlier node by 4-40 tokens; a prompt is a node's path."""
    rng = random.Random(seed)
    paths: list[list[int]] = [[]]
    for _ in range(nodes):
        parent = paths[rng.randrange(len(paths))] if rng.random() < 0.8 else []
        if len(parent) > 400:
            parent = []
        paths.append(parent + [rng.randrange(100, 30000) for _ in range(rng.randint(4, 40))])
    return [p for p in paths[1:] if p]


def run(s: Scheduler, prompts: list[list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    for i, ids in enumerate(prompts):
        s.add_request(f"r{i}", ids, params)
    out: dict[str, list[int]] = {}
    finished = set()
    while s.has_work():
        for o in s.step():
            out.setdefault(o.rid, []).extend(o.token_ids)
            if o.finish_reason:
                finished.add(o.rid)
    s.step()  # idle: the scheduler's invariant check runs
    s.check_idle()
    assert finished == {f"r{i}" for i in range(len(prompts))}
    return out


def test_outputs_do_not_depend_on_batching_caching_or_pressure(model):
    tree = prompt_tree()
    rng = random.Random(1)
    prompts = [rng.choice(tree) for _ in range(64)]  # repeats and shared paths: radix hits
    args = {"deterministic": True, "dtype": "auto"}
    alone = build_scheduler(
        ServerArgs(max_running_requests=1, disable_radix_cache=True, max_total_tokens=4096, **args),
        model,
    )
    reference = run(alone, prompts)
    pressed = build_scheduler(
        ServerArgs(
            max_total_tokens=1200,
            chunked_prefill_size=64,
            max_prefill_tokens=256,
            new_token_ratio=0.02,
            min_new_token_ratio=0.0,
            **args,
        ),
        model,
    )
    results = run(pressed, prompts)
    stats = pressed.get_stats()
    assert stats.retractions > 0 and stats.evicted_tokens > 0 and stats.cached_tokens > 0
    mismatched = [rid for rid in reference if results[rid] != reference[rid]]
    assert not mismatched, f"{len(mismatched)} of {len(reference)} requests changed"


def test_per_query_extend_equals_decode():
    if not cpu_attention.available():
        pytest.skip("no C compiler for the CPU attention kernel")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(300, 3, 64, generator=gen).to(dtype)
        v = torch.randn(300, 3, 64, generator=gen).to(dtype)
        slots = torch.randperm(300, generator=gen)[:100].to(torch.int64)[None]
        q = torch.randn(100, 9, 64, generator=gen).to(dtype)  # one request's 100 queries
        lens = torch.arange(1, 101, dtype=torch.int64)
        rows = torch.zeros(100, dtype=torch.int64)
        extend = cpu_attention.decode_attention(q, k, v, slots, lens, 0.125, rows=rows)
        for t in (0, 31, 32, 77, 99):  # each query decoded alone
            one = cpu_attention.decode_attention(q[t : t + 1], k, v, slots, lens[t : t + 1], 0.125)
            assert torch.equal(one[0], extend[t])
