"""Deterministic shared-prefix chat workloads and their best possible cache hit rate."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

_TOPICS = (
    "astronomy", "baking", "chess", "cycling", "databases", "gardening", "geology", "history",
    "jazz", "knitting", "linguistics", "marine biology", "music theory", "origami", "photography",
    "poetry", "robotics", "sailing", "statistics", "volcanoes",
)  # fmt: skip
_WORDS = (
    "always", "answer", "briefly", "carefully", "check", "clear", "concise", "context", "define",
    "detail", "example", "explain", "fact", "first", "friendly", "give", "helpful", "honest",
    "important", "keep", "list", "mention", "note", "offer", "plain", "polite", "precise",
    "question", "reason", "relevant", "safe", "short", "simple", "source", "step", "summary",
    "term", "then", "topic", "useful", "user", "when", "with", "words", "write",
)  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    """One request of a workload: chat messages, how many tokens to generate, its group."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    group: int


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """`groups` system prompts of about `system_words` words; each of `prompts_per_group` users asks
    one question of about `question_words` words. Arrivals are shuffled (seeded)."""

    groups: int = 4
    prompts_per_group: int = 8
    system_words: int = 300
    question_words: int = 12
    output_len: int = 32
    seed: int = 0

    def requests(self) -> list[ChatRequest]:
        rng = random.Random(self.seed)
        out = []
        for g in range(self.groups):
            topic = _TOPICS[g % len(_TOPICS)]
            rules = " ".join(rng.choice(_WORDS) for _ in range(self.system_words))
            system = f"You are an expert on {topic}. Guidelines: {rules}."
            for q in range(self.prompts_per_group):
                words = " ".join(rng.choice(_WORDS) for _ in range(self.question_words))
                question = f"Question {q + 1} about {topic}: {words}?"
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]
                out.append(ChatRequest(messages, self.output_len, g))
        rng.shuffle(out)
        return out


def best_hit_rate(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], page_size: int = 1
) -> float:
    """Best possible hit rate of requests served in order, each `(prompt ids, output ids)`.

    Every distinct prefix is computed once: request i can at best reuse the longest common prefix
    of its prompt with any earlier prompt + output[:-1] (the last output token never has KV),
    never its last prompt token, page-aligned.
    Returns Σ best reusable tokens ÷ Σ prompt tokens.
    """
    trie: dict = {}
    reusable = total = 0
    for prompt, output in sequences:
        node, n = trie, 0
        for tok in prompt[:-1]:
            if tok not in node:
                break
            node, n = node[tok], n + 1
        reusable += n // page_size * page_size
        total += len(prompt)
        node = trie
        for tok in [*prompt, *output[:-1]]:
            node = node.setdefault(tok, {})
    return reusable / total if total else 0.0
