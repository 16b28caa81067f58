"""Work the runtime loop hands to a thread, with the result handed back to the loop.

The runtime serves everyone from one thread; a large prompt's templating and tokenizing (the fast
tokenizer releases the GIL) would hold that thread up for everyone. `LoopWorker.submit(fn, done)`
runs `fn` on a worker thread and, when it finishes, `done(future)` on the loop: the worker queues
the callback and writes a byte to a socketpair whose read end the loop polls (`fd`), and the loop
calls `run_finished()` when it is readable. Nothing but the loop touches the loop's state.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("radixkv.runtime")


class LoopWorker:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._finished: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    @property
    def fd(self) -> int:
        """Readable when finished work waits for `run_finished()`."""
        return self._wake_r.fileno()

    def submit(self, fn: Callable[[], Any], done: Callable[[Future[Any]], None]) -> None:
        """Run `fn` on the worker thread, then `done(its future)` on the loop."""
        future = self._pool.submit(fn)
        future.add_done_callback(lambda f: self._post(lambda: done(f)))

    def run_finished(self) -> None:
        """Call on the loop when `fd` is readable: the callbacks of finished work, in order."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while not self._finished.empty():
            callback = self._finished.get_nowait()
            try:
                callback()
            except Exception:  # the loop goes on whatever one callback does
                log.exception("unexpected error finishing work handed to a thread")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()

    def _post(self, callback: Callable[[], None]) -> None:
        self._finished.put(callback)
        with contextlib.suppress(OSError):  # closed at shutdown: nothing waits for it any more
            self._wake_w.send(b"\0")
