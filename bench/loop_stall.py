"""Does a huge request hold up everyone else? The runtime loop with large prompts tokenized on it
(the old way) and on its worker thread (`INLINE_TOKENIZE_CHARS`), side by side in one run.

    python bench/loop_stall.py [--chars 300000] [--big 5]

For each mode a runtime (`radixkv launch`'s `serve`, the real model) runs in a child process; one
client loops 1-token requests while another sends `--big` prompts of `--chars` characters (more
than the context holds: tokenized, then refused). Printed: the worst and median latency of the
small requests meanwhile. Then, once: how long a chat of 100,000 empty messages takes to be
refused (the message-count bound, before any templating).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import subprocess
import sys
import threading
import time

import radixkv
from radixkv.frontend.intake import INLINE_TOKENIZE_CHARS


def serve(inline_chars: int) -> tuple[subprocess.Popen[str], str]:
    code = ("import sys; import radixkv.frontend.intake as s; "
            f"s.INLINE_TOKENIZE_CHARS = {inline_chars}; "
            "from radixkv.launcher import serve; from radixkv.config import ServerArgs; "
            "sys.exit(serve(ServerArgs(log_level='warning'), 300))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.split()[3].rstrip(",;")


def measure(inline_chars: int, chars: int, big: int) -> tuple[float, float]:
    proc, endpoint = serve(inline_chars)
    try:
        latencies: list[float] = []
        stop = threading.Event()

        def small() -> None:
            with radixkv.Client(endpoint) as c:
                while not stop.is_set():
                    start = time.perf_counter()
                    c.generate("hi", max_new_tokens=1)
                    latencies.append(time.perf_counter() - start)

        worker = threading.Thread(target=small)
        worker.start()
        time.sleep(1.0)
        with radixkv.Client(endpoint) as c:
            for _ in range(big):
                # longer than the context: refused after tokenizing, as intended
                with contextlib.suppress(radixkv.RequestError):
                    c.generate("word " * (chars // 5), max_new_tokens=1)
        stop.set()
        worker.join()
        return max(latencies), statistics.median(latencies)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--chars", type=int, default=300_000)
    ap.add_argument("--big", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}")
    for name, inline in (("on the loop", 10**12), ("on the worker thread", INLINE_TOKENIZE_CHARS)):
        worst, median = measure(inline, args.chars, args.big)
        print(f"large prompts tokenized {name}: small requests' latency worst "
              f"{worst * 1e3:.0f} ms, median {median * 1e3:.0f} ms")  # fmt: skip
    with radixkv.Runtime(log_level="warning") as rt:
        messages = [{"role": "user", "content": ""}] * 100_000
        start = time.perf_counter()
        try:
            rt.client.chat(messages, max_new_tokens=1)
        except radixkv.RequestError as exc:
            print(f"100,000 empty messages refused in {(time.perf_counter() - start) * 1e3:.0f} ms "
                  f"(client encoding included): {exc}")  # fmt: skip


if __name__ == "__main__":
    main()
