"""Who runs the router's workers, and restarts one that died.

- `StaticWorkers`: runtimes started elsewhere (`radixkv launch` on other machines, `radixkv router
  --worker tcp://HOST:PORT`); the router reconnects to a fixed endpoint by itself, so a worker that
  comes back rejoins without help.
- `LocalWorkers`: `--dp N` on one machine: N runtime processes (`radixkv.Runtime`, each with its
  own scheduler), started in parallel, each with a share of the CPU threads; one that dies is
  started again.
- `RayWorkers` (`radixkv.router.ray_workers`): the same as Ray actors on a cluster.

Every worker started here listens on loopback (Ray: the node's address) with a key of its own that
only the router knows, and publishes its cache events for the router.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

from radixkv.config import ROUTER_FIELDS, ServerArgs

log = logging.getLogger("radixkv.router")


class WorkerPool(abc.ABC):
    """What the router asks of whoever runs its workers."""

    api_key: str | None = None  # the key the router sends them

    @abc.abstractmethod
    def start(self, timeout: float) -> list[tuple[str, str]]:
        """Start the workers (or find them); their (stable name, endpoint)."""

    def restart(self, index: int, timeout: float) -> str | None:
        """Start worker `index` again after it died; its new endpoint, or None when this pool
        cannot (the router then waits for it to come back at the same endpoint)."""
        return None

    def shutdown(self) -> None:  # noqa: B027 (optional: pools that start workers stop them)
        """Stop the workers this pool started (nothing for workers started elsewhere)."""


class StaticWorkers(WorkerPool):
    def __init__(self, endpoints: list[str], api_key: str | None) -> None:
        if not endpoints:
            raise ValueError("a router needs at least one --worker tcp://HOST:PORT")
        self.endpoints = endpoints
        self.api_key = api_key

    def start(self, timeout: float) -> list[tuple[str, str]]:
        return [(endpoint, endpoint) for endpoint in self.endpoints]


def worker_args(args: ServerArgs, key: str, host: str = "127.0.0.1") -> ServerArgs:
    """A worker's options: the router's, as one runtime on `host` that only the router uses,
    with its share of the threads and its cache events published."""
    threads = args.num_threads or max(1, (os.cpu_count() or 1) // args.dp)
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ServerArgs)}
    router_only = {name: defaults[name] for name in ROUTER_FIELDS}  # a worker is no router
    return dataclasses.replace(
        args, **router_only, dp=1, host=host, port=0, http_port=None, api_key=key,
        isolate_cache_per_key=False, allow_no_api_key=False, num_threads=threads,
        cache_events_port=0 if args.router_cache_events else None,
    )  # fmt: skip


# `radixkv.Runtime` (passed in by the launcher, which sits above the router): called as
# `factory(model, start_timeout=..., scheduler=..., scheduler_kwargs=..., **server_args)`
RuntimeFactory = Callable[..., Any]


def start_runtime(
    factory: RuntimeFactory,
    args: ServerArgs,
    timeout: float,
    scheduler: str,
    scheduler_kwargs: dict[str, Any] | None,
) -> Any:
    """A worker runtime with these options; the router has its own connection to it."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    model = fields.pop("model")
    runtime = factory(model, start_timeout=timeout, scheduler=scheduler,
                      scheduler_kwargs=scheduler_kwargs, **fields)  # fmt: skip
    runtime.client.close()
    return runtime


def worker_device(device: str, index: int) -> str:
    """Worker `index`'s device: its own GPU when the workers run on "cuda" (worker i on cuda:i;
    start no more workers than GPUs), else the one given (the CPU, or a GPU named by index)."""
    return f"cuda:{index}" if device == "cuda" else device


class LocalWorkers(WorkerPool):
    def __init__(
        self,
        args: ServerArgs,
        factory: RuntimeFactory,
        scheduler: str,
        scheduler_kwargs: dict[str, Any] | None,
    ) -> None:
        self.factory = factory
        self.api_key = secrets.token_hex(16)
        self.args = worker_args(args, self.api_key)
        self.count = args.dp
        self.scheduler, self.scheduler_kwargs = scheduler, scheduler_kwargs
        self.runtimes: list[Any] = [None] * self.count
        self.lock = threading.Lock()

    def _start_one(self, index: int, timeout: float) -> str:
        args = dataclasses.replace(self.args, device=worker_device(self.args.device, index))
        runtime = start_runtime(self.factory, args, timeout, self.scheduler, self.scheduler_kwargs)
        with self.lock:
            self.runtimes[index] = runtime
        return runtime.endpoint

    def start(self, timeout: float) -> list[tuple[str, str]]:
        endpoints: list[str | None] = [None] * self.count
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                endpoints[i] = self._start_one(i, timeout)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.shutdown()
            raise errors[0]
        log.info("%d local workers, %d threads each", self.count, self.args.num_threads)
        return [(f"worker-{i}", e) for i, e in enumerate(endpoints) if e is not None]

    def restart(self, index: int, timeout: float) -> str | None:
        with self.lock:
            old, self.runtimes[index] = self.runtimes[index], None
        if old is not None:
            old.shutdown(timeout=5)
        return self._start_one(index, timeout)

    def shutdown(self) -> None:
        with self.lock:
            runtimes, self.runtimes = self.runtimes, [None] * self.count
        threads = [
            threading.Thread(target=r.shutdown, daemon=True) for r in runtimes if r is not None
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
