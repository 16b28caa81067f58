"""The scheduler as a child process of the runtime: spawn, ready handshake, liveness, shutdown.

The runtime binds both ends of the scheduler channel as `ipc://` sockets in a private (0700)
temporary directory, which it removes on shutdown. The directory names its owner (an `owner` file
with the runtime's pid), so a runtime that was killed (-9) and left one behind is cleaned up by
the next runtime to start.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from radixkv.config import ServerArgs
from radixkv.protocol import Fatal, Ready, ShutdownRequest, scheduler_reply_codec

DEFAULT_SCHEDULER = "radixkv.scheduler.process:run_scheduler"
IPC_PREFIX = "radixkv-"
log = logging.getLogger("radixkv.runtime")


class SchedulerStartError(RuntimeError):
    """The scheduler process could not start (its own message, or how it died)."""


def _scheduler_main(
    entry: str, kwargs: dict[str, Any], args: ServerArgs, in_addr: str, out_addr: str
) -> None:
    """Child entry: resolve "module:function" here, so the runtime never imports the model.
    The function is called as `f(args, in_addr, out_addr, **kwargs)`."""
    module, _, name = entry.partition(":")
    function = getattr(importlib.import_module(module), name)
    function(args, in_addr, out_addr, **kwargs)


def describe_exit(code: int | None) -> str:
    """How a child process ended, from its exit code (negative: killed by that signal)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def spawn_ignoring_sigint(process: multiprocessing.process.BaseProcess) -> None:
    """Start `process` with SIGINT ignored: Ctrl-C in a terminal reaches the whole process group,
    and the parent, not the child, decides how to stop (a spawned Python keeps an inherited
    SIG_IGN for SIGINT instead of raising KeyboardInterrupt)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: cannot touch signals, start as is
        process.start()
        return
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_ipc_dirs(tmp: Path | None = None) -> list[Path]:
    """Remove the ipc directories of runtimes that no longer run (their owner pid is gone); a
    directory without an owner file, or whose owner lives, is left alone. Returns those removed."""
    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{IPC_PREFIX}*"):
        try:
            pid = int((path / "owner").read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (unreadable, another user's, or still being created)
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d ipc directories left by runtimes that were killed", len(removed))
    return removed


class SchedulerChild:
    """Owns the scheduler process and the runtime's two sockets to it."""

    def __init__(
        self,
        ctx: zmq.Context,
        args: ServerArgs,
        entry: str = DEFAULT_SCHEDULER,
        entry_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.args = args
        self.ipc_dir = Path(tempfile.mkdtemp(prefix=IPC_PREFIX))  # mode 0700
        (self.ipc_dir / "owner").write_text(str(os.getpid()))
        in_addr = f"ipc://{self.ipc_dir}/to_scheduler"
        out_addr = f"ipc://{self.ipc_dir}/from_scheduler"
        self.to_scheduler = ctx.socket(zmq.PUSH)
        self.to_scheduler.setsockopt(zmq.SNDHWM, 0)
        self.to_scheduler.bind(in_addr)
        self.from_scheduler = ctx.socket(zmq.PULL)
        self.from_scheduler.setsockopt(zmq.RCVHWM, 0)
        self.from_scheduler.bind(out_addr)
        self.codec = scheduler_reply_codec()
        self.encoder = msgspec.msgpack.Encoder()
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=_scheduler_main,
            args=(entry, entry_kwargs or {}, args, in_addr, out_addr),
            name="radixkv-scheduler",
            daemon=True,
        )
        self.ready = False  # set by wait_ready; before it the child does not read its socket

    def start(self) -> None:
        spawn_ignoring_sigint(self.process)

    def alive(self) -> bool:
        return self.process.is_alive()

    def exit_description(self) -> str:
        return describe_exit(self.process.exitcode)

    def wait_ready(self, timeout: float, keep_waiting: Callable[[], bool] = lambda: True) -> Ready:
        """Block until the scheduler sends Ready; raise SchedulerStartError on Fatal, on its death
        or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while keep_waiting():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SchedulerStartError(
                    f"the scheduler did not become ready within {timeout:.0f} s "
                    "(loading the model took too long; raise the start-up timeout)"
                )
            dead = not self.process.is_alive()  # checked first: its last message is queued
            if self.from_scheduler.poll(int(min(left, 0.2) * 1000)):
                msg = self._recv()
                if isinstance(msg, Ready):
                    self.ready = True
                    return msg
                if isinstance(msg, Fatal):
                    raise SchedulerStartError(msg.message)
            elif dead:
                raise SchedulerStartError(
                    f"the scheduler process died during start-up ({self.exit_description()}); "
                    "see its log above"
                )
        raise SchedulerStartError("start-up was interrupted")

    def _recv(self) -> Any:
        try:
            return self.codec.decode(self.from_scheduler.recv())
        except (msgspec.DecodeError, ValueError):
            return None

    def send(self, message: msgspec.Struct) -> bool:
        """Queue a message for the scheduler; False if it cannot be queued (scheduler gone)."""
        try:
            self.to_scheduler.send(self.encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the scheduler to exit, then terminate/kill it if it does not; remove the ipc dir.
        A scheduler that never became ready is terminated at once: it is not reading messages."""
        if self.ready and self.process.is_alive():
            self.send(ShutdownRequest())
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        self.to_scheduler.close(linger=0)
        self.from_scheduler.close(linger=0)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
