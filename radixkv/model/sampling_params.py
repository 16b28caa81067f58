"""Per-request sampling parameters and the stop rule (EOS, stop token ids, max_new_tokens)."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its next tokens and when it stops.

    `temperature == 0` is greedy; `top_k <= 0` and `top_p >= 1` disable those filters; `seed`
    makes a sampled request reproducible whatever else shares its batch.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.stop_token_ids, frozenset):
            object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token id (included in the output)
    LENGTH = "length"  # max_new_tokens reached


@dataclass(frozen=True, slots=True)
class StopChecker:
    """Decides whether a request is finished after it produced `token`."""

    eos_token_ids: frozenset[int]

    @classmethod
    def for_model(cls, eos_token_ids: Iterable[int]) -> StopChecker:
        return cls(frozenset(eos_token_ids))

    def check(self, params: SamplingParams, token: int, num_generated: int) -> FinishReason | None:
        """`num_generated` counts `token` itself."""
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if num_generated >= params.max_new_tokens:
            return FinishReason.LENGTH
        return None
