"""`make run`: start a runtime on the bundled model, run a shared-prefix chat workload, report.

python -m radixkv.demo [--groups 4] [--prompts-per-group 8] [--system-words 300] ...
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from radixkv.client_common import Result
from radixkv.workloads import ChatRequest, SharedPrefixWorkload, best_hit_rate


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _run_all(endpoint: str, requests: list[ChatRequest], bar: Any) -> list[Result]:
    """Send every request at once (the scheduler batches them); tick the bar as each finishes."""
    from radixkv.async_client import AsyncClient

    async with AsyncClient(endpoint) as client:

        async def one(req: ChatRequest) -> Result:
            result: Result = await client.chat(req.messages, max_new_tokens=req.max_new_tokens)
            bar.update(1)
            return result

        return await asyncio.gather(*(one(r) for r in requests))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--system-words", type=int, default=300)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--schedule-policy", default="lpm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    import radixkv
    from radixkv.model.loader import load_tokenizer

    workload = SharedPrefixWorkload(
        groups=args.groups,
        prompts_per_group=args.prompts_per_group,
        system_words=args.system_words,
        output_len=args.output_len,
        seed=args.seed,
    )
    requests = workload.requests()
    print(f"starting a runtime on {args.model} ...", flush=True)
    with radixkv.Runtime(model=args.model, schedule_policy=args.schedule_policy) as rt:
        info = rt.ready_info
        print(
            f"ready: {info.model} ({info.dtype}), KV cache {info.kv_capacity} tokens, "
            f"page size {info.page_size}, endpoint {rt.endpoint}"
        )
        start = time.perf_counter()
        with tqdm(total=len(requests), desc="requests", unit="req", file=sys.stdout) as bar:
            results = asyncio.run(_run_all(rt.endpoint, requests, bar))
        elapsed = time.perf_counter() - start
        stats = rt.client.stats()

    tokenizer = load_tokenizer(args.model)
    prompts = [
        tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True)
        for r in requests
    ]
    prompts = [list(p["input_ids"]) if not isinstance(p, list) else p for p in prompts]
    best = best_hit_rate(
        [(p, res.token_ids) for p, res in zip(prompts, results, strict=True)], info.page_size
    )
    for i in (0, len(requests) // 2):
        question = requests[i].messages[-1]["content"]
        print(f"\nQ: {question[:100]}\nA: {results[i].text.strip()[:300]}")

    prompt_tokens = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    out_tokens = sum(r.completion_tokens for r in results)
    hit = cached / prompt_tokens
    ttfts = [r.ttft for r in results]
    print("\nsummary")
    print(f"  requests          {len(results)} ({args.groups} groups x {args.prompts_per_group})")
    print(f"  prompt tokens     {prompt_tokens}")
    print(f"  cached tokens     {cached}")
    print(f"  hit rate          {hit:.3f}  (best possible {best:.3f}, {hit / best:.1%} of it)")
    print(
        f"  throughput        {len(results) / elapsed:.2f} req/s, "
        f"{(prompt_tokens + out_tokens) / elapsed:.0f} tok/s in+out, "
        f"{out_tokens / elapsed:.1f} output tok/s  ({elapsed:.1f} s)"
    )
    print(
        f"  TTFT              p50 {statistics.median(ttfts):.2f} s, "
        f"p99 {_percentile(ttfts, 0.99):.2f} s"
    )
    print(
        f"  runtime counters  {stats.requests} requests, {stats.prompt_tokens} prompt tokens, "
        f"{stats.cached_tokens} cached, {stats.retractions} retractions, "
        f"{stats.evicted_tokens} evicted"
    )


if __name__ == "__main__":
    main()
