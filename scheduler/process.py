"""The scheduler process: builds the model and KV hierarchy, then runs the event loop over ZMQ.

Loop: drain incoming messages without blocking (block briefly only when idle) → run one batch →
send the new tokens → when idle, check the invariants. It exits on `ShutdownRequest` or when its
parent process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback

import msgspec
import torch
import zmq

from radixkv.config import ServerArgs, setup_logging
from radixkv.mem import KVCacheManager, RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.mem.host_tier import HostTier
from radixkv.mem.storage import DiskStore
from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.loader import load_model
from radixkv.model.model_runner import ModelRunner, kv_layout
from radixkv.protocol import (
    AbortRequest,
    BatchOutput,
    CacheEvents,
    DemotePaths,
    Fatal,
    FlushCacheRequest,
    FlushReply,
    GetStatsRequest,
    Ready,
    ReqError,
    ShutdownRequest,
    StatsReply,
    TokenizedRequest,
    scheduler_codec,
)
from radixkv.scheduler.scheduler import RequestRejected, Scheduler

log = logging.getLogger("radixkv.scheduler")


def build_scheduler(args: ServerArgs, model: LlamaForCausalLM | None = None) -> Scheduler:
    """Load the model (unless given) and size the KV hierarchy from `args`."""
    if model is None:
        model = load_model(args.model, dtype=args.dtype, device=args.device)
    layout = kv_layout(model.config, args.kv_cache_dtype, model.dtype)
    if args.max_total_tokens is not None:
        slots = max(args.page_size, args.max_total_tokens // args.page_size * args.page_size)
        token_pool = TokenToKVPool(layout, slots, page_size=args.page_size, device=args.device)
    else:
        token_pool = TokenToKVPool.from_memory_budget(
            layout, args.kv_memory, page_size=args.page_size, device=args.device
        )
    context = args.max_context_len or min(model.config.max_position_embeddings, 8192)
    req_pool = ReqToTokenPool(args.max_running_requests, context, device=args.device)
    tree = RadixCache(
        token_pool, disable=args.disable_radix_cache, eviction_policy=args.radix_eviction_policy
    )
    host = None
    if args.kv_host_tier is not None:
        tier_dtype = args.kv_cache_dtype if args.kv_host_tier_dtype == "auto" else (
            args.kv_host_tier_dtype)  # fmt: skip
        tier_layout = kv_layout(model.config, tier_dtype, model.dtype)
        host_pool = TokenToKVPool.from_memory_budget(tier_layout, args.kv_host_tier,
                                                     page_size=args.page_size)  # fmt: skip
        host = HostTier(host_pool)
    backend = args.attention_backend
    if backend == "auto":
        backend = "triton" if torch.device(args.device).type == "cuda" else "torch"
    runner = ModelRunner(model, token_pool, req_pool, backend, deterministic=args.deterministic)
    if args.graph_max_bs is not None:
        try:
            runner.capture_decode_graphs(args.graph_max_bs)
        except Exception as exc:
            raise RuntimeError(
                f"capturing CUDA graphs for decode failed ({type(exc).__name__}: {exc}); "
                "--disable-cuda-graph decodes without them"
            ) from exc
    disk = None
    if args.kv_storage_dir is not None:
        disk = DiskStore(args.kv_storage_dir, token_pool, args.model, args.kv_storage_size)
    return Scheduler(args, runner, KVCacheManager(token_pool, req_pool, tree, host, disk))


class SchedulerLoop:
    """Owns the sockets; translates messages into Scheduler calls and outputs into messages."""

    def __init__(
        self,
        scheduler: Scheduler,
        recv: zmq.Socket,
        send: zmq.Socket,
        events: zmq.Socket | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.recv = recv
        self.send = send
        self.events = events  # PUB: the radix tree's stored/removed paths, for a router
        self.events_seq = 0
        self.codec = scheduler_codec()
        self.encoder = msgspec.msgpack.Encoder()
        self.parent = os.getppid()
        self.dropped_frames = 0
        self.running = True

    def run(self) -> None:
        last_parent_check = time.monotonic()
        while self.running:
            idle = not self.scheduler.has_work()
            # only a grammar compiling on its thread: look again soon, without spinning
            self._drain(block_ms=200 if idle else 2 if self.scheduler.only_compiling() else 0)
            if not self.running:
                break
            outputs = self.scheduler.step()
            if outputs:
                self.send.send(self.encoder.encode(BatchOutput(outputs)))
            for error in self.scheduler.take_rejected():
                self.send.send(self.encoder.encode(error))
            if self.events is not None:
                self._publish_events(self.events)
            if time.monotonic() - last_parent_check > 1.0:
                last_parent_check = time.monotonic()
                if os.getppid() != self.parent:
                    log.error("parent process is gone; scheduler exiting")
                    return

    def _publish_events(self, events: zmq.Socket) -> None:
        """The tree's stored/removed paths since the last step, as one numbered message (a PUB
        drops rather than blocks: a subscriber that falls behind sees a gap in `seq`)."""
        batch = self.scheduler.mgr.tree.take_events()
        if batch:
            self.events_seq += 1
            with contextlib.suppress(zmq.Again):
                events.send(self.encoder.encode(CacheEvents(self.events_seq, batch)), zmq.NOBLOCK)

    def _drain(self, block_ms: int) -> None:
        if block_ms and not self.recv.poll(block_ms):
            return
        while True:
            try:
                frame = self.recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = self.codec.decode(frame)
            except (msgspec.DecodeError, ValueError) as exc:
                self.dropped_frames += 1
                log.warning("dropped a malformed frame from the runtime: %s", exc)
                continue
            self._handle(msg)
            if not self.running:
                return

    def _handle(self, msg: object) -> None:
        sched = self.scheduler
        if isinstance(msg, TokenizedRequest):
            try:
                sched.add_request(msg.rid, msg.input_ids, msg.sampling, msg.cache_salt)
            except RequestRejected as exc:
                error = ReqError(rid=msg.rid, message=str(exc), code=exc.code, param=exc.param)
                self.send.send(self.encoder.encode(error))
        elif isinstance(msg, AbortRequest):
            outputs = sched.abort(msg.rid)
            if outputs:
                self.send.send(self.encoder.encode(BatchOutput(outputs)))
        elif isinstance(msg, FlushCacheRequest):
            ok, message = sched.flush_cache()
            self.send.send(self.encoder.encode(FlushReply(rid=msg.rid, ok=ok, message=message)))
        elif isinstance(msg, GetStatsRequest):
            self.send.send(self.encoder.encode(StatsReply(rid=msg.rid, stats=sched.get_stats())))
        elif isinstance(msg, DemotePaths):
            sched.demote(msg.keys, msg.shared)
        elif isinstance(msg, ShutdownRequest):
            self.running = False


def run_scheduler(args: ServerArgs, in_addr: str, out_addr: str) -> None:
    """Process entry point: connect to the runtime, load, send Ready (or Fatal), serve."""
    setup_logging(args.log_level)
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.connect(in_addr)
    send = ctx.socket(zmq.PUSH)
    send.setsockopt(zmq.LINGER, 2000)
    send.connect(out_addr)
    encoder = msgspec.msgpack.Encoder()
    events: zmq.Socket | None = None
    try:
        if args.num_threads is not None:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        scheduler = build_scheduler(args)
        if args.cache_events_port is not None:
            events = ctx.socket(zmq.PUB)
            events.setsockopt(zmq.LINGER, 0)
            events.setsockopt(zmq.SNDHWM, 100_000)
            events.bind(f"tcp://{args.host}:{args.cache_events_port or '*'}")
            scheduler.mgr.tree.record_events()
    except Exception as exc:  # the runtime must hear why, not wait for a dead child
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        send.send(encoder.encode(Fatal(message=f"scheduler failed to start: {detail}")))
        if events is not None:
            events.close()
        recv.close(linger=0)
        send.close()
        ctx.term()
        raise SystemExit(1) from exc
    runner, pool = scheduler.runner, scheduler.mgr.token_pool
    log.info(
        "KV cache: %d slots (page %d, %s%s, %d bytes per token, %.1f MiB), %d request rows x "
        "%d positions", pool.capacity, pool.page_size, pool.layout.dtype,
        " codes + bf16 scale per token and KV head" if pool.layout.quantized else "",
        pool.layout.bytes_per_token, pool.memory_bytes / 2**20, scheduler.mgr.req_pool.size,
        scheduler.mgr.req_pool.max_context_len,
    )  # fmt: skip
    if scheduler.mgr.host is not None:
        tier = scheduler.mgr.host.pool
        log.info("KV host tier: %d slots (%s, %d bytes per token, %.1f MiB) in host memory",
                 tier.capacity, tier.layout.dtype, tier.layout.bytes_per_token,
                 tier.memory_bytes / 2**20)  # fmt: skip
    ready = Ready(
        model=args.model,
        kv_capacity=pool.capacity,
        page_size=pool.page_size,
        max_context_len=scheduler.mgr.req_pool.max_context_len,
        max_running_requests=scheduler.mgr.req_pool.size,
        dtype=str(runner.dtype).removeprefix("torch."),
        eos_token_ids=sorted(runner.config.eos_token_ids),
        cache_events=events.getsockopt_string(zmq.LAST_ENDPOINT) if events is not None else None,
    )
    send.send(encoder.encode(ready))
    try:
        SchedulerLoop(scheduler, recv, send, events).run()
    finally:
        if events is not None:
            events.close()
        recv.close(linger=0)
        send.close()
        ctx.term()
