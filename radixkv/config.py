"""Launch configuration shared by every process: `ServerArgs`, one field per option.

Each field carries its help text (and, where it has them, its choices or parser) as metadata, and
the command line of `radixkv launch` and `radixkv bench` is generated from these fields
(`radixkv.tools.cli`), so an option is described once, here.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
from dataclasses import dataclass, field
from typing import Any

SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs", "lof", "random")
DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
KV_CACHE_DTYPES = (*DTYPES, "fp8_e4m3", "fp8_e5m2", "int8")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
LOG_LEVELS = ("debug", "info", "warning", "error")
RADIX_EVICTION_POLICIES = ("lru", "lfu", "fifo", "filo", "mru", "slru", "priority", "gdsf")
ROUTER_POLICIES = ("cache_aware", "round_robin", "least_load", "random", "prefix_hash")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "268435456", "256MiB", "256M", "1.5GB", "2g"; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def option(default: Any, help: str, **cli: Any) -> Any:
    """A ServerArgs field: its default, its help text and how the command line reads it
    (`choices`, `parse`, `aliases`: other flags for it, `exclusive`: the name of a group of
    which one may be given)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class ServerArgs:
    """Everything `radixkv launch` and `radixkv.Runtime(...)` accept."""

    # the model
    model: str = option("smollm2-135m", "smollm2-135m, a .gguf file or a Hugging Face directory")
    dtype: str = option("auto", "weights and activations; auto: bf16 where this machine is fast "
                        "at it, else fp32 (float16 on CUDA only)", choices=DTYPES)  # fmt: skip
    kv_cache_dtype: str = option(
        "auto", "KV cache dtype; auto: --dtype's; int8 and fp8 store one-byte codes with a scale "
        "per token and KV head (about half the bytes of bf16)", choices=KV_CACHE_DTYPES,
        aliases=("--kv-dtype",),
    )  # fmt: skip
    device: str = option("cpu", "torch device of the scheduler process (cpu, cuda, cuda:1, ...)")
    attention_backend: str = option(
        "auto", "auto: triton on CUDA, torch otherwise (triton on a CPU needs TRITON_INTERPRET=1)",
        choices=ATTENTION_BACKENDS,
    )  # fmt: skip
    cuda_graph_max_bs: int | None = option(
        None, "decode batches of up to this many requests replay CUDA graphs captured at startup "
        "(default: --max-running-requests, at most 256; CUDA with the triton attention backend)",
    )  # fmt: skip
    disable_cuda_graph: bool = option(False, "launch every kernel of every decode step (no CUDA "
                                      "graphs)")  # fmt: skip
    # memory
    kv_memory: int = option(256 * 2**20, "KV cache memory budget, e.g. 256MiB",
                            parse=parse_size, exclusive="kv_size")  # fmt: skip
    max_total_tokens: int | None = option(None, "KV cache size in tokens (instead of --kv-memory)",
                                          exclusive="kv_size")  # fmt: skip
    kv_host_tier: int | None = option(
        None, "a second KV tier in host memory of this size, e.g. 2GiB: prefixes the pool evicts "
        "are copied there and loaded back (a copy, not a prefill) when a prompt reaches them",
        parse=parse_size,
    )  # fmt: skip
    kv_host_tier_dtype: str = option(
        "auto", "what --kv-host-tier stores; auto: the KV cache's dtype (exact copies); int8 or "
        "fp8 under a bf16 cache: a compressed copy, about twice the tokens in the same memory, "
        "loaded back with a quantized cache's error", choices=KV_CACHE_DTYPES,
    )  # fmt: skip
    kv_storage_dir: str | None = option(
        None, "keep cached prefixes on disk in this directory (blocks of 64 tokens, checksummed, "
        "keyed by model and KV dtype): a runtime restarted on it serves them without recomputing",
    )  # fmt: skip
    kv_storage_size: int | None = option(
        None, "keep --kv-storage-dir under this size, e.g. 20GiB, evicting the least recently "
        "used blocks (default: no limit)", parse=parse_size,
    )  # fmt: skip
    page_size: int = option(1, "tokens per KV page (radix-tree keys are whole pages)")
    max_context_len: int | None = option(None, "context length (default: the model's, capped at "
                                         "8192)", aliases=("--context-length",))  # fmt: skip
    # scheduling
    max_running_requests: int = option(64, "requests decoding at once")
    max_queued_requests: int | None = option(
        None, "refuse new requests (HTTP 429, RequestError code 'overloaded') while this many "
        "wait for admission; default: no limit",
    )  # fmt: skip
    max_prefill_tokens: int = option(4096, "new prompt tokens in one prefill batch")
    chunked_prefill_size: int = option(2048, "a longer uncached prompt is prefilled in chunks of "
                                       "this many tokens")  # fmt: skip
    enable_mixed_chunk: bool = option(
        False, "decoding requests ride along in each prefill batch (a token each, SGLang's "
        "mixed chunk): a long prompt's prefill no longer stalls them, at some cost per token",
    )  # fmt: skip
    ttft_target: float | None = option(
        None, "with --enable-mixed-chunk: prefill in steps of --chunked-prefill-size tokens "
        "while every queued prompt can still get its first token within this many seconds at "
        "that pace; when one cannot, a step of every token up to the first late prompt, and "
        "with nothing decoding a full step (both at most --max-prefill-tokens; "
        "docs/scheduling.md)",
    )  # fmt: skip
    schedule_policy: str = option(
        "lpm", "admission order: lpm (longest cached prefix first), dfs-weight, fcfs, lof, random",
        choices=SCHEDULE_POLICIES,
    )  # fmt: skip
    disable_radix_cache: bool = option(False, "share no prefixes (an ablation)")
    radix_eviction_policy: str = option(
        "lru", "which unlocked radix-tree leaf is evicted first: lru, lfu, fifo, filo, mru, slru, "
        "priority (SGLang's; priority: requests' `priority`, lowest first, then LRU), gdsf (hits "
        "weighted by recomputation cost, aged; docs/cache.md)",
        choices=RADIX_EVICTION_POLICIES,
    )  # fmt: skip
    json_max_whitespace: int = option(
        1, "structured JSON output: at most this many whitespace characters in a row between "
        "its tokens (-1: any, SGLang's and vLLM's default; 0: compact); bounding it keeps small "
        "models from padding until max_tokens",
    )  # fmt: skip
    deterministic: bool = option(
        False, "batch-invariant inference: a request gets the same tokens whatever it is batched "
        "with, chunked, cached or retracted, in bf16 as in fp32 (CPU; docs/model.md has the cost)",
    )  # fmt: skip
    new_token_ratio: float = option(0.4, "initial share of max_new_tokens reserved for decode")
    min_new_token_ratio: float = option(0.1, "the reserve's floor")
    new_token_ratio_decay: float = option(0.002, "per decode step, towards the floor")
    max_skips: int = option(32, "aging: a request passed over in this many admission rounds goes "
                            "first")  # fmt: skip
    lpm_window: int = option(256, "cache-aware ordering looks at the oldest this many waiting "
                             "requests")  # fmt: skip
    in_batch_share_len: int = option(32, "defer a request sharing this many uncached tokens with "
                                     "one admitted in the same round (it will hit that one's "
                                     "cache)")  # fmt: skip
    # serving
    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(0, "the ZMQ port of radixkv.Client (0 picks a free one). NOT HTTP: "
                       "SGLang's and vLLM's --port is HTTP, ours is --http-port")  # fmt: skip
    http_port: int | None = option(None, "also serve the OpenAI-compatible HTTP API and /metrics "
                                   "on this port (0 picks a free one)")  # fmt: skip
    api_key: str | None = option(None, "clients must send this key (HTTP: Authorization: Bearer "
                                 "KEY); several keys separated by commas, e.g. one per "
                                 "tenant")  # fmt: skip
    isolate_cache_per_key: bool = option(False, "requests share cached KV only with requests "
                                         "sent with the same API key (and the same cache_salt, "
                                         "if they give one)")  # fmt: skip
    allow_no_api_key: bool = option(False, "listen on a --host other than loopback without "
                                    "--api-key: anyone who reaches the port can use the "
                                    "runtime")  # fmt: skip
    stream_stall_timeout: float = option(
        10.0, "an HTTP stream whose reader has stopped reading (every buffer on the way full) "
        "for this many seconds is aborted, as a frozen ZMQ client is",
    )  # fmt: skip
    on_scheduler_death: str = option(
        "restart", "restart: start a new scheduler process (the requests it was running fail "
        "with a clear error; requests arriving meanwhile wait), up to --max-scheduler-restarts "
        "times, then exit; exit: the runtime exits with status 3 at once, for a supervisor "
        "(systemd, Kubernetes) to restart", choices=("restart", "exit"),
    )  # fmt: skip
    max_scheduler_restarts: int = option(3, "restarts of a dying scheduler before the runtime "
                                         "gives up and exits (status 3)")  # fmt: skip
    max_sessions: int = option(
        1024, "sessions (SGLang's /open_session) open at once; opening another is refused "
        "until one is closed",
    )  # fmt: skip
    session_timeout: float = option(
        0.0, "close a session unused this many seconds (nothing of it running), as "
        "/close_session would (its cached prefixes then go first); 0: never, as in SGLang",
    )  # fmt: skip
    drain_timeout: float = option(
        30.0, "on SIGTERM (or Ctrl-C), stop admitting requests and give running ones this many "
        "seconds to finish, then abort them; a second signal stops at once",
    )  # fmt: skip
    num_threads: int | None = option(
        None, "torch threads of the scheduler process (default: torch's; with --dp, the "
        "machine's cores shared among the workers)",
    )  # fmt: skip
    cache_events_port: int | None = option(
        None, "publish radix-cache events (prefix stored, evicted) on this ZMQ PUB port (0: a "
        "free one) for a router in front of this runtime (docs/scaling.md)",
    )  # fmt: skip
    # scale-out: a router in front of data-parallel workers (docs/scaling.md)
    dp: int = option(1, "data-parallel workers: with N > 1, N runtimes (each its own scheduler, "
                     "KV cache and share of the threads) behind a cache-aware router",
                     aliases=("--dp-size",))  # fmt: skip
    router_policy: str = option(
        "cache_aware", "how the router picks a worker: cache_aware (the longest cached prefix "
        "while load is balanced), round_robin, least_load, random, prefix_hash (consistent "
        "hashing of the first --prefix-hash-tokens)", choices=ROUTER_POLICIES,
    )  # fmt: skip
    cache_threshold: float = option(
        0.3, "cache_aware: route by prefix when the best worker's cached share of the prompt is "
        "above this; otherwise to the worker with the least cached (SGLang's)",
    )  # fmt: skip
    balance_abs_threshold: int = option(
        4, "cache_aware: load is imbalanced (a hot prefix is spread, an uncached prompt goes to "
        "the least loaded) when the in-flight requests of the busiest and idlest workers "
        "(moving averages) differ by more than this ...",
    )  # fmt: skip
    balance_rel_threshold: float = option(1.5, "... and the busiest has more than this many "
                                          "times the idlest's")  # fmt: skip
    router_cache_events: bool = option(
        True, "the router's per-worker prefix trees follow each worker's cache events (exact); "
        "off: trees of what was routed there, forgetting by LRU (SGLang's approximation)",
    )  # fmt: skip
    router_tree_tokens: int = option(
        2**24, "without cache events: tokens each per-worker tree keeps before forgetting the "
        "least recently routed",
    )  # fmt: skip
    prefix_hash_tokens: int = option(64, "prefix_hash: the leading tokens hashed")
    worker_timeout: float = option(
        15.0, "a worker that answers no heartbeat for this many seconds leaves the rotation (its "
        "requests fail); it rejoins when it answers again",
    )  # fmt: skip
    worker_api_key: str | None = option(None, "the API key the router sends to its workers")
    ray_address: str | None = option(
        None, "with --dp: place the workers as Ray actors on this cluster ('auto': the one this "
        "machine belongs to, 'local': start one here); needs radixkv[ray]", aliases=("--ray",),
        const="auto",
    )  # fmt: skip
    ray_worker_cpus: float = option(1.0, "Ray: CPUs reserved per worker")
    ray_worker_gpus: float = option(0.0, "Ray: GPUs reserved per worker")
    seed: int = option(0, "seed of the scheduler's random state (sampling without a seed, the "
                       "random policy)")  # fmt: skip
    log_level: str = option("info", "logging level of the runtime and scheduler processes",
                            choices=LOG_LEVELS)  # fmt: skip

    def __post_init__(self) -> None:
        for name, value in vars(self).items():  # sizes may be given as text: "2GiB"
            parse = type(self).__dataclass_fields__[name].metadata.get("parse")
            if parse is not None and isinstance(value, str):
                object.__setattr__(self, name, parse(value))
        for name, value in vars(self).items():
            choices = type(self).__dataclass_fields__[name].metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        for name in ("page_size", "max_running_requests", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not is_loopback(self.host) and self.api_key is None and not self.allow_no_api_key:
            raise ValueError(
                f"--host {self.host} listens beyond this machine without an API key: give "
                "--api-key KEY, or --allow-no-api-key if the network is trusted"
            )
        if self.isolate_cache_per_key and not self.api_keys:
            raise ValueError("isolate_cache_per_key needs API keys (--api-key KEY1,KEY2,...)")
        if self.json_max_whitespace < -1:
            raise ValueError(
                f"json_max_whitespace must be -1 (any), 0 (compact) or a count, got "
                f"{self.json_max_whitespace}"
            )
        if self.max_scheduler_restarts < 0:
            raise ValueError(
                f"max_scheduler_restarts must be >= 0, got {self.max_scheduler_restarts}"
            )
        if self.max_sessions < 0:
            raise ValueError(f"max_sessions must be >= 0, got {self.max_sessions}")
        if not 0 <= self.session_timeout < float("inf"):
            raise ValueError(f"session_timeout must be >= 0, got {self.session_timeout}")
        if not 0 <= self.drain_timeout < float("inf"):
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if not 0 < self.stream_stall_timeout < float("inf"):
            raise ValueError(f"stream_stall_timeout must be > 0, got {self.stream_stall_timeout}")
        if self.dp < 1:
            raise ValueError(f"dp must be >= 1, got {self.dp}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.prefix_hash_tokens < 1 or self.router_tree_tokens < 1:
            raise ValueError("prefix_hash_tokens and router_tree_tokens must be >= 1")
        if not 0 < self.worker_timeout < float("inf"):
            raise ValueError(f"worker_timeout must be > 0, got {self.worker_timeout}")
        if self.kv_storage_size is not None and self.kv_storage_dir is None:
            raise ValueError("--kv-storage-size limits --kv-storage-dir, which is not set")
        if self.kv_host_tier_dtype != "auto" and self.kv_host_tier is None:
            raise ValueError("--kv-host-tier-dtype sets what --kv-host-tier stores: give a tier "
                             "size too")  # fmt: skip
        if self.disable_radix_cache and (self.kv_host_tier or self.kv_storage_dir):
            raise ValueError(
                "--kv-host-tier and --kv-storage-dir keep what the radix cache holds: they do "
                "nothing with --disable-radix-cache"
            )
        if self.ttft_target is not None:
            if not 0 < self.ttft_target < float("inf"):
                raise ValueError(f"ttft_target must be > 0 seconds, got {self.ttft_target}")
            if not self.enable_mixed_chunk:
                raise ValueError(
                    "--ttft-target sizes the prefill chunks that decoding requests ride along "
                    "in: it needs --enable-mixed-chunk (without it, every prefill step stalls "
                    "decoding whatever its size)"
                )
        if self.cuda_graph_max_bs is not None:
            if self.cuda_graph_max_bs < 1:
                raise ValueError(
                    f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs} (to decode "
                    "without graphs: --disable-cuda-graph)"
                )
            if self.disable_cuda_graph:
                raise ValueError("--cuda-graph-max-bs sizes the graphs --disable-cuda-graph turns "
                                 "off: give one of them")  # fmt: skip
            if not self.device.startswith("cuda"):
                raise ValueError(f"--cuda-graph-max-bs needs --device cuda (got {self.device})")
            if self.attention_backend == "torch":
                raise ValueError(
                    "--cuda-graph-max-bs needs the triton attention backend: the torch backend "
                    "prepares each batch on the host, which a graph cannot replay"
                )
        if self.chunked_prefill_size < self.page_size:
            raise ValueError(
                f"chunked_prefill_size ({self.chunked_prefill_size}) must be >= page_size "
                f"({self.page_size})"
            )

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The keys clients may send (`api_key`, split at commas); empty: no key needed."""
        return tuple(k.strip() for k in (self.api_key or "").split(",") if k.strip())

    @property
    def graph_max_bs(self) -> int | None:
        """The largest decode batch replayed from a CUDA graph; None: no graphs (not on CUDA,
        the torch attention backend, or --disable-cuda-graph)."""
        if self.disable_cuda_graph or not self.device.startswith("cuda"):
            return None
        if self.attention_backend == "torch":
            return None
        return min(self.cuda_graph_max_bs or 256, self.max_running_requests)

    @property
    def effective_policy(self) -> str:
        """Cache-aware policies fall back to fcfs when the radix cache is disabled."""
        if self.disable_radix_cache and self.schedule_policy in ("lpm", "dfs-weight"):
            return "fcfs"
        return self.schedule_policy


# Options only a router reads, and those the process of `radixkv router --worker ...` itself
# uses (every other option belongs to the runtimes started elsewhere).
ROUTER_FIELDS = (
    "router_policy", "cache_threshold", "balance_abs_threshold", "balance_rel_threshold",
    "router_cache_events", "router_tree_tokens", "prefix_hash_tokens", "worker_timeout",
    "worker_api_key", "ray_address", "ray_worker_cpus", "ray_worker_gpus",
)  # fmt: skip
REMOTE_ROUTER_FIELDS = (
    "model", "host", "port", "http_port", "api_key", "isolate_cache_per_key", "allow_no_api_key",
    "stream_stall_timeout", "drain_timeout", "max_sessions", "session_timeout", "seed",
    "log_level",
    *(f for f in ROUTER_FIELDS if not f.startswith("ray_")),
)  # fmt: skip


def refuse_unused(args: ServerArgs, role: str) -> None:
    """A ValueError naming the first option given (not its default) that `role` would ignore:
    "runtime" (one runtime), "local" (--dp N workers here), "ray" (--dp N on Ray) or "remote"
    (`radixkv router --worker ...`). An option is honoured or refused, never silently dropped."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServerArgs)}

    def given(name: str) -> bool:
        return getattr(args, name) != defaults[name]

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if role == "runtime":
        unused = [f for f in ROUTER_FIELDS if given(f)]
        why = "applies to a router only (--dp N > 1, or `radixkv router --worker ...`)"
    elif role == "remote":
        unused = [f for f in defaults if f not in REMOTE_ROUTER_FIELDS and given(f)]
        why = "applies to the runtimes behind this router: give it to their `radixkv launch`"
    else:
        unused = ["cache_events_port"] if given("cache_events_port") else []
        why = "is set by the router for its own workers"
        if role == "local":
            unused += [f for f in ROUTER_FIELDS if f.startswith("ray_") and given(f)]
            why = "is set by the router for its own workers (--ray-worker-*: with --ray only)"
    if unused:
        raise ValueError(f"{flag(unused[0])} {why}")


def matching_key(given: bytes, keys: tuple[str, ...]) -> str | None:
    """The key of `keys` that `given` is, compared in constant time against every one (so the
    time does not say which key, or how much of one, matched); None if none is."""
    found = None
    for key in keys:
        if hmac.compare_digest(given, key.encode()):
            found = key
    return found


def is_loopback(host: str) -> bool:
    """Whether listening on `host` is reachable from this machine only."""
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def setup_logging(level: str) -> None:
    """The log format of every radixkv process."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
