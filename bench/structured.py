"""Structured output's cost: the same batch with and without grammars, side by side in one run.

    python bench/structured.py [--requests 32] [--new-tokens 48] [--dtype auto] [--repeats 2]

Each configuration sends its requests at once to one runtime: "free" (no grammar), and "mixed"
(every other request constrained by a JSON schema). Grammar requests end when their JSON is
complete, so the figure compared is output tokens per second of the whole batch, alternating the
two configurations `--repeats` times; the ratio mixed / free is printed per pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time

from radixkv.client.aio import AsyncClient
from radixkv.launcher import Runtime

SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer"}, "tags": {"type": "array", "maxItems": 3,
                   "items": {"type": "string", "maxLength": 12}}},
    "required": ["name", "age", "tags"], "additionalProperties": False,
})  # fmt: skip


async def run_batch(endpoint: str, n: int, new_tokens: int, mixed: bool) -> tuple[int, float]:
    """(output tokens, seconds) of n chats sent at once."""
    async with AsyncClient(endpoint, timeout=None) as client:
        calls = []
        for i in range(n):
            messages = [{"role": "user", "content": f"Describe person number {i} as JSON."}]
            grammar = {"json_schema": SCHEMA} if mixed and i % 2 else {"ignore_eos": True}
            calls.append(client.chat(messages, max_new_tokens=new_tokens, **grammar))
        start = time.perf_counter()
        results = await asyncio.gather(*calls)
        return sum(r.completion_tokens for r in results), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}; {args.requests} requests, "
          f"{args.new_tokens} new tokens, dtype {args.dtype}")  # fmt: skip
    with Runtime("smollm2-135m", dtype=args.dtype, max_running_requests=args.requests) as rt:
        asyncio.run(run_batch(rt.endpoint, args.requests, 8, mixed=True))  # warm-up, compile
        print("| pair | free tok/s | mixed tok/s | mixed / free |\n|---|---|---|---|")
        for pair in range(args.repeats):
            rates = []
            for mixed in (False, True):
                rt.client.flush_cache()
                tokens, seconds = asyncio.run(
                    run_batch(rt.endpoint, args.requests, args.new_tokens, mixed)
                )
                rates.append(tokens / seconds)
            print(f"| {pair + 1} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f} |")


if __name__ == "__main__":
    main()
