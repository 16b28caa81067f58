"""What a router merges from its workers: stats and flush calls (sent to every worker in the
rotation, their replies merged into one; a worker that leaves meanwhile is not waited for), and
the workers' `Ready`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from radixkv.protocol import FlushReply, GetStatsRequest, Ready, Stats, StatsReply
from radixkv.router.links import WorkerLink


@dataclass(slots=True)
class Gather:
    """A stats or flush call sent to every worker, waiting for their replies."""

    identity: bytes
    rid: str  # the client's
    kind: type  # FlushCacheRequest | GetStatsRequest
    waiting: set[int]  # worker indices
    replies: dict[int, Any]


def merged_reply(gather: Gather, links: list[WorkerLink]) -> StatsReply | FlushReply:
    """Stats: the workers' added up, with each worker's own (`Stats.workers`). Flush: ok when
    every worker flushed; otherwise which could not, and why."""
    replies = gather.replies
    if gather.kind is GetStatsRequest:
        for index, reply in replies.items():
            if isinstance(reply, StatsReply):
                links[index].stats = reply.stats
        total = sum_stats([r.stats for r in replies.values() if isinstance(r, StatsReply)])
        total.workers = [link.worker_stats() for link in links]
        return StatsReply(rid=gather.rid, stats=total)
    failures = [
        f"{links[i].name}: {r.message}"
        for i, r in replies.items()
        if not (isinstance(r, FlushReply) and r.ok)
    ]
    if not replies:
        failures.append("no worker is serving")
    for index, reply in replies.items():
        if isinstance(reply, FlushReply) and reply.ok and not links[index].use_events:
            links[index].tree.clear()  # (with events, the worker's "cleared" does it)
    return FlushReply(rid=gather.rid, ok=not failures, message="; ".join(failures))


def merged_ready(infos: list[Ready]) -> Ready:
    """What the router reports as its `Ready`: the workers' capacities added up, the smallest
    context length (a request must fit wherever it goes)."""
    return msgspec.structs.replace(
        infos[0],
        kv_capacity=sum(i.kv_capacity for i in infos),
        max_running_requests=sum(i.max_running_requests for i in infos),
        max_context_len=min(i.max_context_len for i in infos),
        cache_events=None,
    )


def sum_stats(parts: list[Stats]) -> Stats:
    """The fields of several workers' Stats added up."""
    total = Stats()
    for s in parts:
        for name in Stats.__struct_fields__:
            value = getattr(s, name)
            if isinstance(value, (int, float)):
                setattr(total, name, getattr(total, name) + value)
        for reason, count in s.finished.items():
            total.finished[reason] = total.finished.get(reason, 0) + count
    return total
