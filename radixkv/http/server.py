"""The HTTP front end of a runtime: uvicorn serving `radixkv.http.app` in a thread of the runtime
process.

Why a thread whose handlers talk to the runtime over its own client endpoint (loopback ZMQ):
the runtime loop stays the only thread that touches the TokenizerManager and the scheduler
channel (no locks on the request path), and an HTTP request is, from the loop's point of view,
just another client's request: API key, validation, stop strings, aborts, accounting and the
"scheduler died" replies all come for free and cannot drift from the Python client's behaviour.
The cost is one loopback hop per message, microseconds next to a model step.

The listening socket is bound when the runtime is constructed, so a busy port fails start-up at
once with a clear message, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radixkv import __version__
from radixkv.config import ServerArgs
from radixkv.http.gateway import GatewayConfig
from radixkv.http.metrics import RuntimeMetrics
from radixkv.protocol import Ready

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("radixkv.http")

WILDCARDS = ("", "0.0.0.0", "*", "::")
SEND_BUFFER_BYTES = 256 * 1024
GRACEFUL_SHUTDOWN = 3  # seconds in-flight HTTP requests get when the runtime stops


def bind_http_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 picks a free port); OSError says what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc}; check --host") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: what a reader that stopped reading can leave queued
        # in the kernel before our writes block (and --stream-stall-timeout starts counting)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen for HTTP on {host}:{port}: {exc}; choose another --http-port"
        ) from exc
    sock.set_inheritable(False)
    return sock


def loopback_endpoint(endpoint: str) -> str:
    """The runtime's ZMQ endpoint as this process reaches it (a wildcard host → 127.0.0.1)."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host.strip("[]") in WILDCARDS:
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def gateway_config(
    endpoint: str,
    args: ServerArgs,
    ready: Ready,
    metrics: RuntimeMetrics,
    dead: Callable[[], str | None],
    client_key: str | None = None,
) -> GatewayConfig:
    """The HTTP front end's view of a started runtime. The served model name is the model's
    name without directory or extension; the name or path it was launched with is an alias."""
    name = Path(ready.model).stem if ready.model.endswith(".gguf") else Path(ready.model).name
    aliases = tuple(dict.fromkeys(a for a in (ready.model, args.model) if a != name))
    return GatewayConfig(
        endpoint=loopback_endpoint(endpoint),
        api_keys=args.api_keys,
        client_key=client_key,
        isolate_cache_per_key=args.isolate_cache_per_key,
        model=name or ready.model,
        aliases=aliases,
        max_context_len=ready.max_context_len,
        metrics=metrics,
        dead=dead,
        server_info=server_info(args, ready),
        stream_stall_timeout=args.stream_stall_timeout,
    )


def server_info(args: ServerArgs, ready: Ready) -> dict[str, Any]:
    """`/get_server_info`: the launch options (not the API key) and what the scheduler reported,
    under SGLang's names where it has them."""
    options = {k: v for k, v in dataclasses.asdict(args).items() if k != "api_key"}
    return {
        **options,
        "model_path": ready.model,
        "context_length": ready.max_context_len,
        "max_total_num_tokens": ready.kv_capacity,
        "page_size": ready.page_size,
        "max_running_requests": ready.max_running_requests,
        "dtype": ready.dtype,
        "eos_token_ids": ready.eos_token_ids,
        "version": __version__,
    }


class HttpServer:
    """Binds on construction; `start(config)` serves in a daemon thread; `stop()` ends it."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = bind_http_socket(host, port)
        bound_host, bound_port = self.sock.getsockname()[:2]
        shown = "127.0.0.1" if bound_host in WILDCARDS else bound_host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound_port}"
        self.metrics = RuntimeMetrics()  # observed by the runtime loop from the start
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, config: GatewayConfig, timeout: float = 30.0) -> None:
        """Serve the app; returns once uvicorn accepts connections (RuntimeError otherwise)."""
        import uvicorn

        from radixkv.http.app import MAX_HEADER_BYTES, build_app

        uv_config = uvicorn.Config(
            build_app(config),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
            http="h11",
            h11_max_incomplete_event_size=MAX_HEADER_BYTES + 1024,  # + the request line
        )
        server = uvicorn.Server(uv_config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self.sock]}, name="radixkv-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {timeout:.0f} s")
            time.sleep(0.01)
        log.info("HTTP server on %s", self.url)

    def stop(self, timeout: float = GRACEFUL_SHUTDOWN + 5) -> None:
        """Stop serving (in-flight requests get GRACEFUL_SHUTDOWN seconds) and close the socket."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the HTTP server did not stop within %.0f s", timeout)
        self._server = self._thread = None
        self.sock.close()
