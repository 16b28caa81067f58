"""Logit adjustments of a batch, each one tensor operation over the requests that ask for it.

vLLM's definitions, applied in its order to float32 logits `[bs, vocab]`:

1. `repetition_penalty` r, on every token seen in the prompt or the output so far: a positive
   logit is divided by r, a negative one multiplied by r (r > 1 discourages repeats);
2. `frequency_penalty` f and `presence_penalty` p, on the output so far: logit -= f * count + p *
   (count > 0);
3. `logit_bias`: added to the logits of the named tokens (OpenAI's -100 bans, 100 forces);
4. `min_new_tokens`: until that many tokens were generated, EOS (unless `ignore_eos`) and the stop
   token ids get -inf, so the request cannot stop before.

Requests that ask for none of these cost nothing: the batch's logits pass through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radixkv.protocol import SamplingParams


def adjust_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    outputs: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    eos_token_ids: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """The logits with every request's adjustments applied (a new tensor if any applied)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    ps = [params[i] for i in rows]
    sub = logits[rows]  # a copy: the caller's logits stay as the model made them
    output_counts = _counts([outputs[i] for i in rows], vocab, device)
    if any(p.repetition_penalty != 1.0 for p in ps):
        seen = (output_counts > 0) | (_counts([prompts[i] for i in rows], vocab, device) > 0)
        r = _column([p.repetition_penalty for p in ps], device)
        penalized = torch.where(sub > 0, sub / r, sub * r)
        sub = torch.where(seen, penalized, sub)
    if any(p.frequency_penalty or p.presence_penalty for p in ps):
        f = _column([p.frequency_penalty for p in ps], device)
        pr = _column([p.presence_penalty for p in ps], device)
        sub = sub - f * output_counts - pr * (output_counts > 0).to(sub.dtype)
    biases = [(j, t, b) for j, p in enumerate(ps) for t, b in p.logit_bias.items()]
    if biases:
        _put(sub, biases, device, accumulate=True)
    barred = [
        (j, t, float("-inf"))
        for j, p in enumerate(ps)
        if len(outputs[rows[j]]) < p.min_new_tokens
        for t in {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)}
    ]
    if barred:
        _put(sub, barred, device, accumulate=False)
    out = logits.clone()
    out[rows] = sub
    return out


def _counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """float32 `[len(seqs), vocab]`: how often each token occurs in each sequence."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros((len(seqs), vocab + 1), dtype=torch.float32, device=device)
    if width:
        ids = torch.full((len(seqs), width), vocab, dtype=torch.int64)  # pad: a spare column
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
        ids = ids.to(device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _put(
    sub: torch.Tensor,
    entries: list[tuple[int, int, float]],
    device: torch.device,
    accumulate: bool,
) -> None:
    rows, cols, values = zip(*entries, strict=True)
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    sub.index_put_(index, torch.tensor(values, dtype=sub.dtype, device=device), accumulate)
