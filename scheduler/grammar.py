"""Structured output: token masks from a grammar engine (xgrammar), for the requests that ask.

A request with `json_schema`, `regex` or `ebnf` gets a matcher before it is admitted.
Compilations are cached by grammar text, so a schema many requests share compiles once; one not
compiled yet is compiled on a worker thread (xgrammar releases the GIL), and so is the compiler
itself (0.6–1 s here: the tokenizer's vocabulary), so the scheduler goes on serving everyone else
meanwhile. Each step, the rows of
constrained requests get their allowed-token mask applied to a copy of their logits (the other
requests' logits are untouched, and log probabilities stay the model's); after sampling, the
matcher accepts the token, and a request whose grammar is complete stops.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from radixkv.protocol import SamplingParams

CACHE_SIZE = 256  # compiled grammars kept


class GrammarError(ValueError):
    """A grammar the engine cannot compile; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class GrammarBackend:
    """Compiles grammars with the model's tokenizer (loaded on the first constrained request)
    and masks logits. `model` is what `radixkv.tokenizer.load_tokenizer` takes."""

    def __init__(self, model: str, vocab_size: int, json_max_whitespace: int = 1) -> None:
        self.model = model
        self.vocab_size = vocab_size
        # Whitespace a JSON output may put between its tokens: -1 any, 0 none (compact), n at
        # most n characters in a row. A small model given any whitespace often pads with spaces
        # and newlines until max_tokens; given none, it may run a number's digits on instead of
        # ending it: `bench/json_output.py` (docs/api.md has its figures).
        self.json_max_whitespace = json_max_whitespace
        self._compiler: Any = None  # made (and used) on the worker thread only
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()  # LRU, CACHE_SIZE
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="radixkv-grammar")

    def matcher(self, params: SamplingParams) -> Any:
        """A fresh matcher for the request's grammar, compiled now if need be (blocking);
        raises GrammarError."""
        return self.matcher_async(params).result()

    def ready_matcher(self, params: SamplingParams) -> Any | None:
        """A fresh matcher if the grammar is compiled already, else None (no waiting)."""
        import xgrammar as xgr

        with self._lock:
            compiled = self._compiled.get(params.grammar or ("", ""))
        return None if compiled is None else xgr.GrammarMatcher(compiled)

    def matcher_async(self, params: SamplingParams) -> Future[Any]:
        """A matcher, compiled on the worker thread; the future raises GrammarError."""
        return self._worker.submit(self._make_matcher, *(params.grammar or ("", "")))

    def _make_matcher(self, kind: str, text: str) -> Any:
        import xgrammar as xgr

        with self._lock:
            compiled = self._compiled.get((kind, text))
        if compiled is None:
            try:
                compiled = self._compile(kind, text)
            except Exception as exc:  # a client's grammar must never stop the scheduler
                raise GrammarError(
                    f"the {kind} does not compile: {str(exc).strip()}", kind
                ) from None
            with self._lock:
                self._compiled[(kind, text)] = compiled
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        with self._lock:
            self._compiled.move_to_end((kind, text))
        return xgr.GrammarMatcher(compiled)

    def _compile(self, kind: str, text: str) -> Any:
        compiler = self._get_compiler()
        if kind == "json_schema":
            n = self.json_max_whitespace
            return compiler.compile_json_schema(
                text, any_whitespace=n != 0, max_whitespace_cnt=None if n < 0 else n or None
            )
        if kind == "regex":
            return compiler.compile_regex(text)
        return compiler.compile_grammar(text)

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            from radixkv.tokenizer import load_tokenizer

            info = xgr.TokenizerInfo.from_huggingface(
                load_tokenizer(self.model), vocab_size=self.vocab_size
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def mask(self, logits: torch.Tensor, matchers: Sequence[Any]) -> torch.Tensor:
        """`logits` with each row whose matcher is set limited to the tokens its grammar allows
        next (a new tensor if any row is constrained)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, i in enumerate(rows):
            matchers[i].fill_next_token_bitmask(bitmask, j)
        sub = logits[rows].float()
        xgr.apply_token_bitmask_inplace(sub, bitmask.to(sub.device))
        out = logits.clone()
        out[rows] = sub.to(out.dtype)
        return out
