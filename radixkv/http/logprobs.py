"""Log probabilities in the shapes each API returns them: OpenAI's chat (`content` entries with
`top_logprobs`), OpenAI's legacy completions (parallel lists), SGLang's `meta_info` triples."""

from __future__ import annotations

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
    """`start`: where the first token's text begins in the choice's text (for `text_offset`)."""
    offsets, offset = [], start
    for lp in lps or []:
        offsets.append(offset)
        offset += len(lp.text)
    return {
        "tokens": [lp.text for lp in lps or []],
        "token_logprobs": [lp.logprob for lp in lps or []],
        "top_logprobs": [dict(zip(lp.top_texts, lp.top_logprobs, strict=True)) for lp in lps or []],
        "text_offset": offsets,
    }


def native_logprobs(lps: list[TokenLogprob] | None, with_text: bool) -> dict[str, Any]:
    """SGLang's `meta_info` fields: `[logprob, token id, text or None]` per token."""

    def triple(logprob: float, token: int, text: str) -> list[Any]:
        return [logprob, token, text if with_text else None]

    return {
        "input_token_logprobs": [],
        "output_token_logprobs": [triple(lp.logprob, lp.token_id, lp.text) for lp in lps or []],
        "output_top_logprobs": [
            [triple(*t) for t in zip(lp.top_logprobs, lp.top_ids, lp.top_texts, strict=True)]
            for lp in lps or []
        ],
    }
