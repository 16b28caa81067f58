"""radixkv: a small LLM serving runtime built around radix-tree prefix caching."""

from __future__ import annotations

__version__ = "0.1.0"
