"""A request as the scheduler sees it: tokens, sampling state and its hold on the KV cache."""

from __future__ import annotations

import time
from typing import Any

import torch

from radixkv.mem import SeqSlots
from radixkv.model.sampler import make_generator
from radixkv.protocol import SamplingParams, TokenLogprob, salted_key_head


class Req:
    """One generation request.

    `fill_ids` (prompt + output) are the tokens whose KV the request needs; `seq` holds the slots
    of `fill_ids[:seq.kv_len]` while the request is admitted (None while it waits). A retracted
    request goes back to waiting with its output kept, and resumes by prefilling `fill_ids`.
    `tree_ids` are the same tokens as radix-tree keys: with a `cache_salt`, the first one is
    salted (`salted_key_head`), so that only requests with the same salt share KV.
    """

    __slots__ = (
        "cached_tokens",
        "extend_target",
        "finish_reason",
        "first_admitted",
        "generator",
        "key_head",
        "match_len",
        "match_node",
        "matcher",
        "output_ids",
        "params",
        "prompt_ids",
        "prompt_lps",
        "prompt_lps_done",
        "queue_time",
        "queued_at",
        "rid",
        "seq",
        "skips",
        "wait_order",
    )

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        device: torch.device | str = "cpu",
        cache_salt: str | None = None,
    ) -> None:
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.key_head = None if cache_salt is None else salted_key_head(prompt_ids[0], cache_salt)
        self.params = params
        self.output_ids: list[int] = []
        self.generator: torch.Generator | None = (
            None if params.is_greedy else make_generator(params, device)
        )
        self.seq: SeqSlots | None = None
        self.extend_target = 0  # while prefilling: KV must cover fill_ids[:extend_target]
        self.finish_reason: str | None = None
        self.cached_tokens = 0  # prompt tokens served by the radix cache at first admission
        self.first_admitted = False
        self.queued_at = time.monotonic()
        self.queue_time = 0.0  # seconds from queueing to the first admission
        self.matcher: Any = None  # the grammar's state, for structured output (grammar.py)
        self.skips = 0  # admission rounds this request was passed over (aging)
        self.wait_order = 0  # arrival order in the waiting queue (fcfs tie-break)
        self.match_len = 0  # scheduling estimate of the cached prefix (peek, no side effects)
        self.match_node: object = None
        self.prompt_lps: list[TokenLogprob] | None = None  # computed, not yet sent
        self.prompt_lps_done = params.logprob_start_len < 0  # or nothing more to compute

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's log probabilities are asked for and not all computed yet."""
        return not self.prompt_lps_done

    @property
    def tree_ids(self) -> list[int]:
        ids = self.prompt_ids + self.output_ids
        if self.key_head is not None:
            ids[0] = self.key_head
        return ids

    @property
    def prefilling(self) -> bool:
        """Admitted and not yet through its (possibly chunked) prefill of `fill_ids`."""
        return self.seq is not None and self.seq.kv_len < self.extend_target

    @property
    def remaining_new_tokens(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    def __repr__(self) -> str:
        return f"Req({self.rid!r}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)})"
