"""radixkv: a small LLM serving runtime built around radix-tree prefix caching.

`import radixkv` stays cheap (no torch, no zmq): the public names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Runtime": "radixkv.runtime",
    "RuntimeStartError": "radixkv.runtime",
    "Client": "radixkv.client",
    "Stream": "radixkv.streams",
    "AsyncClient": "radixkv.async_client",
    "AsyncStream": "radixkv.streams",
    "Result": "radixkv.client_common",
    "RequestError": "radixkv.client_common",
    "ConnectionLost": "radixkv.client_common",
    "ServerArgs": "radixkv.config",
    "Stats": "radixkv.protocol",
    "ChatMessage": "radixkv.protocol",
    "SamplingParams": "radixkv.protocol",  # the keyword arguments of generate/chat, as a struct
}

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "ChatMessage",
    "Client",
    "ConnectionLost",
    "RequestError",
    "Result",
    "Runtime",
    "RuntimeStartError",
    "SamplingParams",
    "ServerArgs",
    "Stats",
    "Stream",
]

if TYPE_CHECKING:
    from radixkv.async_client import AsyncClient
    from radixkv.client import Client
    from radixkv.client_common import ConnectionLost, RequestError, Result
    from radixkv.config import ServerArgs
    from radixkv.protocol import ChatMessage, Stats
    from radixkv.protocol import WireSamplingParams as SamplingParams
    from radixkv.runtime import Runtime, RuntimeStartError
    from radixkv.streams import AsyncStream, Stream


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radixkv' has no attribute {name!r}")
    attr = "WireSamplingParams" if name == "SamplingParams" else name
    return getattr(importlib.import_module(module), attr)
