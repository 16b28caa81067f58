"""Which client connections are gone, so the runtime can abort their requests.

libzmq's stable API does not tell a ROUTER which routing id disconnected (ROUTER_NOTIFY is a draft
option, absent from the wheels). So we combine two stable facilities:

- a socket monitor reports ACCEPTED(fd) and DISCONNECTED(fd) events;
- every received frame carries the fd of its connection (`Frame.get(zmq.SRCFD)`).

File descriptors are reused, so each fd gets a generation bumped on ACCEPTED; a routing id is
remembered with (fd, generation) and only DISCONNECTED of that generation makes it gone. The
monitor is drained *after* a frame is received and *before* its sender is recorded: the ACCEPTED
event of the sender's connection is queued before its first frame can arrive, so the generation
recorded is the right one. TCP keepalive-style ZMTP heartbeats on the ROUTER turn a silent peer
(lost network, frozen host) into a DISCONNECTED event as well.
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message

HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000


class PeerTracker:
    """Maps client routing ids to their connections and reports the ones that disconnected."""

    def __init__(self, router: zmq.Socket) -> None:
        self.router = router
        router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._generation: dict[int, int] = {}
        self._peer_of: dict[bytes, tuple[int, int]] = {}
        self._gone: list[bytes] = []

    def seen(self, identity: bytes, fd: int) -> None:
        """Record the connection a frame from `identity` arrived on (call for every frame)."""
        self.drain()
        if fd >= 0:
            self._peer_of[identity] = (fd, self._generation.get(fd, 0))

    def drain(self) -> None:
        """Process queued monitor events without blocking."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._generation[fd] = self._generation.get(fd, 0) + 1
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                key = (fd, self._generation.get(fd, 0))
                gone = [ident for ident, peer in self._peer_of.items() if peer == key]
                for ident in gone:
                    del self._peer_of[ident]
                self._gone.extend(gone)

    def take_gone(self) -> list[bytes]:
        """Routing ids whose connection closed since the last call."""
        self.drain()
        gone, self._gone = self._gone, []
        return gone

    def forget(self, identity: bytes) -> None:
        self._peer_of.pop(identity, None)

    def close(self) -> None:
        self.router.disable_monitor()
        self.monitor.close(linger=0)


def source_fd(frame: zmq.Frame) -> int:
    """The fd of the connection a frame came on, or -1 where libzmq cannot say (a peer speaking
    an old ZMTP version, raw bytes that are not ZMTP at all): such a peer is just not tracked."""
    try:
        return int(frame.get(zmq.SRCFD))
    except zmq.ZMQError:
        return -1
