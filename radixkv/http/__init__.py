"""The HTTP server of a runtime (a thread of the runtime process): the OpenAI-compatible and native
routes, their request bodies and errors, the gateway to the runtime's client endpoint, and the
Prometheus metrics."""
