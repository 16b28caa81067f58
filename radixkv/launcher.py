"""Start the runtime process: in the foreground (`serve`, behind `radixkv launch`), or from Python
as a child (`radixkv.Runtime`):

    with radixkv.Runtime(model="smollm2-135m", max_total_tokens=20000) as rt:
        print(rt.client.generate("Hello").text)

The runtime process of a `Runtime` is a fresh interpreter (`python -c ...`, like a multiprocessing
"spawn" child but without re-importing the caller's `__main__`, so scripts need no `if __name__`
guard). It talks to its parent over a pipe carrying msgpack (no pickle): `Launch` in, then
`Started` or `StartFailed` out; the parent closing its end (or dying) tells the runtime to stop.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import msgspec

from radixkv.client.core import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT
from radixkv.client.sync import Client
from radixkv.config import ServerArgs, refuse_unused, setup_logging
from radixkv.frontend.scheduler_child import DEFAULT_SCHEDULER, describe_exit
from radixkv.protocol import Ready

if TYPE_CHECKING:
    from radixkv.frontend.endpoint import ClientEndpoint

log = logging.getLogger("radixkv.runtime")


def make_server(
    args: ServerArgs,
    scheduler: str = DEFAULT_SCHEDULER,
    scheduler_kwargs: dict[str, Any] | None = None,
    workers: list[str] | None = None,
) -> ClientEndpoint:
    """The process's server: one runtime; with `args.dp > 1` a router in front of that many
    worker runtimes (local processes, or Ray actors with `args.ray_address`); with `workers`
    (endpoints), a router in front of runtimes started elsewhere."""
    role = "remote" if workers is not None else "runtime" if args.dp == 1 else "local"
    if role == "local" and args.ray_address is not None:
        role = "ray"
    refuse_unused(args, role)
    if role == "runtime":
        from radixkv.frontend.server import RuntimeServer

        return RuntimeServer(args, scheduler, scheduler_kwargs)
    from radixkv.router.server import RouterServer
    from radixkv.router.workers import LocalWorkers, StaticWorkers, WorkerPool

    pool: WorkerPool
    if workers is not None:
        pool = StaticWorkers(workers, args.worker_api_key)
    elif args.ray_address is not None:
        from radixkv.router.ray_workers import RayWorkers

        pool = RayWorkers(args, Runtime, scheduler, scheduler_kwargs)
    else:
        pool = LocalWorkers(args, Runtime, scheduler, scheduler_kwargs)
    return RouterServer(args, pool)


def serve(
    args: ServerArgs,
    start_timeout: float,
    scheduler: str = DEFAULT_SCHEDULER,
    scheduler_kwargs: dict[str, Any] | None = None,
    workers: list[str] | None = None,
) -> int:
    """Be the runtime (or router) process, in the foreground, until SIGINT/SIGTERM; returns the
    exit status."""
    setup_logging(args.log_level)
    try:
        server = make_server(args, scheduler, scheduler_kwargs, workers)
    except (OSError, ValueError, ImportError) as exc:
        log.error("radixkv failed to start: %s", exc)
        return 1
    signal.signal(signal.SIGINT, lambda *_: server.drain())
    signal.signal(signal.SIGTERM, lambda *_: server.drain())
    try:
        try:
            ready = server.start(start_timeout)
        except Exception as exc:
            log.error("radixkv failed to start: %s", exc)
            return 1
        behind = f" behind a router, {server.describe()}" if server.describe() else ""
        log.info(
            "model %s (%s): KV cache %d tokens (page size %d), context %d, up to %d running "
            "requests%s", ready.model, ready.dtype, ready.kv_capacity, ready.page_size,
            ready.max_context_len, ready.max_running_requests, behind,
        )  # fmt: skip
        auth = " (API key required)" if args.api_keys else ""
        http = f", HTTP {server.http.url}" if server.http is not None else ""
        print(f"radixkv ready: endpoint {server.endpoint}{http}{auth}; Ctrl-C to stop", flush=True)
        server.serve_forever()
        log.info("shutting down")
        return server.exit_status
    finally:
        server.close()


class Launch(msgspec.Struct, tag="launch"):
    args: ServerArgs
    scheduler: str
    scheduler_kwargs: dict[str, Any]
    ready_timeout: float
    sys_path: list[str]


class Started(msgspec.Struct, tag="started"):
    endpoint: str
    ready: Ready
    http_url: str | None = None


class StartFailed(msgspec.Struct, tag="start_failed"):
    message: str


class RuntimeStartError(RuntimeError):
    """The runtime (or its scheduler) could not start; the message carries the child's error."""


def _child_main(fd: int) -> None:
    """Runtime process entry: serve until the parent closes the pipe, exits, or sends SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    launch = msgspec.msgpack.decode(conn.recv_bytes(), type=Launch)
    sys.path[:] = launch.sys_path
    args = launch.args
    setup_logging(args.log_level)
    encoder = msgspec.msgpack.Encoder()
    server: ClientEndpoint | None = None
    try:
        server = make_server(args, launch.scheduler, launch.scheduler_kwargs)
        signal.signal(signal.SIGTERM, lambda *_: server.drain() if server else None)
        ready = server.start(launch.ready_timeout)
        http_url = server.http.url if server.http is not None else None
        started = Started(endpoint=server.endpoint, ready=ready, http_url=http_url)
    except Exception as exc:
        conn.send_bytes(encoder.encode(StartFailed(message=str(exc) or type(exc).__name__)))
        if server is not None:
            server.close()
        raise SystemExit(1) from None
    conn.send_bytes(encoder.encode(started))
    try:
        server.serve_forever(conn.fileno(), on_extra=server.stop)
    finally:
        server.close()
    raise SystemExit(server.exit_status)


class Runtime:
    """A runtime process and its scheduler, started now and stopped by `shutdown()`, by leaving
    the `with` block, on Ctrl-C in the block, or at interpreter exit.

    `server_args` are `ServerArgs` fields (e.g. `max_total_tokens`, `page_size`,
    `schedule_policy`, `http_port`). `rt.client` is a connected `Client`, `rt.endpoint` its
    address, `rt.ready_info` the scheduler's handshake (KV capacity, page size, context length,
    ...), `rt.http_url` the HTTP server's base URL when `http_port` was given (0: a free port).
    `scheduler` ("module:function", called as `f(args, in_addr, out_addr, **scheduler_kwargs)`)
    replaces the scheduler process entry; tests use a fake one.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        start_timeout: float = 600.0,
        client_timeout: float | None = DEFAULT_TIMEOUT,
        scheduler: str = DEFAULT_SCHEDULER,
        scheduler_kwargs: dict[str, Any] | None = None,
        **server_args: Any,
    ) -> None:
        valid = {f.name for f in dataclasses.fields(ServerArgs)}
        unknown = sorted(set(server_args) - valid)
        if unknown:
            raise TypeError(
                f"unknown Runtime option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        self.args = ServerArgs(model=model, **server_args)
        self._closed = False
        self._conn, child_conn = multiprocessing.Pipe()
        code = f"from radixkv.launcher import _child_main; _child_main({child_conn.fileno()})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(child_conn.fileno(),)
        )
        child_conn.close()
        atexit.register(self.shutdown)
        try:
            launch = Launch(self.args, scheduler, scheduler_kwargs or {}, start_timeout, sys.path)
            self._conn.send_bytes(msgspec.msgpack.encode(launch))
            started = self._wait_started(start_timeout + 60)
        except BaseException:
            self.shutdown()
            raise
        self.endpoint: str = started.endpoint
        self.ready_info: Ready = started.ready
        self.http_url: str | None = started.http_url
        self.client = Client(self.endpoint, api_key=self._key, timeout=client_timeout)

    def _wait_started(self, timeout: float) -> Started:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._conn.poll(0.1):
                try:
                    data = self._conn.recv_bytes()
                except EOFError:
                    raise self._died() from None
                msg = msgspec.msgpack.decode(data, type=Started | StartFailed)
                if isinstance(msg, StartFailed):
                    raise RuntimeStartError(f"radixkv runtime failed to start: {msg.message}")
                return msg
            if self.process.poll() is not None:
                raise self._died()
        raise RuntimeStartError(f"the runtime did not start within {timeout:.0f} s")

    def _died(self) -> RuntimeStartError:
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        how = describe_exit(code)
        return RuntimeStartError(f"the runtime process exited during start-up ({how})")

    def new_client(
        self,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> Client:
        """Another client of this runtime (one per thread)."""
        return Client(self.endpoint, self._key, timeout, connect_timeout)

    @property
    def _key(self) -> str | None:
        """The key `client` and `new_client()` send: the first of `api_key`'s."""
        return self.args.api_keys[0] if self.args.api_keys else None

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the runtime and its scheduler; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        self._conn.close()  # the runtime sees EOF and shuts down cleanly
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the runtime did not stop within %.0f s; terminating it", timeout)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
