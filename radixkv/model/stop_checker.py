"""The stop rule of one request: EOS, stop token ids, max_new_tokens."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from radixkv.protocol import SamplingParams


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
