"""`radixkv launch --dp N --ray [ADDRESS]`: the workers as Ray actors (`pip install radixkv[ray]`).

Each actor holds one runtime process (`radixkv.Runtime`) on the node Ray placed it on, listening
on that node's address with the router's key, with `--ray-worker-cpus` / `--ray-worker-gpus`
reserved for it. Ray restarts an actor whose process died (`max_restarts=-1`); a runtime the
router lost is started again by its actor when the router asks (`WorkerActor.restart`, as local
workers are restarted). Ray carries only the launch
options and endpoints (its own transport); requests go from the router to the runtimes over ZMQ,
as with local workers.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from radixkv.config import ServerArgs
from radixkv.router.workers import RuntimeFactory, WorkerPool, start_runtime, worker_args

log = logging.getLogger("radixkv.router")


class WorkerActor:
    """One worker runtime, inside a Ray actor (wrapped by `ray.remote` in `RayWorkers.start`)."""

    def __init__(
        self,
        args: ServerArgs,
        factory: RuntimeFactory,
        scheduler: str,
        kwargs: dict[str, Any] | None,
        timeout: float,
    ) -> None:
        import ray

        host = ray.util.get_node_ip_address()
        self.args = dataclasses.replace(args, host=host)
        self.factory, self.scheduler, self.kwargs = factory, scheduler, kwargs
        self.timeout = timeout
        self.runtime: Any = None
        self._start()

    def _start(self) -> None:
        self.runtime = start_runtime(
            self.factory, self.args, self.timeout, self.scheduler, self.kwargs
        )

    def endpoint(self) -> str:
        """The runtime's endpoint, starting it again first if it died."""
        if self.runtime is None or self.runtime.process.poll() is not None:
            return self.restart()
        endpoint: str = self.runtime.endpoint
        return endpoint

    def restart(self) -> str:
        """A new runtime's endpoint, the old one shut down whatever its state. The router asks
        when it lost the connection, which it can see before the dying process can be reaped:
        restarting only a process `poll()` saw exit could hand the dead endpoint back."""
        if self.runtime is not None:
            self.runtime.shutdown(timeout=5)
        self._start()
        endpoint: str = self.runtime.endpoint
        return endpoint


class RayWorkers(WorkerPool):
    def __init__(
        self,
        args: ServerArgs,
        factory: RuntimeFactory,
        scheduler: str,
        scheduler_kwargs: dict[str, Any] | None,
    ) -> None:
        self.factory = factory
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"--ray needs Ray: pip install 'radixkv[ray]' ({exc})") from exc
        self.api_key = secrets.token_hex(16)
        threads = args.num_threads or max(1, int(args.ray_worker_cpus))
        # host: replaced in each actor by its node's address
        self.args = dataclasses.replace(worker_args(args, self.api_key), num_threads=threads)
        self.count = args.dp
        self.address = args.ray_address
        self.cpus, self.gpus = args.ray_worker_cpus, args.ray_worker_gpus
        self.scheduler, self.scheduler_kwargs = scheduler, scheduler_kwargs
        self.actors: list[Any] = []
        self.started_ray = False

    def start(self, timeout: float) -> list[tuple[str, str]]:
        import ray

        if not ray.is_initialized():
            address = None if self.address == "local" else self.address
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
            self.started_ray = True
        actor = ray.remote(WorkerActor).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=-1, max_task_retries=-1
        )
        self.actors = [
            actor.remote(self.args, self.factory, self.scheduler, self.scheduler_kwargs, timeout)
            for _ in range(self.count)
        ]
        endpoints = ray.get([a.endpoint.remote() for a in self.actors], timeout=timeout)
        log.info("%d Ray workers: %s", self.count, ", ".join(endpoints))
        return [(f"ray-worker-{i}", e) for i, e in enumerate(endpoints)]

    def restart(self, index: int, timeout: float) -> str | None:
        import ray

        endpoint: str = ray.get(self.actors[index].restart.remote(), timeout=timeout)
        return endpoint

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone
                log.debug("killing a Ray worker: %s", exc)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
