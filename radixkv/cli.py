"""The `radixkv` command.

radixkv launch ...   run a runtime (and its scheduler) in the foreground until Ctrl-C
radixkv bench ...    run a workload against a runtime and report hit rate, throughput, TTFT
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

from radixkv.config import SCHEDULE_POLICIES, ServerArgs
from radixkv.scheduler_child import DEFAULT_SCHEDULER

log = logging.getLogger("radixkv.launch")

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "268435456", "256MiB", "256M", "1.5GB", "2g"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radixkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # `bench` has its own parser (radixkv.bench.build_parser); listed here for `radixkv -h`
    sub.add_parser("bench", add_help=False,
                   help="run a shared-prefix workload and report hit rate, throughput and TTFT "
                        "(radixkv bench -h)")  # fmt: skip
    p = sub.add_parser("launch", help="serve a model on a ZMQ endpoint until Ctrl-C")
    d = ServerArgs()
    p.add_argument("--model", default=d.model, help="smollm2-135m, a .gguf file or a HF directory")
    p.add_argument("--host", default=d.host, help="interface to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="client port (0: pick a free one)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API and /metrics on this port "
                        "(0: pick a free one)")  # fmt: skip
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-memory", type=parse_size, default=d.kv_memory,
                    help="KV cache memory budget, e.g. 256MiB (default)")  # fmt: skip
    kv.add_argument("--max-total-tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--page-size", type=int, default=d.page_size)
    p.add_argument("--max-running-requests", type=int, default=d.max_running_requests)
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens)
    p.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size)
    p.add_argument("--max-context-len", type=int, default=None)
    p.add_argument("--schedule-policy", choices=SCHEDULE_POLICIES, default=d.schedule_policy)
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--device", default=d.device)
    p.add_argument(
        "--attention-backend",
        default=d.attention_backend,
        choices=("auto", "torch", "triton"),
        help="auto: triton on CUDA, torch otherwise (triton on a CPU needs TRITON_INTERPRET=1)",
    )
    p.add_argument("--api-key", default=None,
                   help="clients must send this key (HTTP: Authorization: Bearer KEY)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--log-level", default=d.log_level, choices=("debug", "info", "warning", "error")
    )
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for ready")
    return parser


def server_args(ns: argparse.Namespace) -> ServerArgs:
    fields = ("model", "host", "port", "http_port", "kv_memory", "max_total_tokens", "page_size",
              "max_running_requests", "max_prefill_tokens", "chunked_prefill_size",
              "max_context_len", "schedule_policy", "disable_radix_cache", "dtype", "device",
              "attention_backend", "api_key", "seed", "log_level")  # fmt: skip
    return ServerArgs(**{f: getattr(ns, f) for f in fields})


def launch(
    args: ServerArgs,
    start_timeout: float,
    scheduler: str = DEFAULT_SCHEDULER,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> int:
    """Serve in this process until SIGINT/SIGTERM; returns the exit status."""
    from radixkv.runtime_server import RuntimeServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        server = RuntimeServer(args, scheduler, scheduler_kwargs)
    except OSError as exc:
        log.error("radixkv failed to start: %s", exc)
        return 1
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        try:
            ready = server.start(start_timeout)
        except Exception as exc:
            log.error("radixkv failed to start: %s", exc)
            return 1
        log.info(
            "model %s (%s): KV cache %d tokens (page size %d), context %d, up to %d running "
            "requests", ready.model, ready.dtype, ready.kv_capacity, ready.page_size,
            ready.max_context_len, ready.max_running_requests,
        )  # fmt: skip
        auth = " (API key required)" if args.api_key else ""
        http = f", HTTP {server.http.url}" if server.http is not None else ""
        print(f"radixkv ready: endpoint {server.endpoint}{http}{auth}; Ctrl-C to stop", flush=True)
        server.serve_forever()
        log.info("shutting down")
        return 0
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from radixkv.bench import main as bench_main

        bench_main(argv[1:])
        return 0
    ns = build_parser().parse_args(argv)
    try:
        args = server_args(ns)
    except ValueError as exc:
        print(f"radixkv launch: {exc}", file=sys.stderr)
        return 2
    return launch(args, ns.start_timeout)


if __name__ == "__main__":
    sys.exit(main())
