"""Log probabilities in the shapes each API returns them: OpenAI's chat (`content` entries with
`top_logprobs`), OpenAI's legacy completions (parallel lists), SGLang's `meta_info` triples."""

from __future__ import annotations

import math
from typing import Any

from radixkv.protocol import TokenLogprob


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(lp.text, lp.logprob),
         "top_logprobs": [entry(t, v) for t, v in zip(lp.top_texts, lp.top_logprobs, strict=True)]}
        for lp in lps or []
    ]  # fmt: skip
    return {"content": content}


def completion_logprobs(lps: list[TokenLogprob] | None, start: int = 0) -> dict[str, Any]:
    """`start`: where the first token's text begins in the choice's text (for `text_offset`).
    With `echo` the prompt's tokens come first, the very first with null log probabilities."""
    offsets, offset = [], start
    for lp in lps or []:
        offsets.append(offset)
        offset += len(lp.text)
    return {
        "tokens": [lp.text for lp in lps or []],
        "token_logprobs": [logprob_or_none(lp.logprob) for lp in lps or []],
        "top_logprobs": [_top_dict(lp) for lp in lps or []],
        "text_offset": offsets,
    }


def logprob_or_none(value: float) -> float | None:
    """The first prompt token's log probability is NaN (nothing precedes it): JSON's null."""
    return None if math.isnan(value) else value


def _top_dict(lp: TokenLogprob) -> dict[str, float] | None:
    if math.isnan(lp.logprob):  # the first prompt token
        return None
    return dict(zip(lp.top_texts, lp.top_logprobs, strict=True))


def native_logprobs(
    lps: list[TokenLogprob] | None, with_text: bool, prompt: list[TokenLogprob] | None = None
) -> dict[str, Any]:
    """SGLang's `meta_info` fields: `[logprob, token id, text or None]` per token, for the
    output and (with `logprob_start_len`) the prompt from that position on."""

    def triple(logprob: float, token: int, text: str) -> list[Any]:
        return [logprob_or_none(logprob), token, text if with_text else None]

    def tops(lps: list[TokenLogprob] | None) -> list[Any]:
        return [
            [triple(*t) for t in zip(lp.top_logprobs, lp.top_ids, lp.top_texts, strict=True)]
            if not math.isnan(lp.logprob) else None
            for lp in lps or []
        ]  # fmt: skip

    return {
        "input_token_logprobs": [triple(lp.logprob, lp.token_id, lp.text) for lp in prompt or []],
        "input_top_logprobs": tops(prompt),
        "output_token_logprobs": [triple(lp.logprob, lp.token_id, lp.text) for lp in lps or []],
        "output_top_logprobs": tops(lps),
    }
