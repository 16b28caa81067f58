"""The router's connection to one worker: a DEALER to the worker's client endpoint (the router is
one client of it, sending token ids), a monitor of that connection, and a SUB to the worker's cache
events; with what the router knows of it: in the rotation or not, requests in flight, its prefix
tree, its last `Stats`."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from radixkv.protocol import (
    MAX_FRAME_BYTES,
    CacheEvents,
    Codec,
    Ready,
    Stats,
    WorkerStats,
    cache_events_codec,
)
from radixkv.router.tree import PrefixTree

log = logging.getLogger("radixkv.router")

HEARTBEAT_IVL_MS = 2000  # ZMTP heartbeats: a frozen or unreachable worker disconnects
HEARTBEAT_TIMEOUT_MS = 6000
_MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class WorkerLink:
    def __init__(
        self,
        ctx: zmq.Context,
        index: int,
        name: str,
        endpoint: str,
        *,
        events: bool,
        tree_tokens: int,
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.name = name  # stable across restarts (consistent hashing keys on it)
        self.use_events = events
        self.tree_tokens = tree_tokens
        self.tree = PrefixTree(None if events else tree_tokens)
        self.alive = False
        self.down_reason = "not connected yet"
        self.info: Ready | None = None
        self.in_flight: set[str] = set()  # router rids
        self.routed = 0
        self.stats: Stats | None = None
        self.last_heard = time.monotonic()
        self.next_probe = 0.0  # when to ask a worker out of the rotation who it is
        self.events_sock: zmq.Socket | None = None
        self.events_seq: int | None = None
        self.events_codec = cache_events_codec()
        self.connect(endpoint)

    def connect(self, endpoint: str) -> None:
        """(Re)connect to `endpoint`; the link joins the rotation when the worker answers the
        server-info request sent on connection."""
        self.endpoint = endpoint
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a worker not connected
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.monitor = sock.get_monitor_socket(_MONITORED)
        sock.connect(endpoint)
        self.sock = sock

    def close(self) -> None:
        self.close_events()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)

    def connection_closed(self) -> bool:
        """Read the connection's monitor events: whether it closed (a connection made asks the
        worker who it is at the next probe, once its handshake lets a send through)."""
        closed = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return closed
            if event["event"] == zmq.EVENT_CONNECTED:
                self.next_probe = 0.0
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                closed = True

    def read_replies(self, codec: Codec) -> list[Any]:
        """Every reply waiting from the worker (a malformed frame is logged and dropped)."""
        replies: list[Any] = []
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return replies
            try:
                replies.append(codec.decode(frame))
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("dropped a malformed reply from worker %s: %s", self.name, exc)
                continue
            self.last_heard = time.monotonic()

    def send(self, frame: bytes) -> bool:
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:  # not connected (IMMEDIATE) or full
            return False
        return True

    # ---- joining and leaving ------------------------------------------------------------------

    def join(self, ready: Ready) -> None:
        """The worker answered: into the rotation, its tree from scratch, its events followed."""
        self.info = ready
        self.alive = True
        self.down_reason = ""
        self.last_heard = time.monotonic()
        self.tree.clear()
        self.close_events()
        if self.use_events and ready.cache_events is not None:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(events_address(ready.cache_events, self.endpoint))
            self.events_sock = sock
            self.events_seq = None
            self.tree.max_tokens = None
        elif self.use_events:
            log.warning(
                "worker %s publishes no cache events (start it with --cache-events-port 0): the "
                "router's view of its cache is what it routed there",
                self.endpoint,
            )
            self.tree.max_tokens = self.tree_tokens

    def leave(self, reason: str) -> list[str]:
        """Out of the rotation; returns the rids that were in flight there (now lost)."""
        self.alive = False
        self.down_reason = reason
        self.tree.clear()
        self.close_events()
        lost, self.in_flight = sorted(self.in_flight), set()
        return lost

    def close_events(self) -> None:
        if self.events_sock is not None:
            self.events_sock.close(linger=0)
            self.events_sock = None

    # ---- cache events -------------------------------------------------------------------------

    def apply_events(self) -> None:
        """Apply every event batch waiting on the SUB socket to the tree."""
        sock = self.events_sock
        while sock is not None:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                batch: CacheEvents = self.events_codec.decode(frame)
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("dropped a malformed cache-event frame from %s: %s", self.name, exc)
                continue
            if self.events_seq is not None and batch.seq != self.events_seq + 1:
                log.warning(
                    "worker %s: cache events %d..%d were lost; its prefix tree restarts empty",
                    self.name, self.events_seq + 1, batch.seq - 1,
                )  # fmt: skip
                self.tree.clear()
            self.events_seq = batch.seq
            for event in batch.events:
                if event.kind == "stored":
                    self.tree.insert(event.tokens)
                elif event.kind == "removed":
                    self.tree.remove(event.tokens, event.keep)
                elif event.kind == "cleared":
                    self.tree.clear()

    def worker_stats(self) -> WorkerStats:
        return WorkerStats(
            worker=self.endpoint,
            alive=self.alive,
            in_flight=len(self.in_flight),
            routed=self.routed,
            stats=self.stats if self.alive else None,
        )


def events_address(published: str, worker_endpoint: str) -> str:
    """Where to subscribe to a worker's events: the address it bound, with a wildcard host
    replaced by the host the router reaches the worker on."""
    scheme, _, rest = published.partition("://")
    host, _, port = rest.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "*", ""):
        host = worker_endpoint.partition("://")[2].rpartition(":")[0]
    return f"{scheme}://{host}:{port}"
