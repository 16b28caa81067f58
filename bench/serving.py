"""Serving throughput on one shared-prefix workload, side by side in one run.

    python bench/serving.py [--only radix,policy,page,transformers] [--groups 8 ...]
    (--only lpm: the radix-on row alone)

Rows: radixkv with the radix cache (lpm), without it, with fcfs and dfs-weight, with page size 16;
and a plain transformers loop on the same requests: `generate` per request, and static batches.
Every radixkv row starts its own runtime and sends all requests at once; transformers runs the
same token prompts for the same number of new tokens (EOS ignored), fp32 like radixkv here.
Ratios are of wall time for the whole workload, measured in this one run.

The compute limit: the workload's unavoidable FLOPs (every distinct prompt prefix computed once,
every output token decoded, at its context length, with the LM head of every sampled row:
`ModelConfig.flops_per_token`) over the matmul peak of the dtype measured in this run (a 2048^3
matmul). Each row's "of the limit" is that time over its wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import torch

from radixkv.client.aio import AsyncClient
from radixkv.launcher import Runtime
from radixkv.model.config import ModelConfig
from radixkv.model.loader import load_config, resolve_model
from radixkv.tools.bench import run_workload, summarize
from radixkv.tools.workloads import Conversation, GeneratedSharedPrefix

CONFIGS = {
    "radix": [("radix on (lpm)", {}), ("radix off", {"disable_radix_cache": True})],
    "policy": [
        ("fcfs", {"schedule_policy": "fcfs"}),
        ("dfs-weight", {"schedule_policy": "dfs-weight"}),
    ],
    "page": [("page size 16", {"page_size": 16})],
    "lpm": [("radix on (lpm)", {})],  # the first row alone, for A/B runs of a switch
}


def workload_flops(convs: list[Conversation], config: ModelConfig) -> float:
    """FLOPs no server can avoid: each distinct prompt position once (a trie of the prompts), each
    output token, the LM head for each sampled token."""
    head = 2 * config.hidden_size * config.vocab_size
    trie: dict[int, Any] = {}
    flops = 0.0
    for c in convs:
        prompt, new = c.prefix_ids + c.turns[0].user_ids, c.turns[0].max_new_tokens
        node = trie
        for depth, token in enumerate(prompt):
            if token not in node:
                node[token] = {}
                flops += config.flops_per_token(depth + 1)
            node = node[token]
        flops += sum(config.flops_per_token(len(prompt) + j + 1) for j in range(new - 1))
        flops += head * new
    return flops


def matmul_peak(dtype: str, n: int = 2048) -> float:
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a, b = torch.randn(n, n).to(torch_dtype), torch.randn(n, n).to(torch_dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def run_radixkv(
    convs: list[Conversation], dtype: str, kv_tokens: int, options: dict[str, Any]
) -> dict[str, Any]:
    with Runtime(
        "smollm2-135m", dtype=dtype, max_running_requests=64, max_total_tokens=kv_tokens, **options
    ) as rt:

        async def go() -> list:
            async with AsyncClient(rt.endpoint, timeout=None) as client:
                return await run_workload(client, convs)

        records = asyncio.run(go())
        return summarize(records, rt.ready_info.page_size)


def load_transformers(dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    from radixkv.model.loader import resolve_model

    location, kwargs = resolve_model("smollm2-135m").tokenizer_location()  # same args: the model
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs).eval()


def run_transformers(convs: list[Conversation], model: Any, batch: int) -> dict[str, Any]:
    """`generate` with a KV cache; `batch` prompts at a time (all prompts have equal length)."""
    prompts = [c.prefix_ids + c.turns[0].user_ids for c in convs]
    new = convs[0].turns[0].max_new_tokens
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
    elapsed = time.perf_counter() - start
    return {"duration_s": elapsed, "requests": len(prompts), "hit_rate": 0.0,
            "output_tokens_per_s": len(prompts) * new / elapsed}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="radix,policy,page,transformers")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--static-batch", type=int, default=8)
    args = ap.parse_args()
    wl = GeneratedSharedPrefix(args.groups, args.prompts_per_group, args.system_len,
                               args.question_len, args.output_len)  # fmt: skip
    convs = wl.conversations()
    # room for every request's whole sequence, so "radix off" is not also starved of memory
    kv_tokens = sum(len(c.prefix_ids) + len(c.turns[0].user_ids) + args.output_len for c in convs)
    flops = workload_flops(convs, load_config(resolve_model("smollm2-135m")))
    peak = matmul_peak(args.dtype)
    limit = flops / peak
    print(f"workload: {wl}; KV cache {kv_tokens} tokens")
    print(f"unavoidable work {flops / 1e12:.2f} TFLOP; {args.dtype} matmul peak measured now "
          f"{peak / 1e9:.0f} GFLOP/s: compute limit {limit:.1f} s\n")  # fmt: skip
    rows: list[tuple[str, dict[str, Any]]] = []
    for part in args.only.split(","):
        for name, options in CONFIGS.get(part, []):
            rows.append((name, run_radixkv(convs, args.dtype, kv_tokens, options)))
            print(f"  done: {name} in {rows[-1][1]['duration_s']:.1f} s", flush=True)
    if "transformers" in args.only:
        model = load_transformers(args.dtype)
        static = f"transformers, static batches of {args.static_batch}"
        for name, batch in (("transformers, per request", 1), (static, args.static_batch)):
            rows.append((name, run_transformers(convs, model, batch)))
            print(f"  done: {name} in {rows[-1][1]['duration_s']:.1f} s", flush=True)
    base = rows[0][1]["duration_s"]
    print(f"\n| configuration | wall time (s) | req/s | output tok/s | hit rate | best possible | "
          f"time / '{rows[0][0]}' time | of the compute limit |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        best = f"{s['best_hit_rate']:.3f}" if "best_hit_rate" in s else "-"
        print(f"| {name} | {s['duration_s']:.1f} | {s['requests'] / s['duration_s']:.2f} | "
              f"{s['output_tokens_per_s']:.1f} | {s['hit_rate']:.3f} | {best} | "
              f"{s['duration_s'] / base:.2f}x | {limit / s['duration_s']:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
