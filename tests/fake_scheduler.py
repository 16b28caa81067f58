"""A stand-in scheduler process speaking the real protocol, for front-end tests without a model.

Each request "generates" its own prompt again, one token per step (token i of the output is
prompt token i mod prompt length), so a test controls the output text through the prompt. It
honours max_new_tokens, stop token ids, EOS (unless ignore_eos), abort, stats and flush; it reports
half the prompt as cached (none for a request with a cache_salt, so tests see it arrive).
`mode="fatal"` fails start-up, `mode="silent"` never sends Ready; `crash_on` makes it die
(os._exit) when a request arrives with exactly those prompt ids.
"""

from __future__ import annotations

import os
import time

import msgspec
import zmq

from radixkv.config import ServerArgs
from radixkv.protocol import (
    AbortRequest,
    BatchOutput,
    DemotePaths,
    Fatal,
    FlushCacheRequest,
    FlushReply,
    GetStatsRequest,
    Ready,
    ReqError,
    ReqOutput,
    ShutdownRequest,
    Stats,
    StatsReply,
    TokenizedRequest,
    scheduler_codec,
)

EOS = 2
CONTEXT = 4096
REFUSE_PROMPT = (7, 7, 7)  # this prompt is refused with ReqError


def cached(msg: TokenizedRequest) -> int:
    return 0 if msg.cache_salt is not None else len(msg.input_ids) // 2


class _Req(msgspec.Struct):
    msg: TokenizedRequest
    out: int = 0


def run_fake_scheduler(
    args: ServerArgs,
    in_addr: str,
    out_addr: str,
    mode: str = "ok",
    step_delay: float = 0.004,
    crash_on: tuple[int, ...] = (),
) -> None:
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.connect(in_addr)
    send = ctx.socket(zmq.PUSH)
    send.setsockopt(zmq.LINGER, 1000)
    send.connect(out_addr)
    enc = msgspec.msgpack.Encoder()
    codec = scheduler_codec()
    if mode == "fatal":
        send.send(enc.encode(Fatal(message="fake scheduler: the model file is corrupt")))
        recv.close(linger=0)
        send.close()
        ctx.term()
        raise SystemExit(1)
    parent = os.getppid()
    while mode == "silent" and os.getppid() == parent:  # never ready
        time.sleep(0.1)
    send.send(
        enc.encode(
            Ready(
                model=args.model, kv_capacity=8192, page_size=args.page_size,
                max_context_len=args.max_context_len or CONTEXT, max_running_requests=16,
                dtype="float32", eos_token_ids=[EOS],
            )
        )
    )  # fmt: skip
    reqs: dict[str, _Req] = {}
    stats = Stats(kv_capacity=8192)

    def finish(rid: str, tokens: list[int], reason: str) -> ReqOutput:
        r = reqs.pop(rid)
        stats.finished[reason] = stats.finished.get(reason, 0) + 1
        n = len(r.msg.input_ids)
        return ReqOutput(rid, tokens, reason, n, cached(r.msg))

    while True:
        if os.getppid() != parent:
            return
        if recv.poll(int(step_delay * 1000) if reqs else 50):
            msg = codec.decode(recv.recv())
            if isinstance(msg, TokenizedRequest):
                if crash_on and tuple(msg.input_ids) == tuple(crash_on):
                    os._exit(3)
                if tuple(msg.input_ids) == REFUSE_PROMPT:
                    send.send(enc.encode(ReqError(rid=msg.rid, message="fake: never fits")))
                    continue
                reqs[msg.rid] = _Req(msg)
                stats.requests += 1
                stats.prompt_tokens += len(msg.input_ids)
                stats.cached_tokens += cached(msg)
            elif isinstance(msg, AbortRequest):
                if msg.rid in reqs:
                    send.send(enc.encode(BatchOutput([finish(msg.rid, [], "abort")])))
            elif isinstance(msg, GetStatsRequest):
                stats.running = len(reqs)
                send.send(enc.encode(StatsReply(rid=msg.rid, stats=stats)))
            elif isinstance(msg, FlushCacheRequest):
                busy = f"cannot flush the cache with {len(reqs)} requests in flight"
                reply = FlushReply(rid=msg.rid, ok=not reqs, message=busy if reqs else "")
                send.send(enc.encode(reply))
            elif isinstance(msg, DemotePaths):  # counted, so that tests see it arrive
                stats.demoted_tokens += sum(
                    len(k) - n for k, n in zip(msg.keys, msg.shared, strict=True)
                )
            elif isinstance(msg, ShutdownRequest):
                break
            continue
        outputs = []
        for rid, r in list(reqs.items()):
            ids, sp = r.msg.input_ids, r.msg.sampling
            token = ids[r.out % len(ids)]
            r.out += 1
            stats.generated_tokens += 1
            if token in sp.stop_token_ids or (token == EOS and not sp.ignore_eos):
                outputs.append(finish(rid, [token], "stop"))
            elif r.out >= sp.max_new_tokens:
                outputs.append(finish(rid, [token], "length"))
            else:
                n = len(ids)
                outputs.append(ReqOutput(rid, [token], None, n, cached(r.msg)))
        if outputs:
            send.send(enc.encode(BatchOutput(outputs)))
    recv.close(linger=0)
    send.close()
    ctx.term()
