"""`make run`: start a runtime on the bundled model, let the users of four assistants (a bakery's
support desk, a chess tutor, a travel agent, a cooking helper) ask their questions at once, and
report a few answers, the cache hit rate against the best possible, throughput and latency.

python -m radixkv.tools.demo [--assistants 4] [--questions 8] [--output-len 48]
                             [--kv-cache-dtype auto] ...
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from radixkv.client.results import Result
from radixkv.tools.assistants import ASSISTANTS, assistant_chats
from radixkv.tools.stats import percentile
from radixkv.tools.workloads import ChatRequest, best_hit_rate


async def _run_all(endpoint: str, requests: list[ChatRequest], bar: Any) -> list[Result]:
    """Send every request at once (the scheduler batches them); tick the bar as each finishes."""
    from radixkv.client.aio import AsyncClient

    async with AsyncClient(endpoint) as client:

        async def one(req: ChatRequest) -> Result:
            result: Result = await client.chat(req.messages, max_new_tokens=req.max_new_tokens)
            bar.update(1)
            return result

        return await asyncio.gather(*(one(r) for r in requests))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--assistants", type=int, default=len(ASSISTANTS))
    ap.add_argument("--questions", type=int, default=8, help="questions per assistant")
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--schedule-policy", default="lpm")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, int8, fp8_e4m3, fp8_e5m2, ...")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    import radixkv
    from radixkv.tokenizer import load_tokenizer

    requests = assistant_chats(args.assistants, args.questions, args.output_len, args.seed)
    print(f"starting a runtime on {args.model} ...", flush=True)
    with radixkv.Runtime(
        model=args.model, schedule_policy=args.schedule_policy, kv_cache_dtype=args.kv_cache_dtype
    ) as rt:
        info = rt.ready_info
        print(
            f"ready: {info.model} ({info.dtype}), KV cache {info.kv_capacity} tokens "
            f"({args.kv_cache_dtype}), page size {info.page_size}, endpoint {rt.endpoint}"
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
    shown: set[int] = set()
    for req, res in zip(requests, results, strict=True):
        if req.group not in shown and len(shown) < 3:
            shown.add(req.group)
            print(f"\n[{ASSISTANTS[req.group].name}]")
            print(f"Q: {req.messages[-1]['content']}\nA: {res.text.strip()}")

    prompt_tokens = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    out_tokens = sum(r.completion_tokens for r in results)
    hit = cached / prompt_tokens
    ttfts = [r.ttft for r in results]
    print("\nsummary")
    print(
        f"  requests          {len(results)} ({args.assistants} assistants x {args.questions} "
        "questions)"
    )
    print(f"  prompt tokens     {prompt_tokens}")
    print(f"  cached tokens     {cached}")
    print(f"  hit rate          {hit:.3f}  (best possible {best:.3f}, {hit / best:.1%} of it)")
    print(
        f"  throughput        {len(results) / elapsed:.2f} req/s, "
        f"{(prompt_tokens + out_tokens) / elapsed:.0f} tok/s in+out, "
        f"{out_tokens / elapsed:.1f} output tok/s  ({elapsed:.1f} s)"
    )
    print(
        f"  TTFT              p50 {percentile(ttfts, 0.5):.2f} s, "
        f"p99 {percentile(ttfts, 0.99):.2f} s"
    )
    print(
        f"  runtime counters  {stats.requests} requests, {stats.prompt_tokens} prompt tokens, "
        f"{stats.cached_tokens} cached, {stats.retractions} retractions, "
        f"{stats.evicted_tokens} evicted"
    )


if __name__ == "__main__":
    main()
