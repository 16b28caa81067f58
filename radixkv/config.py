"""Launch configuration shared by the runtime front end and the scheduler process."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs", "lof", "random")


@dataclass(frozen=True)
class ServerArgs:
    """Everything `radixkv launch` and `radixkv.Runtime(...)` accept.

    KV capacity comes from `max_total_tokens` if set, else from `kv_memory` (bytes).
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto | bfloat16 | float32 (and float16 on CUDA)
    kv_dtype: str | None = None  # follows dtype unless set
    device: str = "cpu"
    attention_backend: str = "auto"  # auto | torch | triton
    kv_memory: int = 256 * 1024 * 1024
    max_total_tokens: int | None = None
    page_size: int = 1
    max_context_len: int | None = None  # default: the model's, capped at 8192
    max_running_requests: int = 64
    max_prefill_tokens: int = 4096
    chunked_prefill_size: int = 2048
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    new_token_ratio: float = 0.4  # initial share of max_new_tokens reserved for decode
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002  # per decode step, towards the minimum
    max_skips: int = 32  # aging: a request passed over in this many admission rounds goes first
    lpm_window: int = 256  # cache-aware ordering looks at the oldest this many waiting requests
    in_batch_share_len: int = 32  # defer a request sharing this many uncached tokens with one
    #                               admitted in the same round (it will hit that one's cache)
    host: str = "127.0.0.1"
    port: int = 0  # client endpoint (tcp); 0 picks a free port
    http_port: int | None = None
    api_key: str | None = None
    seed: int = 0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"unknown schedule policy {self.schedule_policy!r}; "
                f"choose one of {', '.join(SCHEDULE_POLICIES)}"
            )
        for name in ("page_size", "max_running_requests", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunked_prefill_size < self.page_size:
            raise ValueError(
                f"chunked_prefill_size ({self.chunked_prefill_size}) must be >= page_size "
                f"({self.page_size})"
            )

    @property
    def effective_policy(self) -> str:
        """Cache-aware policies fall back to fcfs when the radix cache is disabled."""
        if self.disable_radix_cache and self.schedule_policy in ("lpm", "dfs-weight"):
            return "fcfs"
        return self.schedule_policy
