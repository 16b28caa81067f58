"""Deterministic shared-prefix workloads and their best possible cache hit rate.

Two kinds: chat workloads in words (`ChatRequest`s: the demo's hand-written assistants, and
`SharedPrefixWorkload`'s synthetic ones), and token-level workloads (`Conversation`s) that
`radixkv bench`, `bench/` and the radix-cache traces (`radixkv.tools.traces`) run.
"""

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


class PrefixTrie:
    """Every token sequence seen so far, as a trie: the best any prefix cache could reuse."""

    def __init__(self) -> None:
        self._root: dict = {}
        self.size = 0  # distinct prefixes (tokens) held

    def match(self, tokens: Sequence[int]) -> int:
        """Length of the longest prefix of `tokens[:-1]` seen before (a cache never serves the
        last prompt token: one token must be computed to get logits)."""
        node, n = self._root, 0
        for tok in tokens[:-1]:
            if tok not in node:
                break
            node, n = node[tok], n + 1
        return n

    def insert(self, tokens: Sequence[int]) -> None:
        node = self._root
        for tok in tokens:
            if tok not in node:
                node[tok] = {}
                self.size += 1
            node = node[tok]


def best_hit_rate(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], page_size: int = 1
) -> float:
    """Best possible hit rate of requests served in order, each `(prompt ids, output ids)`.

    Every distinct prefix is computed once: request i can at best reuse the longest common prefix
    of its prompt with any earlier prompt + output[:-1] (the last output token never has KV),
    never its last prompt token, page-aligned.
    Returns Σ best reusable tokens ÷ Σ prompt tokens.
    """
    trie = PrefixTrie()
    reusable = total = 0
    for prompt, output in sequences:
        reusable += trie.match(prompt) // page_size * page_size
        total += len(prompt)
        trie.insert([*prompt, *output[:-1]])
    return reusable / total if total else 0.0


# ---- token-level workloads for `radixkv bench` ---------------------------------------------------
#
# A workload is a list of conversations. Each has a fixed prefix (system prompt, instruction and
# examples) and one or more turns; turn t's prompt is the prefix, every earlier turn's user tokens
# and generated output, then turn t's user tokens. A runner sends a conversation's next turn only
# after the previous one returned, with the real output in its prompt.

TOKEN_LOW, TOKEN_HIGH = 1000, 40000  # plain-vocabulary ids of SmolLM2 (no special tokens)


@dataclass(frozen=True)
class Turn:
    user_ids: list[int]
    max_new_tokens: int


@dataclass(frozen=True)
class Conversation:
    prefix_ids: list[int]
    turns: list[Turn]
    group: int = 0


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]


@dataclass(frozen=True)
class GeneratedSharedPrefix:
    """SGLang's generated-shared-prefix benchmark: `groups` system prompts, `prompts_per_group`
    questions each, shuffled. SGLang's defaults are 64 x 16, 2048, 128, 256; ours are sized for a
    2-core CPU (8 x 8, 1024, 64, 32) and take those as arguments."""

    groups: int = 8
    prompts_per_group: int = 8
    system_len: int = 1024
    question_len: int = 64
    output_len: int = 32
    seed: int = 0

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        systems = [_ids(rng, self.system_len) for _ in range(self.groups)]
        convs = [
            Conversation(systems[g], [Turn(_ids(rng, self.question_len), self.output_len)], g)
            for g in range(self.groups)
            for _ in range(self.prompts_per_group)
        ]
        rng.shuffle(convs)
        return convs


@dataclass(frozen=True)
class MultiTurnChat:
    """`chats` conversations over one system prompt, `turns` turns each (with `min_turns`, each
    chat's count drawn uniformly from `min_turns..turns`, so the length of a conversation does not
    say whether it goes on); every prompt carries the whole history (previous user turns and the
    model's real replies)."""

    chats: int = 16
    turns: int = 4
    system_len: int = 256
    user_len: int = 64
    output_len: int = 32
    seed: int = 0
    min_turns: int = 0  # 0: every chat has `turns` turns

    def __post_init__(self) -> None:
        if not 0 <= self.min_turns <= self.turns:
            raise ValueError(f"min_turns {self.min_turns} must be 0 or at most turns {self.turns}")

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        lengths = random.Random(self.seed + 1)  # its own stream: fixed-length chats unchanged
        system = _ids(rng, self.system_len)
        convs = []
        for c in range(self.chats):
            turns = [Turn(_ids(rng, self.user_len), self.output_len) for _ in range(self.turns)]
            if self.min_turns:
                turns = turns[: lengths.randint(self.min_turns, self.turns)]
            convs.append(Conversation(system, turns, c))
        return convs


@dataclass(frozen=True)
class FewShotTree:
    """A shared instruction, `branches` example sets under it (each `sub_branches` deep again),
    then `questions` per leaf: a tree of shared prefixes, as in few-shot evaluation."""

    instruction_len: int = 256
    branches: int = 4
    examples_len: int = 256
    sub_branches: int = 2
    sub_examples_len: int = 128
    questions: int = 4
    question_len: int = 32
    output_len: int = 16
    seed: int = 0

    def conversations(self) -> list[Conversation]:
        rng = random.Random(self.seed)
        instruction = _ids(rng, self.instruction_len)
        convs = []
        for b in range(self.branches):
            examples = instruction + _ids(rng, self.examples_len)
            for _ in range(self.sub_branches):
                prefix = examples + _ids(rng, self.sub_examples_len)
                for _ in range(self.questions):
                    turn = Turn(_ids(rng, self.question_len), self.output_len)
                    convs.append(Conversation(prefix, [turn], b))
        rng.shuffle(convs)
        return convs


WORKLOADS = {
    "shared-prefix": GeneratedSharedPrefix,
    "multi-turn": MultiTurnChat,
    "few-shot": FewShotTree,
}
