"""The router process: the client endpoint of a runtime (same protocol, same HTTP API), in front of
data-parallel workers, each a whole runtime.

A request is tokenized and validated once, here (`endpoint.ClientEndpoint`), exactly as a single
runtime would; the router picks a worker (`policy`) and forwards the token ids; the worker's
chunks, result or error come back under the client's request id. Stats and flush go to every
worker (the stats add up, with each worker's own under `Stats.workers`). A worker that
disconnects or stops answering heartbeats leaves the rotation and its in-flight requests fail with
a clear error; when it answers again (restarted by its pool, or back at its endpoint) it rejoins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from radixkv.config import ServerArgs
from radixkv.frontend.endpoint import ClientEndpoint
from radixkv.frontend.loop_worker import LoopWorker
from radixkv.protocol import (
    AbortRequest,
    DemoteRequest,
    ErrorReply,
    FlushCacheRequest,
    FlushReply,
    GenerateRequest,
    GenerateResult,
    GetServerInfoRequest,
    GetStatsRequest,
    Ready,
    ServerInfoReply,
    StatsReply,
    TokenChunk,
    reply_codec,
    tree_key,
)
from radixkv.router.gather import Gather, merged_ready, merged_reply
from radixkv.router.links import WorkerLink
from radixkv.router.policy import Candidate, make_policy
from radixkv.router.workers import WorkerPool

log = logging.getLogger("radixkv.router")

HEARTBEAT_INTERVAL = 1.0  # seconds between the router's stats requests to each worker


@dataclass(slots=True)
class Routed:
    identity: bytes
    rid: str  # the client's
    link: WorkerLink
    offset: float  # seconds from arrival here to the forward (tokenizing, routing)
    key: list[int]  # its radix-tree key
    last_token_at: float | None = None


class RouterServer(ClientEndpoint):
    def __init__(self, args: ServerArgs, pool: WorkerPool) -> None:
        super().__init__(args)
        self.pool = pool
        self.policy = make_policy(args)
        self.links: list[WorkerLink] = []
        self.requests: dict[str, Routed] = {}  # router rid -> request
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.gathers: dict[str, Gather] = {}
        self.replies = reply_codec()
        self.supervisor = LoopWorker("radixkv-workers")  # restarts, off the loop
        self.next_heartbeat = 0.0

    # ---- start-up -----------------------------------------------------------------------------

    def _start_backend(self, timeout: float) -> Ready:
        deadline = time.monotonic() + timeout
        for i, (name, endpoint) in enumerate(self.pool.start(timeout)):
            link = WorkerLink(self.ctx, i, name, endpoint, events=self.args.router_cache_events,
                              tree_tokens=self.args.router_tree_tokens)  # fmt: skip
            self.links.append(link)
            self.poller.register(link.sock, zmq.POLLIN)
            self.poller.register(link.monitor, zmq.POLLIN)
        self.poller.register(self.supervisor.fd, zmq.POLLIN)
        while time.monotonic() < deadline and not all(link.alive for link in self.links):
            self._on_backend(dict(self.poller.poll(100)))
            if self.stopping.is_set():
                raise RuntimeError("stopped while waiting for the workers")
        up = [link for link in self.links if link.alive]
        if not up:
            endpoints = ", ".join(link.endpoint for link in self.links)
            raise RuntimeError(
                f"none of the {len(self.links)} workers answered within {timeout:.0f} s: "
                f"{endpoints}"
            )
        for link in self.links:
            if not link.alive:
                log.warning("worker %s is not answering; it joins when it does", link.endpoint)
        return merged_ready([link.info for link in up if link.info is not None])

    def describe(self) -> str:
        up = sum(link.alive for link in self.links)
        events = "cache events" if self.args.router_cache_events else "no cache events"
        return f"{up} of {len(self.links)} workers, policy {self.args.router_policy}, {events}"

    def _close_backend(self) -> None:
        self.supervisor.close()
        for link in self.links:
            link.close()
        self.pool.shutdown()

    # ---- the loop's backend turn --------------------------------------------------------------

    def _on_backend(self, events: dict[Any, int]) -> None:
        if self.supervisor.fd in events:
            self.supervisor.run_finished()
        for link in self.links:
            try:
                self._on_link(link, events)
            except Exception:  # the one guard: a worker's odd reply must not stop the router
                log.exception("unexpected error handling worker %s; the loop goes on", link.name)
        now = time.monotonic()
        for link in self.links:
            if not link.alive and now >= link.next_probe:
                sent = link.send(self._to_worker(GetServerInfoRequest(rid="info")))
                link.next_probe = now + (HEARTBEAT_INTERVAL if sent else 0.05)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_INTERVAL
            for link in self.links:
                if link.alive and now - link.last_heard > self.args.worker_timeout:
                    silent = f"answered no heartbeat for {self.args.worker_timeout:.0f} s"
                    self._worker_down(link, silent)
                elif link.alive:
                    link.send(self._to_worker(GetStatsRequest(rid="hb")))

    def _on_link(self, link: WorkerLink, events: dict[Any, int]) -> None:
        if link.monitor in events and link.connection_closed() and link.alive:
            self._worker_down(link, "its connection closed")
        if link.sock in events:
            for reply in link.read_replies(self.replies):
                self._on_reply(link, reply)
        if link.events_sock is not None and link.events_sock in events:
            link.apply_events()

    def _to_worker(self, msg: Any) -> bytes:
        return self.encoder.encode(msgspec.structs.replace(msg, api_key=self.pool.api_key))

    def _on_reply(self, link: WorkerLink, reply: Any) -> None:
        if isinstance(reply, ServerInfoReply):
            if not link.alive:  # (a second probe's answer changes nothing)
                self._worker_up(link, reply.ready)
        elif isinstance(reply, ErrorReply) and reply.rid in ("info", "hb"):
            log.error("worker %s refuses the router: %s", link.endpoint, reply.message)
        elif isinstance(reply, StatsReply) and reply.rid == "hb":
            link.stats = reply.stats
        elif isinstance(reply, (StatsReply, FlushReply, ErrorReply)) and reply.rid in self.gathers:
            self._gathered(reply.rid, link.index, reply)
        elif isinstance(reply, (TokenChunk, GenerateResult, ErrorReply)):
            self._relay(link, reply)

    def _relay(self, link: WorkerLink, reply: TokenChunk | GenerateResult | ErrorReply) -> None:
        routed = self.requests.get(reply.rid)
        if routed is None:
            return  # aborted, or its client left
        now = time.perf_counter()
        if isinstance(reply, TokenChunk) and reply.token_ids and self.metrics is not None:
            if routed.last_token_at is not None:
                gap = (now - routed.last_token_at) / len(reply.token_ids)
                self.metrics.observe_token_gap(gap)
            routed.last_token_at = now
        if isinstance(reply, GenerateResult):
            meta = reply.meta
            meta = msgspec.structs.replace(
                meta, ttft=meta.ttft + routed.offset, latency=meta.latency + routed.offset
            )
            reply = msgspec.structs.replace(reply, meta=meta)
        self._reply(routed.identity, msgspec.structs.replace(reply, rid=routed.rid))
        if isinstance(reply, GenerateResult):
            self.sessions.finish((routed.identity, routed.rid), reply.token_ids)
        if not isinstance(reply, TokenChunk):
            self._forget(reply.rid)
            if self.metrics is not None:
                if isinstance(reply, GenerateResult):
                    self.metrics.observe_result(reply)
                else:
                    self.metrics.observe_end("error")

    # ---- workers joining and leaving ----------------------------------------------------------

    def _worker_up(self, link: WorkerLink, ready: Ready) -> None:
        others = [other.info for other in self.links if other is not link]
        first = next((info for info in others if info is not None), None)
        if first is not None and ready.model != first.model:
            log.error("worker %s serves %r, not %r: kept out of the rotation", link.endpoint,
                      ready.model, first.model)  # fmt: skip
            return
        rejoined = link.info is not None
        link.join(ready)
        if link.events_sock is not None:
            self.poller.register(link.events_sock, zmq.POLLIN)
        log.info("worker %s %s the rotation (KV cache %d tokens)", link.name,
                 "rejoined" if rejoined else "joined", ready.kv_capacity)  # fmt: skip

    def _worker_down(self, link: WorkerLink, reason: str) -> None:
        if link.events_sock is not None:
            self.poller.unregister(link.events_sock)
        lost = link.leave(reason)
        message = (
            f"worker {link.name} ({link.endpoint}) left the rotation: {reason}; the request was "
            "lost (new requests go to the other workers)"
        )
        log.error("worker %s left the rotation (%s); %d requests in flight there failed",
                  link.name, reason, len(lost))  # fmt: skip
        for rid in lost:
            routed = self._forget(rid)
            if routed is not None:
                self._error(routed.identity, routed.rid, message, "unavailable")
                if self.metrics is not None:
                    self.metrics.observe_end("error")
        for rid in [r for r, g in self.gathers.items() if link.index in g.waiting]:
            self._gathered(rid, link.index, None)
        timeout = 600.0

        def restart() -> str | None:
            return self.pool.restart(link.index, timeout)

        def restarted(done: Any) -> None:
            try:
                endpoint = done.result()
            except Exception as exc:
                log.error("restarting worker %s failed: %s", link.name, exc)
                return
            if endpoint is not None and not self.stopping.is_set():
                self.poller.unregister(link.sock)
                self.poller.unregister(link.monitor)
                link.close()
                link.connect(endpoint)
                self.poller.register(link.sock, zmq.POLLIN)
                self.poller.register(link.monitor, zmq.POLLIN)

        if not self.stopping.is_set():
            self.supervisor.submit(restart, restarted)

    # ---- requests -----------------------------------------------------------------------------

    def _in_flight(self) -> int:
        return len(self.requests)

    def _has_request(self, key: tuple[bytes, str]) -> bool:
        return key in self.by_client

    def _admit(self, identity: bytes, msg: GenerateRequest, ids: list[int], arrival: float) -> None:
        up = [link for link in self.links if link.alive]
        if not up:
            why = "; ".join(f"{link.name}: {link.down_reason}" for link in self.links)
            self._error(identity, msg.rid, f"no worker is serving ({why})", "unavailable")
            return
        salt = self._cache_salt(msg)
        key = tree_key(ids, salt)
        candidates = [
            Candidate(w.index, w.name, len(w.in_flight), w.tree, self._keys_of(w)) for w in up
        ]
        pick, reason = self.policy.choose(key, candidates)
        link = self.links[pick.index]
        rid = str(next(self.rids))
        forward = GenerateRequest(rid=rid, input_ids=ids, sampling=msg.sampling,
                                  stream=msg.stream, cache_salt=salt)  # fmt: skip
        if not link.send(self._to_worker(forward)):
            self._error(identity, msg.rid, f"worker {link.name} is not reachable", "unavailable")
            return
        log.debug("request %s -> %s: %s", msg.rid, link.name, reason)
        self.requests[rid] = Routed(identity, msg.rid, link, time.perf_counter() - arrival, key)
        self.by_client[(identity, msg.rid)] = rid
        link.in_flight.add(rid)
        link.routed += 1
        if self.policy.uses_trees:
            link.tree.insert(key)

    def _keys_of(self, link: WorkerLink) -> Callable[[], list[list[int]]]:
        """The keys of the requests in flight at `link`, when a policy asks."""
        return lambda: [self.requests[rid].key for rid in link.in_flight]

    def _demote(self, paths: list[list[int]], shared: list[int], salt: str | None) -> None:
        """A closed session's paths: every worker that may hold them is told (the router's
        view of a worker's tree may be stale, so all of them; a worker holding none of a path
        changes nothing), salted as the session's requests were forwarded."""
        demote = DemoteRequest(paths=paths, shared=shared, cache_salt=salt)
        frame = self._to_worker(demote)
        for link in self.links:
            if link.alive:
                link.send(frame)

    def _forget(self, rid: str) -> Routed | None:
        routed = self.requests.pop(rid, None)
        if routed is not None:
            self.by_client.pop((routed.identity, routed.rid), None)
            self.sessions.drop((routed.identity, routed.rid))  # unless it finished
            routed.link.in_flight.discard(rid)
        return routed

    def _abort(self, identity: bytes, client_rid: str) -> None:
        rid = self.by_client.get((identity, client_rid))
        if rid is not None:
            self.requests[rid].link.send(self._to_worker(AbortRequest(rid=rid)))

    def _client_gone(self, identity: bytes) -> None:
        for (ident, _), rid in list(self.by_client.items()):
            if ident == identity:
                routed = self._forget(rid)
                if routed is not None:
                    routed.link.send(self._to_worker(AbortRequest(rid=rid)))
                if self.metrics is not None:
                    self.metrics.observe_end("abort")

    # ---- stats and flush: every worker --------------------------------------------------------

    def _control(self, identity: bytes, msg: FlushCacheRequest | GetStatsRequest) -> None:
        rid = f"g{next(self.rids)}"
        up = [link for link in self.links if link.alive]
        kind = FlushCacheRequest if isinstance(msg, FlushCacheRequest) else GetStatsRequest
        self.gathers[rid] = Gather(identity, msg.rid, kind, {link.index for link in up}, {})
        for link in up:
            if not link.send(self._to_worker(kind(rid=rid))):
                self.gathers[rid].waiting.discard(link.index)
        if not self.gathers[rid].waiting:
            self._finish_gather(rid)

    def _gathered(self, rid: str, index: int, reply: Any) -> None:
        gather = self.gathers[rid]
        gather.waiting.discard(index)
        if reply is not None:
            gather.replies[index] = reply
        if not gather.waiting:
            self._finish_gather(rid)

    def _finish_gather(self, rid: str) -> None:
        gather = self.gathers.pop(rid)
        self._reply(gather.identity, merged_reply(gather, self.links))

    def _fail_all(self, message: str, code: str) -> None:
        for routed in self.requests.values():
            self._error(routed.identity, routed.rid, message, code)
            self.sessions.drop((routed.identity, routed.rid))
            routed.link.in_flight.clear()
        for gather in self.gathers.values():
            self._error(gather.identity, gather.rid, message, code)
        self._fail_tokenizing(message, code)
        self.requests.clear()
        self.by_client.clear()
        self.gathers.clear()
