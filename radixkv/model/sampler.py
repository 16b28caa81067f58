"""Batched next-token sampling: greedy fast path, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from radixkv.model.penalties import adjust_logits
from radixkv.protocol import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one request: seeded when `params.seed` is set, else from entropy.

    The caller keeps it with the request across steps, so a seeded request draws the same
    tokens whatever batch it runs in.
    """
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


class Sampler:
    """Turns a batch of float32 logits `[bs, vocab]` into next token ids `[bs]`.

    `outputs` and `prompts` (each request's tokens so far) feed the penalties, `logit_bias` and
    `min_new_tokens` (`penalties.py`); without them, requests asking for those are refused."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        outputs: Sequence[Sequence[int]] | None = None,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        if len(params) != logits.shape[0]:
            raise ValueError(f"{len(params)} sampling params for {logits.shape[0]} logit rows")
        if any(p.adjusts_logits for p in params):
            if outputs is None or prompts is None:
                raise ValueError("penalties, logit_bias and min_new_tokens need the token history")
            logits = adjust_logits(logits, params, outputs, prompts, self.eos_token_ids)
        greedy_ids = logits.argmax(dim=-1)
        if all(p.is_greedy for p in params):
            return greedy_ids
        probs = self._filtered_probs(logits, params)
        # Exponential race (Gumbel-max in disguise): argmax(p / E), E ~ Exp(1), samples from p.
        noise = torch.empty_like(probs)
        for i, p in enumerate(params):
            gen = generators[i] if generators is not None else None
            if not p.is_greedy:
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.is_greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy_ids, sampled)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if max(min_p) > 0:  # drop tokens under min_p times the most likely token's probability
            floor = torch.tensor(min_p, device=device)[:, None] * probs.amax(-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        if min(top_k) == vocab and min(top_p) >= 1.0:
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= torch.tensor(top_k, device=device)[:, None]
        # Keep the smallest head whose mass reaches top_p (the token crossing it included).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop |= mass_before > torch.tensor(top_p, device=device)[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
