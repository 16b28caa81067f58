"""Prompt log probabilities (`logprob_start_len`, OpenAI's `echo`): an extend batch's forward
that also scores, for the requests that asked, each prompt token the batch's positions predict."""

from __future__ import annotations

import torch

from radixkv.model.forward_batch import ForwardBatch
from radixkv.model.model_runner import ModelRunner
from radixkv.scheduler.req import Req


def forward_with_prompt_logprobs(
    runner: ModelRunner, batch: ForwardBatch, admitted: list[tuple[Req, int]], starts: list[int]
) -> torch.Tensor:
    """The last-token logits of every request, as `runner.forward` gives them; and, for the
    requests that asked, the log probability of each prompt token this chunk predicts (the
    token after each computed position from logprob_start_len - 1 on), kept on the request
    until its first output carries them."""
    out_rows: list[int] = []  # packed token indices whose hidden states come back
    last: list[int] = []  # per request: its last token's index in out_rows
    wanted: list[tuple[Req, int, int, int]] = []  # (req, first out row, first position, n)
    offset = 0
    for (req, n), start in zip(admitted, starts, strict=True):
        if req.wants_prompt_logprobs:
            first = max(start, req.params.logprob_start_len - 1, 0)
            end = min(start + n, len(req.prompt_ids) - 1)  # positions predicting a prompt token
            if end > first:
                wanted.append((req, len(out_rows), first, end - first))
                out_rows.extend(range(offset + first - start, offset + end - start))
        last.append(len(out_rows))
        out_rows.append(offset + n - 1)
        offset += n
    batch.output_rows = torch.tensor(out_rows, dtype=torch.int64, device=batch.input_ids.device)
    hidden = runner.forward_hidden(batch)
    for req, row, first, n in wanted:
        targets = req.prompt_ids[first + 1 : first + 1 + n]
        lps = runner.token_logprobs(hidden[row : row + n], targets, req.params.top_logprobs)
        req.prompt_lps = (req.prompt_lps or []) + lps
    for req, _ in admitted:
        if req.wants_prompt_logprobs and not req.prefilling:
            req.prompt_lps_done = True  # a retraction's re-prefill need not compute them
    return runner.logits(hidden[last])
