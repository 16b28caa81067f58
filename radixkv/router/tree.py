"""The router's view of one worker's radix cache: a radix tree of token keys without KV.

With cache events (`CacheEvent`), the tree follows the worker's own: "stored" inserts a path,
"removed" cuts one back, "cleared" empties it. The router also inserts each prompt it sends there
at once (the worker will cache it as soon as it is prefilled), so a burst of requests sharing a
prefix follows the first one before the worker's events arrive. Without events the tree only
knows what was routed there and forgets the least recently routed paths past `max_tokens`
(SGLang's router keeps such an approximate tree).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence


class _Node:
    __slots__ = ("children", "key", "last_access", "parent")

    def __init__(self, key: list[int], parent: _Node | None, clock: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_access = clock


class PrefixTree:
    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens  # None: no limit (the worker's events bound it)
        self._clock = itertools.count(1)
        self.clear()

    def clear(self) -> None:
        self.root = _Node([], None, 0)
        self.size = 0  # tokens held

    def match(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the tree holds."""
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            m = _common(child.key, tokens, pos)
            pos += m
            if m < len(child.key):
                break
            node = child
        return pos

    def insert(self, tokens: Sequence[int]) -> None:
        """Add the path `tokens` (marking it as just used); past `max_tokens`, forget the least
        recently used leaves."""
        clock = next(self._clock)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = _Node(list(tokens[pos:]), node, clock)
                node.children[tokens[pos]] = leaf
                self.size += len(leaf.key)
                break
            m = _common(child.key, tokens, pos)
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = clock
            node, pos = child, pos + m
        if self.max_tokens is not None and self.size > self.max_tokens:
            self._forget_lru(self.size - self.max_tokens)

    def remove(self, tokens: Sequence[int], keep: int) -> None:
        """Cut the path `tokens` back to its first `keep` tokens: everything the tree holds below
        that point along this path goes (a worker evicted that leaf)."""
        node, pos = self.root, 0
        while pos < keep:
            child = node.children.get(tokens[pos])
            if child is None:
                return
            m = _common(child.key, tokens, pos, keep)
            if m < len(child.key):
                if pos + m < keep:
                    return  # the tree branches off this path before `keep`: nothing to cut
                child = self._split(child, m)
            node, pos = child, pos + m
        if keep < len(tokens):
            child = node.children.get(tokens[keep])
            if child is not None:
                self._drop(child)

    def _split(self, child: _Node, m: int) -> _Node:
        parent = child.parent
        assert parent is not None
        head = _Node(child.key[:m], parent, child.last_access)
        child.key = child.key[m:]
        child.parent = head
        head.children[child.key[0]] = child
        parent.children[head.key[0]] = head
        return head

    def _drop(self, node: _Node) -> None:
        """Remove `node` and its subtree."""
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[0]]
        stack = [node]
        while stack:
            n = stack.pop()
            self.size -= len(n.key)
            stack.extend(n.children.values())

    def _forget_lru(self, tokens: int) -> None:
        """Drop least recently used leaves until `tokens` are gone (one walk, then a heap:
        amortized over the inserts that grew the tree past its limit)."""
        heap = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        freed = 0
        target = tokens + (self.max_tokens or 0) // 8  # some slack: walk rarely
        while heap and freed < target:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            freed += len(leaf.key)
            self._drop(leaf)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n is not self.root:
                out.append(n)
        return out


def _common(edge: list[int], tokens: Sequence[int], pos: int, limit: int | None = None) -> int:
    """The length of the common prefix of `edge` and `tokens[pos:limit]`."""
    end = min(len(edge), (len(tokens) if limit is None else limit) - pos)
    if edge[:end] == list(tokens[pos : pos + end]):  # the usual case, compared in C
        return end
    i = 0
    while i < end and edge[i] == tokens[pos + i]:
        i += 1
    return i
