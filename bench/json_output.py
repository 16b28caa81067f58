"""Structured JSON output with the small default model: grammar compile times, and how often the
output parses for each `--json-max-whitespace` setting, side by side in one run.

    python bench/json_output.py [--settings -1,0,1] [--dtype auto]

For each setting, one in-process scheduler runs, greedy: 8 chats asking for a JSON object
(`json_object`, i.e. the schema {"type": "object"}, 96 new tokens) and 4 chats asking for a
{city, population} object (60 new tokens). Printed: finish reasons and how many outputs parse as
JSON. Before that, the grammar compiler's set-up (once per process: the vocabulary's tables) and
one schema's compilation are timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from radixkv.config import ServerArgs
from radixkv.protocol import SamplingParams
from radixkv.scheduler.grammar import GrammarBackend
from radixkv.scheduler.process import build_scheduler
from radixkv.tokenizer import load_tokenizer

OBJECT_ASKS = [
    "Describe a cat as JSON.", "Give me a JSON object about Paris.", "List three fruits in JSON.",
    "Return your name and age as JSON.", "JSON for a book with title and author.",
    "A JSON object describing the weather.", "Output a JSON user profile.",
    "Summarize Python in JSON.",
]  # fmt: skip
CITIES = ["Rome", "Paris", "Tokyo", "Lima"]
CITY = json.dumps({
    "type": "object", "additionalProperties": False, "required": ["city", "population"],
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
})  # fmt: skip


def compile_times(vocab_size: int) -> None:
    backend = GrammarBackend("smollm2-135m", vocab_size)
    start = time.perf_counter()
    backend._get_compiler()
    setup = time.perf_counter() - start
    start = time.perf_counter()
    backend.matcher(SamplingParams(json_schema=CITY))
    print(f"grammar compiler set-up {setup:.2f} s; the {{city, population}} schema compiled in "
          f"{(time.perf_counter() - start) * 1e3:.1f} ms")  # fmt: skip


def run(setting: int, dtype: str, tokenizer: object) -> str:
    sched = build_scheduler(
        ServerArgs(dtype=dtype, max_total_tokens=16384, json_max_whitespace=setting)
    )
    asks = [(q, '{"type": "object"}', 96) for q in OBJECT_ASKS]
    asks += [(f"Describe {city}.", CITY, 60) for city in CITIES]
    for i, (question, schema, new) in enumerate(asks):
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        sched.add_request(str(i), list(ids), SamplingParams(max_new_tokens=new, json_schema=schema))
    out: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while sched.has_work():
        for o in sched.step():
            out.setdefault(o.rid, []).extend(o.token_ids)
            if o.finish_reason:
                reasons[o.rid] = o.finish_reason

    def parsed(rids: range) -> int:
        ok = 0
        for i in rids:
            text = tokenizer.decode(out[str(i)], skip_special_tokens=True)  # type: ignore[attr-defined]
            try:
                json.loads(text)
                ok += 1
            except json.JSONDecodeError:
                pass
        return ok

    n = len(OBJECT_ASKS)
    stops = sum(r == "stop" for r in reasons.values())
    return (f"| {setting} | {parsed(range(n))}/{n} | {parsed(range(n, len(asks)))}/{len(CITIES)} "
            f"| {stops}/{len(asks)} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--settings", default="-1,0,1")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    tokenizer = load_tokenizer("smollm2-135m")
    print(f"machine: {platform.processor() or platform.machine()}")
    compile_times(len(tokenizer))
    rows = [run(int(s), args.dtype, tokenizer) for s in args.settings.split(",")]
    print("\n| --json-max-whitespace | json_object parsed | {city, population} parsed | ended "
          "by the grammar |\n|---|---|---|---|")  # fmt: skip
    print("\n".join(rows))


if __name__ == "__main__":
    main()
