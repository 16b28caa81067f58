"""Where a run's slow inter-token gaps fall: read the JSON of `radixkv bench --out FILE`.

    python bench/itl_gaps.py FILE [FILE ...] [--factor 3] [--bin 1.0]

For each file: the inter-token latency (the gaps between a request's streamed tokens, pooled:
what `radixkv bench` reports) p50 and p99; the requests whose prompts were (mostly) computed, not
cached (`cached_tokens` under half the prompt), with when they were sent and their TTFT; the
largest gaps; and, per `--bin` seconds of the run, how many gaps ended there and how many of them
were slower than `--factor` times the p50 (issue 13's target is p99 <= 3x p50: at most 1 % of
the gaps may be slower), and how many requests were decoding (first token received, not finished)
at the middle of each bin. A gap ends when its token arrives: the request's send time plus its
TTFT plus its gaps so far.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def report(path: Path, factor: float, width: float) -> None:
    data = json.loads(path.read_text())
    reqs = data["requests"]
    start = min(r["sent"] for r in reqs)
    gaps: list[tuple[float, float]] = []  # (when the gap ended, its length), seconds into the run
    for r in reqs:
        t = r["sent"] - start + r["ttft"]
        for gap in r["itl"]:
            t += gap
            gaps.append((t, gap))
    lengths = [g for _, g in gaps]
    p50, p99 = percentile(lengths, 50), percentile(lengths, 99)
    ttft = [r["ttft"] for r in reqs]
    print(f"{path}: {len(reqs)} requests, {len(gaps)} gaps")
    print(f"  ITL p50 {p50:.3f} s, p99 {p99:.3f} s ({p99 / p50:.1f}x); TTFT p50 "
          f"{percentile(ttft, 50):.3f} s, p99 {percentile(ttft, 99):.3f} s")  # fmt: skip
    cold = [r for r in reqs if r["cached_tokens"] < r["prompt_ids"] / 2]
    print("  computed prompts (sent at s: TTFT s): "
          + ", ".join(f"{r['sent'] - start:.2f}: {r['ttft']:.2f}" for r in cold))  # fmt: skip
    largest = sorted(gaps, key=lambda x: -x[1])[:12]
    print("  largest gaps (ended at s: length s): "
          + ", ".join(f"{t:.2f}: {g:.3f}" for t, g in largest))  # fmt: skip
    slow = factor * p50
    n_bins = int(max(t for t, _ in gaps) // width) + 1
    every, over = [0] * n_bins, [0] * n_bins
    for t, g in gaps:
        every[int(t // width)] += 1
        over[int(t // width)] += g > slow
    total = sum(over)
    print(f"  gaps over {factor:g}x p50 ({slow:.3f} s): {total} = {total / len(gaps):.1%} of all")
    print(f"  per {width:g} s, over / all: "
          + " ".join(f"{o}/{e}" for o, e in zip(over, every, strict=True)))  # fmt: skip
    spans = [(r["sent"] - start + r["ttft"], r["finished"] - start) for r in reqs]
    decoding = [sum(a <= (i + 0.5) * width < b for a, b in spans) for i in range(n_bins)]
    print(f"  requests decoding at the middle of each {width:g} s: "
          + " ".join(map(str, decoding)))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="`radixkv bench --out` JSON files")
    ap.add_argument("--factor", type=float, default=3.0, help="a slow gap: this many p50s")
    ap.add_argument("--bin", type=float, default=1.0, help="seconds per histogram bin")
    args = ap.parse_args()
    for path in args.files:
        report(path, args.factor, args.bin)


if __name__ == "__main__":
    main()
