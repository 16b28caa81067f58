"""radixkv: a small LLM serving runtime built around radix-tree prefix caching.

`import radixkv` stays cheap (no torch, no zmq): the public names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Runtime": "radixkv.launcher",
    "RuntimeStartError": "radixkv.launcher",
    "Client": "radixkv.client.sync",
    "Stream": "radixkv.client.streams",
    "AsyncClient": "radixkv.client.aio",
    "AsyncStream": "radixkv.client.streams",
    "Result": "radixkv.client.results",
    "RequestError": "radixkv.client.results",
    "ConnectionLost": "radixkv.client.results",
    "ServerArgs": "radixkv.config",
    "Stats": "radixkv.protocol",
    "ChatMessage": "radixkv.protocol",
    "SamplingParams": "radixkv.protocol",  # the keyword arguments of generate/chat, as a struct
    "SessionParams": "radixkv.protocol",  # session= of any call: the request it continues
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
    "SessionParams",
    "Stats",
    "Stream",
]

if TYPE_CHECKING:
    from radixkv.client.aio import AsyncClient
    from radixkv.client.results import ConnectionLost, RequestError, Result
    from radixkv.client.streams import AsyncStream, Stream
    from radixkv.client.sync import Client
    from radixkv.config import ServerArgs
    from radixkv.launcher import Runtime, RuntimeStartError
    from radixkv.protocol import ChatMessage, SamplingParams, SessionParams, Stats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radixkv' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
