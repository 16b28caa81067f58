"""Level 2 of the KV hierarchy: each running request's row of KV slots."""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """An int32 table `[max_running_requests + 1, max_context_len]` and a free list of its rows.

    Row r, columns `[0, seq_len)`, hold the KV slot of every token of the request in row r. Row 0 is
    never handed out: batches pad with it, and its zeros point at the padding slot.
    """

    def __init__(
        self, max_running_requests: int, max_context_len: int, device: torch.device | str = "cpu"
    ) -> None:
        if max_running_requests < 1 or max_context_len < 1:
            raise ValueError(
                "max_running_requests and max_context_len must be >= 1, got "
                f"{max_running_requests} and {max_context_len}"
            )
        self.size = max_running_requests
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros(
            (max_running_requests + 1, max_context_len), dtype=torch.int32, device=device
        )
        self.clear()

    def clear(self) -> None:
        """Return every row to the free list."""
        self._free_rows = list(range(self.size, 0, -1))

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        """Take a free row; raises when all are held (check `available_size()` first)."""
        if not self._free_rows:
            raise RuntimeError(
                f"no free request row: all {self.size} rows are held by running requests; "
                "finish or retract one first, or raise max_running_requests"
            )
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        if not 0 < row <= self.size:
            raise ValueError(f"row {row} is not a request row (1..{self.size})")
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Point positions `[start, start + len(slots))` of `row` at `slots`."""
        end = start + len(slots)
        if end > self.max_context_len:
            raise ValueError(
                f"position {end - 1} is past max_context_len {self.max_context_len}; "
                "raise max_context_len or shorten the request"
            )
        self.req_to_token[row, start:end] = slots.to(torch.int32)

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots (int64, on the CPU, where the allocator and the radix tree keep slot lists) of
        positions `[start, end)` of `row`."""
        return self.req_to_token[row, start:end].to(device="cpu", dtype=torch.int64)
