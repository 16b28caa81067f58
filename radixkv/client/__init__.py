"""The clients of a runtime: `Client` (blocking) and `AsyncClient` (asyncio) over one ZMQ socket
each, their streams, and what they return or raise. Both share one core (`core.ClientAPI`); they
speak only the contract in `radixkv.protocol`."""
