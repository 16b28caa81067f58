"""The `radixkv` command.

radixkv launch ...   run a runtime (and its scheduler) in the foreground until Ctrl-C;
                     with --dp N, N runtimes behind a cache-aware router (--ray: on Ray)
radixkv router --worker tcp://HOST:PORT ...
                     a router in front of runtimes started elsewhere with `radixkv launch`
radixkv bench ...    run a workload against a runtime and report hit rate, throughput, TTFT

Every `ServerArgs` field is a flag of `launch` (and of `bench`, for the runtime it starts), with
the help text and choices written beside the field in `radixkv.config` (see `flags.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from radixkv.tools.flags import add_server_args, server_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radixkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # `bench` has its own parser (radixkv.tools.bench.build_parser); listed here for `radixkv -h`
    sub.add_parser("bench", add_help=False,
                   help="run a shared-prefix workload and report hit rate, throughput and TTFT "
                        "(radixkv bench -h)")  # fmt: skip
    p = sub.add_parser("launch", help="serve a model on a ZMQ endpoint until Ctrl-C")
    add_server_args(p)
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for ready")
    r = sub.add_parser("router", help="route requests to runtimes started elsewhere")
    r.add_argument("--worker", action="append", required=True, metavar="ENDPOINT",
                   help="a worker's client endpoint (tcp://HOST:PORT, as `radixkv launch` prints "
                        "it); once per worker")  # fmt: skip
    add_server_args(r)
    r.add_argument("--start-timeout", type=float, default=60.0,
                   help="seconds to wait for the workers to answer")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from radixkv.tools.bench import main as bench_main

        bench_main(argv[1:])
        return 0
    ns = build_parser().parse_args(argv)
    try:
        args = server_args(ns)
    except ValueError as exc:
        print(f"radixkv {ns.command}: {exc}", file=sys.stderr)
        return 2
    from radixkv.launcher import serve

    workers = ns.worker if ns.command == "router" else None
    return serve(args, ns.start_timeout, workers=workers)


if __name__ == "__main__":
    sys.exit(main())
