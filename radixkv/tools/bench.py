"""`radixkv bench`: run a shared-prefix workload against a runtime and report honest numbers.

    radixkv bench --workload shared-prefix [--endpoint tcp://... | --model smollm2-135m ...]
                  [--max-concurrency 64 | --request-rate 4] [--out r.json] [--plot r.png]

Hit rate = Σ cached_tokens / Σ prompt_tokens over the run, next to the workload's best possible
hit rate (every distinct prefix computed once, `best_hit_rate`) and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixkv.config import ServerArgs
from radixkv.tools.flags import add_server_args, server_args
from radixkv.tools.stats import distribution
from radixkv.tools.workloads import WORKLOADS, Conversation, best_hit_rate

SKIPPED = ("seed",)  # server flags the bench leaves out: --seed is the workload's


@dataclass
class RequestRecord:
    conversation: int
    turn: int
    sent: float  # seconds since the run started
    finished: float
    prompt_ids: list[int]
    output_ids: list[int]
    cached_tokens: int
    ttft: float
    latency: float
    # seconds between successive streamed chunks after the first (one token each, unless the
    # detokenizer held a partial character back), as the client saw them
    itl: list[float] = dataclasses.field(default_factory=list)


async def run_workload(
    client: Any,
    convs: list[Conversation],
    *,
    max_concurrency: int | None = None,
    request_rate: float | None = None,
    seed: int = 0,
    progress: Any = None,
    sessions: bool = False,
    think_time: float = 0.0,
) -> list[RequestRecord]:
    """Send every conversation (turns in order, each with the real previous replies) through an
    `AsyncClient`; at most `max_concurrency` in flight, first turns arriving as a Poisson process
    of `request_rate` per second if given (else all at once); between a conversation's turns its
    user thinks for an exponentially distributed time of mean `think_time` seconds (seeded per
    conversation, so the same run sends the same waits). With `sessions`, each conversation
    is a session: a turn sends only its new input, continuing the previous turn, and the session
    is closed after the last turn (the same prompts, built by the runtime)."""
    sem = asyncio.Semaphore(max_concurrency or 1_000_000)
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in convs:
        delays.append(t)
        if request_rate:
            t += rng.expovariate(request_rate)
    records: list[RequestRecord] = []
    start = time.perf_counter()

    async def run(index: int, conv: Conversation, delay: float) -> None:
        await asyncio.sleep(delay)
        thinks = random.Random(seed * 1_000_003 + index)
        history = list(conv.prefix_ids)
        session = await client.open_session() if sessions else None
        rid = None
        for t, turn in enumerate(conv.turns):
            if t and think_time:
                await asyncio.sleep(thinks.expovariate(1 / think_time))
            prompt = history + turn.user_ids
            sent_ids, extra = prompt, {}
            if session is not None:
                sent_ids = prompt[len(history) :] if rid is not None else prompt
                extra = {"session": {"id": session, "rid": rid}}
            async with sem:
                sent = time.perf_counter() - start
                r, arrivals = await _streamed(client, sent_ids, turn.max_new_tokens, extra)
            rid = r.rid
            now = time.perf_counter() - start
            itl = [b - a for a, b in itertools.pairwise(arrivals)]
            record = RequestRecord(
                index, t, sent, now, prompt, r.token_ids, r.cached_tokens, r.ttft, r.latency, itl
            )
            records.append(record)
            if progress is not None:
                progress.update(1)
            history = prompt + r.token_ids
        if session is not None:
            await client.close_session(session)

    await asyncio.gather(
        *(run(i, c, d) for i, (c, d) in enumerate(zip(convs, delays, strict=True)))
    )
    return records


async def _streamed(
    client: Any, prompt: list[int], max_new_tokens: int, extra: dict[str, Any]
) -> tuple[Any, list[float]]:
    """Generate streaming: the Result, and when each chunk that brought tokens arrived (a chunk
    whose tokens end in a partial character comes with the next one)."""
    stream = await client.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, **extra)
    arrivals: list[float] = []
    seen = 0
    async for _ in stream:
        got = stream.completion_tokens if stream.result is None else len(stream.result.token_ids)
        if got > seen:
            seen = got
            arrivals.append(time.perf_counter())
    return stream.result, arrivals


def summarize(records: list[RequestRecord], page_size: int = 1) -> dict[str, Any]:
    """Throughput, latency distributions and the hit rate against the best possible."""
    by_send = sorted(records, key=lambda r: r.sent)
    duration = max(r.finished for r in records) - min(r.sent for r in records)
    prompt = sum(len(r.prompt_ids) for r in records)
    cached = sum(r.cached_tokens for r in records)
    output = sum(len(r.output_ids) for r in records)
    best = best_hit_rate([(r.prompt_ids, r.output_ids) for r in by_send], page_size)
    hit = cached / prompt if prompt else 0.0
    tpot = [
        (r.latency - r.ttft) / (len(r.output_ids) - 1) for r in records if len(r.output_ids) > 1
    ]
    return {
        "requests": len(records),
        "duration_s": duration,
        "requests_per_s": len(records) / duration,
        "input_tokens_per_s": prompt / duration,
        "output_tokens_per_s": output / duration,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "output_tokens": output,
        "hit_rate": hit,
        "best_hit_rate": best,
        "hit_rate_of_best": hit / best if best else 0.0,
        "ttft_s": distribution([r.ttft for r in records]),
        "tpot_s": distribution(tpot),
        "itl_s": distribution([gap for r in records for gap in r.itl]),
    }


def print_summary(name: str, s: dict[str, Any]) -> None:
    print(f"\n{name}")
    print(
        f"  requests         {s['requests']} in {s['duration_s']:.1f} s "
        f"({s['requests_per_s']:.2f} req/s)"
    )
    print(
        f"  tokens/s         input {s['input_tokens_per_s']:.0f}, "
        f"output {s['output_tokens_per_s']:.1f}"
    )
    print(
        f"  hit rate         {s['hit_rate']:.4f}  best possible {s['best_hit_rate']:.4f}  "
        f"({s['hit_rate_of_best']:.1%} of best)"
    )
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "time/output token"),
                       ("itl_s", "inter-token")):  # fmt: skip
        d = s[key]
        print(f"  {label:<16} mean {d['mean']:.3f} s, p50 {d['p50']:.3f} s, p99 {d['p99']:.3f} s")


def plot(records: list[RequestRecord], summary: dict[str, Any], path: Path) -> None:
    """Hit rate over time, output throughput over time, TTFT distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted(records, key=lambda r: r.finished)
    times = [r.finished for r in done]
    cum_prompt = cum_cached = 0
    hit = []
    for r in done:
        cum_prompt += len(r.prompt_ids)
        cum_cached += r.cached_tokens
        hit.append(cum_cached / cum_prompt)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].step([0.0, *times], [0.0, *hit], where="post", label="measured (cumulative)")
    axes[0].axhline(summary["best_hit_rate"], color="gray", linestyle="--", label="best possible")
    axes[0].set(xlabel="time (s)", ylabel="hit rate", title="prefix cache hit rate", ylim=(0, 1),
                xlim=(0, max(times) * 1.02))  # fmt: skip
    axes[0].legend()
    bins = max(1, int(max(times)) + 1)
    per_second = [0] * bins
    for r in done:
        per_second[min(bins - 1, int(r.finished))] += len(r.output_ids)
    axes[1].bar([b + 0.5 for b in range(bins)], per_second, width=1.0)
    axes[1].set(xlabel="time (s)", ylabel="output tokens", title="output tokens per second",
                xlim=(0, bins))  # fmt: skip
    axes[2].hist([r.ttft for r in records], bins=30)
    axes[2].set(xlabel="seconds", ylabel="requests", title="time to first token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _workload(args: argparse.Namespace) -> Any:
    """The workload the options describe; an option of another workload is refused, not ignored."""
    cls = WORKLOADS[args.workload]
    fields = {f.name for f in dataclasses.fields(cls)}
    every = {f.name for c in WORKLOADS.values() for f in dataclasses.fields(c)}
    given = {k: v for k, v in vars(args).items() if k in every and v is not None}
    if unused := sorted(set(given) - fields):
        names = ", ".join(f"--{name.replace('_', '-')}" for name in unused)
        raise ValueError(f"{names} does not apply to --workload {args.workload}")
    return cls(**given)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="radixkv bench", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="shared-prefix")
    for name in sorted({f.name for cls in WORKLOADS.values() for f in dataclasses.fields(cls)}):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--endpoint", help="a running runtime (default: start one)")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--request-rate", type=float, default=None, help="first turns per second")
    ap.add_argument("--sessions", action="store_true",
                    help="each conversation a session (/open_session): turns continue the "
                    "previous one, closed after the last (its prefixes evicted first)")  # fmt: skip
    ap.add_argument("--think-time", type=float, default=0.0,
                    help="mean seconds a user waits between turns (exponential)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="write the summary and records as JSON")
    ap.add_argument("--plot", type=Path, help="write a PNG of hit rate, throughput and TTFT")
    run = ap.add_argument_group(
        "runtime options (`radixkv launch`'s, for the runtime the bench starts without --endpoint; "
        "--api-key is also the key sent to --endpoint)"
    )
    add_server_args(run, skip=SKIPPED)
    return ap


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start (or connect to) a runtime, run the workload, print and return the summary."""
    import contextlib

    from tqdm import tqdm

    from radixkv.client.aio import AsyncClient
    from radixkv.launcher import Runtime

    workload = _workload(args)
    convs = workload.conversations()
    total = sum(len(c.turns) for c in convs)
    with contextlib.ExitStack() as stack:
        endpoint, page = args.endpoint, args.page_size or ServerArgs.page_size
        if endpoint is None:
            server = dataclasses.asdict(server_args(args, skip=SKIPPED))
            rt = stack.enter_context(Runtime(**server))
            endpoint, page = rt.endpoint, rt.ready_info.page_size

        async def go() -> list[RequestRecord]:
            async with AsyncClient(endpoint, api_key=args.api_key, timeout=None) as client:
                with tqdm(total=total, desc=args.workload, unit="req", file=sys.stdout) as bar:
                    return await run_workload(
                        client, convs, max_concurrency=args.max_concurrency,
                        request_rate=args.request_rate, progress=bar, sessions=args.sessions,
                        think_time=args.think_time,
                    )  # fmt: skip

        records = asyncio.run(go())
    summary = summarize(records, page)
    summary["workload"] = {"name": args.workload, **dataclasses.asdict(workload)}
    print_summary(f"{args.workload} ({total} requests)", summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{**dataclasses.asdict(r), "prompt_ids": len(r.prompt_ids),
                 "output_ids": len(r.output_ids)} for r in records]  # fmt: skip
        args.out.write_text(json.dumps({"summary": summary, "requests": rows}, indent=1))
    if args.plot:
        plot(records, summary, args.plot)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        _workload(args)  # options that fit no part of the chosen workload: a usage error
    except ValueError as exc:
        ap.error(str(exc))
    run_bench(args)


if __name__ == "__main__":
    main()
