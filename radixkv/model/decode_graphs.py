"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket (SGLang's and vLLM's
CUDA graph runners do the same).

A decode step of a small model on a GPU is bound by launches, not by work: about a dozen kernels a
layer, each a few microseconds of GPU time and as much of Python and driver time to launch. A graph
captured once per batch size replays the whole step with one launch.

Every graph reads its inputs from the same static buffers of `max_bs` entries (token, position,
request row, sequence length, KV slot). A batch of `bs` requests runs the graph of the smallest
bucket `B >= bs`: its tensors are copied into the first `bs` entries and entries `bs..B` are
padding that touches nothing real: request row 0 (never handed out; its zeros point at the padding
slot), sequence length 1, and the new K/V written to slot 0 (the pool's reserved padding page). The
attention backend's per-batch metadata is computed inside the graph from the buffers; its decode
split count is fixed per bucket, chosen for the longest context the request rows allow. Every
graph copies its logits into one shared buffer: `replay` returns a view of it, valid until the next
replay.

On a machine without a GPU there is nothing to capture: `mode="eager"` runs the same buffers,
buckets and padding and, on replay, the step again into the same logits buffer. That is what the
CPU test suite checks (tests/test_decode_graphs.py, through the Triton interpreter); the capture
itself runs on a GPU in `bench/gpu_check.py`.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from radixkv.model.attention import AttentionBackend
from radixkv.model.forward_batch import ForwardBatch, ForwardMode
from radixkv.model.llama import LlamaForCausalLM

log = logging.getLogger("radixkv.model")

MODES = ("cuda", "eager")
WARMUP_RUNS = 2  # before a capture: Triton compiles, cuBLAS picks its kernels, allocations settle
Step = Callable[[], torch.Tensor]


def graph_batch_sizes(max_bs: int) -> list[int]:
    """The buckets captured: 1, 2, 4, 8, then every multiple of 8 up to `max_bs`, and `max_bs`
    (a batch pads to the next bucket: at most 7 wasted rows past 8)."""
    if max_bs < 1:
        raise ValueError(f"max_bs must be >= 1, got {max_bs}")
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs, 8))
    return [*sizes, max_bs]


class _EagerGraph:
    """A stand-in for a CUDA graph where there is none: replay runs the step again (which writes
    its result into the shared logits buffer, as the graph would)."""

    def capture(self, step: Step) -> None:
        self.step = step
        step()

    def replay(self) -> None:
        self.step()


class _CudaGraph:
    """`torch.cuda.CUDAGraph` of one step, captured on a side stream in a shared memory pool."""

    def __init__(self, pool: Any, stream: torch.cuda.Stream) -> None:
        """`pool`: a `torch.cuda.graph_pool_handle()` the graphs of every bucket share."""
        self.pool = pool
        self.stream = stream
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, step: Step) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_RUNS):
                step()
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
            step()
        torch.cuda.synchronize()

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    """Captured decode steps of a model for every bucket up to `max_bs` requests."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        max_context_len: int,
        max_bs: int,
        mode: str = "cuda",
    ) -> None:
        """Capture `model`'s decode steps over `backend` for request rows of `max_context_len`
        positions (`ModelRunner.capture_decode_graphs` passes its own). The graphs hold the
        addresses of the weights, rotary tables and pools as they are now: moving the model or
        replacing a pool afterwards needs a new capture."""
        if mode not in MODES:
            raise ValueError(f"unknown graph mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "cuda" and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        if not backend.graph_safe:
            raise ValueError(
                f"{type(backend).__name__} prepares each batch on the host, which a CUDA "
                "graph cannot replay: use the triton attention backend"
            )
        self.model = model
        self.backend = backend
        self.mode = mode
        self.max_bs = max_bs
        self.sizes = graph_batch_sizes(max_bs)
        # the longest sequence a request row holds and the rotary tables reach
        self.max_seq_len = min(max_context_len, model.config.max_position_embeddings)
        device = self.device = model.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.req_rows = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.ones = torch.ones(max_bs, dtype=torch.int64, device=device)
        # every graph copies its logits here: one buffer, not one per bucket (at 256 requests
        # and a 128k vocabulary the buckets' own would hold ~2 GB)
        vocab = model.config.vocab_size
        self.logits = torch.zeros((max_bs, vocab), dtype=torch.float32, device=device)
        self.graphs: dict[int, _EagerGraph | _CudaGraph] = {}
        self.replays = 0
        self.capture_seconds = self._capture()

    def _capture(self) -> float:
        start = time.perf_counter()
        cuda = self.mode == "cuda"
        with torch.inference_mode(), torch.cuda.device(self.device) if cuda else nullcontext():
            before = torch.cuda.memory_reserved() if cuda else 0
            pool = torch.cuda.graph_pool_handle() if cuda else None
            stream = torch.cuda.Stream() if cuda else None
            for bs in reversed(self.sizes):  # the largest first: the smaller reuse its memory
                graph = _CudaGraph(pool, stream) if stream is not None else _EagerGraph()
                graph.capture(self._step_of(self.static_batch(bs)))
                self.graphs[bs] = graph
            used = torch.cuda.memory_reserved() - before if cuda else 0
        seconds = time.perf_counter() - start
        log.info(
            "decode graphs (%s): %d batch sizes, 1..%d, captured in %.1f s (%.0f MiB reserved)",
            self.mode, len(self.sizes), self.max_bs, seconds, used / 2**20,
        )  # fmt: skip
        return seconds

    def static_batch(self, bs: int) -> ForwardBatch:
        """The decode batch a bucket's graph computes: views of the first `bs` buffer entries."""
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_rows=self.req_rows[:bs],
            prefix_lens=self.positions[:bs],  # a decode token's position is its prefix length
            extend_lens=self.ones[:bs],
            seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            max_extend_len=1,
            max_seq_len=self.max_seq_len,
            extend_lens_list=[1] * bs,
        )

    def _step_of(self, batch: ForwardBatch) -> Step:
        """The step a graph captures: the backend's per-batch work and the model, on `batch`."""

        def step() -> torch.Tensor:
            self.backend.init_forward(batch)
            logits = self.logits[: batch.batch_size]
            logits.copy_(self.model(batch, self.backend))
            return logits

        return step

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether a graph computes `batch`: a decode batch of at most `max_bs` requests, none
        longer than the graphs' sequences, asking only for logits."""
        return (
            batch.mode is ForwardMode.DECODE
            and 0 < batch.batch_size <= self.max_bs
            and batch.max_seq_len <= self.max_seq_len
            and batch.output_rows is None
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits `[bs, vocab]` of `batch` (see `can_run`); K/V written to the pool. A
        view of the graph's output buffer: valid until the next replay."""
        bs = batch.batch_size
        bucket = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.req_rows[:bs].copy_(batch.req_rows)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        if bs < bucket:  # a larger batch may have left real slots there: pad afresh
            self.input_ids[bs:bucket].zero_()
            self.positions[bs:bucket].zero_()
            self.req_rows[bs:bucket].zero_()
            self.seq_lens[bs:bucket].fill_(1)
            self.out_cache_loc[bs:bucket].zero_()
        self.graphs[bucket].replay()
        self.replays += 1
        return self.logits[:bs]
