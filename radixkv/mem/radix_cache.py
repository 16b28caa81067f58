"""Level 1 of the KV hierarchy: a radix tree from token runs to the KV slots that hold them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from sortedcontainers import SortedKeyList

from radixkv.mem.eviction import eviction_key, gdsf_score
from radixkv.mem.token_to_kv_pool import TokenToKVPool
from radixkv.protocol import CacheEvent

_EMPTY = torch.empty(0, dtype=torch.int64)


class TreeNode:
    """One edge of the tree: a run of tokens (`key`) and the KV slots holding them (`value`).

    `lock_ref` counts the running requests whose cached prefix passes through this node; a node
    with `lock_ref == 0` and no children is an evictable leaf.
    """

    __slots__ = (
        "children", "created", "depth", "hits", "id", "keep", "key", "last_access", "lock_ref",
        "parent", "priority", "score", "value",
    )  # fmt: skip

    def __init__(self, node_id: int, key: list[int], value: torch.Tensor, parent: TreeNode | None):
        self.id = node_id
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int | tuple[int, ...], TreeNode] = {}
        self.lock_ref = 0
        self.last_access = 0
        # what eviction policies order leaves by (radixkv.mem.eviction)
        self.hits = 0  # 1 when cached, + 1 each time a match ends in it (`_touch`)
        self.created = 0  # the clock when its tokens were first cached
        self.depth: int = 0 if parent is None else parent.depth + len(parent.key)  # tokens above
        self.score = 0.0  # gdsf
        self.priority = 0  # the highest `priority` of the requests cached through it
        # 0 once `demote` marked it as needed by no one (a closed session's): evicted before
        # every node still at 1; any use sets it back to 1
        self.keep = 1

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


class MatchResult(NamedTuple):
    """Slots of the longest cached prefix and the node that ends it (lock it to keep them)."""

    indices: torch.Tensor
    last_node: TreeNode


class IntegrityError(AssertionError):
    """A broken invariant of the KV hierarchy: a bug, never a user error."""


def _as_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, list):
        return tokens
    if isinstance(tokens, torch.Tensor):
        return tokens.tolist()
    return list(tokens)


class RadixCache:
    """Prefix cache: token sequences → KV slot indices, shared between requests.

    - `match_prefix(tokens)` finds the longest cached, page-aligned prefix, never the last token
      (one token must always be computed to get logits).
    - `insert(tokens, slots)` caches a sequence and returns how many leading tokens were already
      present; the caller frees its own slots for those (the tree keeps its copies).
    - `lock(node)` / `unlock(node)` protect a matched prefix from eviction while a request uses it.
    - `evict(n)` frees unlocked leaves, leaf first, in the order of `eviction_policy` (least
      recently used by default; `radixkv.mem.eviction`), until `n` slots are free.

    Evictable leaves live in a list sorted by the policy's key (for LRU: last access, node id),
    updated incrementally on every touch, lock and unlock, so an eviction costs O(k log n) for k
    leaves, never a walk of the tree.
    The access clock is a counter ticked once per `match_prefix` / `insert`, so runs are
    deterministic. With `disable=True` nothing is ever cached (ablation mode).
    """

    def __init__(
        self, kv_pool: TokenToKVPool, *, disable: bool = False, eviction_policy: str = "lru"
    ) -> None:
        self.kv_pool = kv_pool
        self.page_size = kv_pool.page_size
        self.disable = disable
        self.eviction_policy = eviction_policy
        self._evict_key = eviction_key(eviction_policy)
        self._ids = itertools.count()
        self.evicted_tokens = 0  # monotonic: every slot `evict` ever freed
        # with `record_events()`: what was stored and removed since `take_events()` (a router's
        # view of this tree; docs/scaling.md)
        self.events: list[CacheEvent] | None = None
        # called with each leaf `evict` is about to free (a second KV tier copies it out)
        self.on_evict: Callable[[TreeNode], None] | None = None
        self.reset_tree()

    def record_events(self) -> None:
        """From now on, note every path stored and every leaf evicted (`take_events`)."""
        self.events = []

    def take_events(self) -> list[CacheEvent]:
        """The events since the last call (none unless `record_events` was called)."""
        events, self.events = self.events, [] if self.events is not None else None
        return events or []

    # ---- size info ---------------------------------------------------------------------------

    def evictable_size(self) -> int:
        """Cached tokens no running request holds: eviction can free them."""
        return self._evictable

    def protected_size(self) -> int:
        """Cached tokens locked by running requests."""
        return self._protected

    def total_size(self) -> int:
        """Tokens in the tree."""
        return self._evictable + self._protected

    def num_evictable_leaves(self) -> int:
        return len(self._lru)

    # ---- lookup and insert --------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int] | torch.Tensor) -> MatchResult:
        """Longest cached prefix of `tokens[:-1]`, page-aligned; splits an edge where it ends."""
        if self.disable:
            return MatchResult(_EMPTY, self.root)
        key = _as_list(tokens)
        limit = (len(key) - 1) // self.page_size * self.page_size if key else 0
        return self._match(key, limit)

    def match_full(self, tokens: Sequence[int] | torch.Tensor) -> MatchResult:
        """Like `match_prefix`, but may match every token (used when re-pointing a request)."""
        if self.disable:
            return MatchResult(_EMPTY, self.root)
        key = _as_list(tokens)
        return self._match(key, len(key) // self.page_size * self.page_size)

    def peek_prefix(self, tokens: Sequence[int] | torch.Tensor) -> tuple[int, TreeNode]:
        """Length `match_prefix` would return, and the deepest node it reaches, without touching
        access times or splitting edges (for scheduling decisions)."""
        key = _as_list(tokens)
        return self._peek(key, (len(key) - 1) // self.page_size * self.page_size if key else 0)

    def peek_full(self, tokens: Sequence[int] | torch.Tensor) -> tuple[int, TreeNode]:
        """Like `peek_prefix`, but every token may match."""
        key = _as_list(tokens)
        return self._peek(key, len(key) // self.page_size * self.page_size)

    def _peek(self, key: list[int], limit: int) -> tuple[int, TreeNode]:
        if self.disable:
            return 0, self.root
        node, pos = self.root, 0
        while pos < limit:
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            m = self._common_len(child.key, key, pos, limit)
            node, pos = child, pos + m
            if m < len(child.key):
                break
        return pos, node

    def refresh(self, nodes: Sequence[TreeNode]) -> None:
        """Mark `nodes` (where `peek_prefix` ended for the requests of a queue) and the paths to
        them used now, as a match would: one tick of the access clock for all of them, no hit
        counted, no edge split. Waiting requests will reuse them (`SchedulePolicy`), so they
        should not look stale to the eviction policy while the requests wait."""
        self._clock += 1
        seen: set[int] = set()
        for node in nodes:
            walk: TreeNode | None = node
            while walk is not None and walk is not self.root and id(walk) not in seen:
                seen.add(id(walk))
                self._touch(walk)
                walk = walk.parent

    def demote(self, tokens: Sequence[int] | torch.Tensor, shared_len: int = 0) -> int:
        """Mark the cached path of `tokens` past its first `shared_len` tokens as needed by no
        one (a closed session's conversation, `radixkv.frontend.sessions`): its nodes go before
        every other leaf, in the policy's order among themselves, until a match, insert or
        refresh uses them again. From the end of the path up, a node is marked only when it
        lies wholly inside `tokens[shared_len:]` and every child it has is marked already (a
        node another path goes on from is that path's too). Nothing is touched, split or freed;
        returns the tokens marked."""
        key = _as_list(tokens)
        pos, node = self._peek(key, len(key))
        if node is not self.root and pos < node.depth + len(node.key):
            node = node.parent  # type: ignore[assignment]  # only partly inside: someone else's
        marked = 0
        while node is not self.root:
            if node.depth < shared_len or any(c.keep for c in node.children.values()):
                break
            if node.keep:
                listed = node.lock_ref == 0 and not node.children
                if listed:
                    self._lru.remove(node)  # out while its key changes
                node.keep = 0
                if listed:
                    self._lru.add(node)
                marked += len(node.key)
            node = node.parent  # type: ignore[assignment]
        return marked

    def path_of(self, node: TreeNode) -> list[int]:
        """The keys from the root to the end of `node`."""
        return self._path(node)

    def path_values(self, node: TreeNode) -> torch.Tensor:
        """The slots from the root to the end of `node`."""
        parts: list[torch.Tensor] = []
        while node is not self.root:
            parts.append(node.value)
            node = node.parent  # type: ignore[assignment]
        return torch.cat(parts[::-1]) if parts else _EMPTY

    def insert(
        self,
        tokens: Sequence[int] | torch.Tensor,
        slots: torch.Tensor,
        start: tuple[TreeNode, int] | None = None,
        priority: int = 0,
    ) -> int:
        """Cache the page-aligned part of `tokens` held in `slots`; return the length already
        present (a page multiple).

        The tree takes ownership of `slots[present:aligned]`. The caller still owns, and must free,
        `slots[:present]` (duplicates of what the tree has) and `slots[aligned:]` (the unaligned
        tail). Disabled, the tree takes nothing and the whole aligned length counts as present.

        `start = (node, n)`: a node the caller holds locked whose path is `tokens[:n]` (a request's
        `last_node` and `cached_len`): the walk resumes there instead of comparing those `n`
        tokens again. The result is the same as inserting from the root.

        `priority` (a request's, for the `priority` eviction policy) raises every node on the path
        to at least that value.
        """
        return self.insert_and_match(tokens, slots, start, priority)[0]

    def insert_and_match(
        self,
        tokens: Sequence[int] | torch.Tensor,
        slots: torch.Tensor,
        start: tuple[TreeNode, int] | None = None,
        priority: int = 0,
    ) -> tuple[int, torch.Tensor, TreeNode]:
        """`insert`, also returning the tree's slots for `tokens[n:aligned]` (n = the start's
        length, or 0) and the node that ends at `aligned`: what re-pointing a running request at
        the tree needs, without a second walk."""
        key = _as_list(tokens)
        if slots.shape[0] < len(key):
            raise ValueError(f"insert: {len(key)} tokens but only {slots.shape[0]} slots")
        aligned = len(key) // self.page_size * self.page_size
        if self.disable:
            return aligned, _EMPTY, self.root
        self._clock += 1
        node, pos = start if start is not None else (self.root, 0)
        if pos % self.page_size or pos > aligned:
            raise ValueError(f"insert: start length {pos} is not a page boundary within {aligned}")
        walk = node
        while walk is not self.root:  # the path above the start counts as used, as from the root
            self._touch(walk, priority=priority)
            walk = walk.parent  # type: ignore[assignment]
        values: list[torch.Tensor] = []
        present = aligned
        while pos < aligned:
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                present = pos
                node = self._add_leaf(node, key[pos:aligned], slots[pos:aligned], priority)
                if self.events is not None:
                    self.events.append(CacheEvent("stored", key[:aligned]))
                values.append(node.value)
                break
            m = self._common_len(child.key, key, pos, aligned)
            if m < len(child.key):
                child = self._split(child, m)
            self._touch(child, priority=priority)
            values.append(child.value)
            node, pos = child, pos + m
        if not values:
            return present, _EMPTY, node
        return present, values[0] if len(values) == 1 else torch.cat(values), node

    # ---- locking ------------------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (one reference per call)."""
        while node is not self.root:
            if node.lock_ref == 0:
                if not node.children:
                    self._lru.remove(node)
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        """Drop one reference taken by `lock(node)`."""
        while node is not self.root:
            if node.lock_ref <= 0:
                raise IntegrityError(f"unlock of {node!r}, which is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
                if not node.children:
                    self._rescore(node)
                    self._lru.add(node)
            node = node.parent  # type: ignore[assignment]

    # ---- eviction -----------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until `num_tokens` slots are freed (or nothing
        evictable is left); return the number of slots freed."""
        freed: list[torch.Tensor] = []
        count = 0
        while count < num_tokens and self._lru:
            node = self._lru.pop(0)
            if self.on_evict is not None:
                self.on_evict(node)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key, 0)]
            freed.append(node.value)
            if self.events is not None:
                path = self._path(node)
                self.events.append(CacheEvent("removed", path, len(path) - len(node.key)))
            count += len(node.key)
            self._evictable -= len(node.key)
            if parent is not self.root and parent.lock_ref == 0 and not parent.children:
                self._rescore(parent)
                self._lru.add(parent)
        if freed:
            self.kv_pool.free(torch.cat(freed))
        self.evicted_tokens += count
        return count

    # ---- whole tree ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop every cached prefix and free its slots. Only valid when nothing is locked."""
        if self._protected:
            raise IntegrityError(f"reset with {self._protected} tokens still locked")
        slots = [n.value for n in self._nodes() if n is not self.root]
        if slots:
            self.kv_pool.free(torch.cat(slots))
        self.reset_tree()

    def reset_tree(self) -> None:
        """Forget the tree without freeing anything (the pool is being cleared too)."""
        self.root = TreeNode(next(self._ids), [], _EMPTY, None)
        self._lru: SortedKeyList = SortedKeyList(key=self._evict_key)  # evictable leaves
        self._evictable = 0
        self._protected = 0
        self._clock = 0
        if self.events is not None:
            self.events.append(CacheEvent("cleared", []))

    def cached_slots(self) -> torch.Tensor:
        """Every slot the tree holds (for integrity checks and tests; walks the tree)."""
        values = [n.value for n in self._nodes() if n is not self.root]
        return torch.cat(values) if values else _EMPTY

    def check_integrity(self) -> None:
        """Raise IntegrityError if the tree's bookkeeping is inconsistent (walks the tree)."""
        evictable = protected = 0
        leaves = set()
        for node in self._nodes():
            if node is self.root:
                continue
            parent = node.parent
            _expect(
                parent is not None and parent.children.get(self._child_key(node.key, 0)) is node,
                f"{node!r} is not its parent's child",
            )
            _expect(
                len(node.key) > 0 and len(node.key) % self.page_size == 0,
                f"{node!r} has a key of {len(node.key)} tokens (page {self.page_size})",
            )
            _expect(len(node.key) == len(node.value), f"{node!r} key and value lengths differ")
            _expect(node.lock_ref >= 0, f"{node!r} has a negative lock count")
            _expect(
                parent is self.root or parent.lock_ref >= node.lock_ref,  # type: ignore[union-attr]
                f"{node!r} is locked more than its parent",
            )
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                if not node.children:
                    leaves.add(node.id)
        _expect(evictable == self._evictable, f"evictable {self._evictable} != tree {evictable}")
        _expect(protected == self._protected, f"protected {self._protected} != tree {protected}")
        _expect({n.id for n in self._lru} == leaves, "the LRU list is not the evictable leaves")
        lru_keys = [self._evict_key(n) for n in self._lru]
        _expect(lru_keys == sorted(lru_keys), "the eviction list is out of order")
        for n in self._nodes():
            parent = n.parent
            if parent is not None:
                depth = parent.depth + len(parent.key)
                _expect(n.depth == depth, f"{n!r} depth {n.depth} != {depth}")

    def pretty_print(self, max_tokens: int = 8) -> str:
        """The tree as text: first tokens of each edge, its length, lock count and access time."""
        lines = [f"root (evictable={self._evictable}, protected={self._protected})"]

        def walk(node: TreeNode, depth: int) -> None:
            for child in sorted(node.children.values(), key=lambda n: n.key):
                head = " ".join(map(str, child.key[:max_tokens]))
                more = " ..." if len(child.key) > max_tokens else ""
                lines.append(
                    f"{'  ' * depth}[{head}{more}] len={len(child.key)} "
                    f"lock={child.lock_ref} t={child.last_access}"
                )
                walk(child, depth + 1)

        walk(self.root, 1)
        return "\n".join(lines)

    # ---- internals ----------------------------------------------------------------------------

    def _child_key(self, key: list[int], pos: int) -> int | tuple[int, ...]:
        if self.page_size == 1:
            return key[pos]
        return tuple(key[pos : pos + self.page_size])

    def _common_len(self, edge: list[int], key: list[int], pos: int, limit: int) -> int:
        """Tokens (page-aligned) shared by `edge` and `key[pos:limit]`; list slices compare in C."""
        n = min(len(edge), limit - pos)
        if edge[:n] == key[pos : pos + n]:
            return n
        i, step = 0, 64
        while i + step <= n and edge[i : i + step] == key[pos + i : pos + i + step]:
            i += step
        while i < n and edge[i] == key[pos + i]:
            i += 1
        return i // self.page_size * self.page_size

    def _match(self, key: list[int], limit: int) -> MatchResult:
        self._clock += 1
        node, pos = self.root, 0
        values: list[torch.Tensor] = []
        while pos < limit:
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            m = self._common_len(child.key, key, pos, limit)
            if m < len(child.key):
                child = self._split(child, m)
            self._touch(child)
            values.append(child.value)
            node, pos = child, pos + m
        if not values:
            return MatchResult(_EMPTY, node)
        self._touch(node, hit=True)  # where the reuse ends: see `_touch`
        return MatchResult(values[0] if len(values) == 1 else torch.cat(values), node)

    def _path(self, node: TreeNode) -> list[int]:
        """The keys from the root to the end of `node`."""
        parts: list[list[int]] = []
        while node is not self.root:
            parts.append(node.key)
            node = node.parent  # type: ignore[assignment]
        return [t for part in reversed(parts) for t in part]

    def _rescore(self, node: TreeNode) -> None:
        """Set `node.score` from its fields (gdsf; an offline replay's policy overrides this to
        score by the next use, `radixkv.tools.traces.BeladyCache`). Called only while the node
        is out of the eviction list."""
        node.score = gdsf_score(node.hits, node.depth, node.last_access)

    def _touch(self, node: TreeNode, hit: bool = False, priority: int = 0) -> None:
        """Mark `node` used now. `hit`: a match ended in it, which frequency-based policies count:
        a request reused the path down to here and went its own way (a system prompt shared by
        many conversations collects hits; a conversation's own earlier turns, which its next
        turn only passes through, keep the one hit they got as its frontier, so a finished
        conversation's path does not outrank live ones when its tail is gone)."""
        listed = node.lock_ref == 0 and not node.children
        if listed:
            self._lru.remove(node)  # out while its key changes
        node.last_access = self._clock
        node.keep = 1
        node.hits += hit
        node.priority = max(node.priority, priority)
        self._rescore(node)
        if listed:
            self._lru.add(node)

    def _add_leaf(
        self, parent: TreeNode, key: list[int], value: torch.Tensor, priority: int = 0
    ) -> TreeNode:
        if parent is not self.root and parent.lock_ref == 0 and not parent.children:
            self._lru.remove(parent)
        leaf = TreeNode(next(self._ids), key, value.to(torch.int64, copy=True), parent)
        leaf.last_access = leaf.created = self._clock
        leaf.hits = 1
        leaf.priority = priority
        self._rescore(leaf)
        parent.children[self._child_key(key, 0)] = leaf
        self._evictable += len(key)
        self._lru.add(leaf)
        return leaf

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut `child` after `m` tokens; return the new upper node (it inherits lock and time)."""
        parent = child.parent
        assert parent is not None
        head = TreeNode(next(self._ids), child.key[:m], child.value[:m], parent)
        head.lock_ref = child.lock_ref
        head.last_access, head.hits, head.created = child.last_access, child.hits, child.created
        head.priority = child.priority
        head.score, head.keep = child.score, child.keep
        listed = child.lock_ref == 0 and not child.children
        if listed:
            self._lru.remove(child)  # out while its key changes
        child.key, child.value = child.key[m:], child.value[m:]
        child.depth += m
        self._rescore(child)
        if listed:
            self._lru.add(child)
        child.parent = head
        head.children[self._child_key(child.key, 0)] = child
        parent.children[self._child_key(head.key, 0)] = head
        return head

    def _nodes(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise IntegrityError(message)
