"""`ForwardBatch`: what one model step computes, in the index space of the KV pools.

Index ranges (request b of bs, tokens packed request after request, no padding):

    input_ids, positions, out_cache_loc  [num_tokens]  request b owns [start_b, start_b + extend_b)
    req_to_token[req_rows[b], 0:prefix_b]                slots of b's cached prefix (in the pool)
    req_to_token[req_rows[b], prefix_b:seq_b]            == b's part of out_cache_loc (written
                                                         into the row by the caller)

Decode is the special case extend_lens == 1 and prefix_lens == seq_lens - 1.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass(slots=True)
class ForwardBatch:
    """Inputs of one forward pass over requests whose KV lives in the pools."""

    mode: ForwardMode
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    req_rows: torch.Tensor  # int64 [bs]
    prefix_lens: torch.Tensor  # int64 [bs]
    extend_lens: torch.Tensor  # int64 [bs]
    seq_lens: torch.Tensor  # int64 [bs]
    out_cache_loc: torch.Tensor  # int64 [num_tokens]
    # Host copies, so shape decisions never synchronise with the device.
    max_extend_len: int
    max_seq_len: int
    extend_lens_list: list[int]
    # packed token indices whose hidden states a `ModelRunner.forward_hidden` returns (prompt
    # log probabilities need every position's); None: each request's last token
    output_rows: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def last_token_index(self) -> torch.Tensor:
        """Index in the packed token axis of each request's last token (whose logits we need)."""
        return torch.cumsum(self.extend_lens, 0) - 1

    @classmethod
    def extend(
        cls,
        input_ids: Sequence[Sequence[int]],
        prefix_lens: Sequence[int],
        req_rows: Sequence[int],
        out_cache_loc: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """An extend batch: request b computes `input_ids[b]` after `prefix_lens[b]` cached tokens.

        `out_cache_loc` (all requests' new slots, packed) must already be written into the rows.
        """
        extend_lens = [len(ids) for ids in input_ids]
        if min(extend_lens, default=0) < 1:
            raise ValueError("every request of an extend batch needs at least one new token")
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
        positions = torch.cat(
            [
                torch.arange(p, s, dtype=torch.int64)
                for p, s in zip(prefix_lens, seq_lens, strict=True)
            ]
        )
        flat = [t for ids in input_ids for t in ids]
        return cls._build(
            ForwardMode.EXTEND, flat, positions, req_rows, prefix_lens, extend_lens, seq_lens,
            out_cache_loc, device,
        )  # fmt: skip

    @classmethod
    def decode(
        cls,
        input_ids: Sequence[int],
        seq_lens: Sequence[int],
        req_rows: Sequence[int],
        out_cache_loc: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """A decode batch: one token per request at position `seq_lens[b] - 1` (seq incl. it)."""
        bs = len(input_ids)
        prefix_lens = [s - 1 for s in seq_lens]
        positions = torch.tensor(prefix_lens, dtype=torch.int64)
        return cls._build(
            ForwardMode.DECODE, list(input_ids), positions, req_rows, prefix_lens, [1] * bs,
            list(seq_lens), out_cache_loc, device,
        )  # fmt: skip

    @classmethod
    def _build(
        cls,
        mode: ForwardMode,
        flat_ids: list[int],
        positions: torch.Tensor,
        req_rows: Sequence[int],
        prefix_lens: Sequence[int],
        extend_lens: list[int],
        seq_lens: Sequence[int],
        out_cache_loc: torch.Tensor,
        device: torch.device | str,
    ) -> ForwardBatch:
        if min(prefix_lens, default=0) < 0:
            raise ValueError(f"negative prefix length in {list(prefix_lens)}")
        if len(out_cache_loc) != len(flat_ids):
            raise ValueError(
                f"out_cache_loc has {len(out_cache_loc)} slots for {len(flat_ids)} new tokens"
            )

        def tensor(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int64, device=device)

        return cls(
            mode=mode,
            input_ids=tensor(flat_ids),
            positions=positions.to(device),
            req_rows=tensor(req_rows),
            prefix_lens=tensor(prefix_lens),
            extend_lens=tensor(extend_lens),
            seq_lens=tensor(seq_lens),
            out_cache_loc=out_cache_loc.to(device=device, dtype=torch.int64),
            max_extend_len=max(extend_lens),
            max_seq_len=max(seq_lens),
            extend_lens_list=extend_lens,
        )
