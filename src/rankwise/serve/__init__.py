"""rankwise.serve: many adapters on one base model, batched together.

    from rankwise.serve import Engine, GenerationRequest
    with Engine("smollm2", "adapters/") as engine:
        handle = engine.submit(GenerationRequest(model="my-adapter", prompt="Hi", max_tokens=8))
        print(handle.result().text)

The engine (:mod:`rankwise.serve.engine`) runs continuous batching over a KV cache; rows of
one batch use different adapters (:func:`rankwise.adapters.inject.route`); adapters load on
demand into a pool with a memory budget and LRU eviction (:mod:`rankwise.serve.pool`).
"""

from rankwise.serve.engine import Engine
from rankwise.serve.requests import (
    Completion,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    TokenEvent,
    UnknownAdapterError,
)

__all__ = [
    "Engine",
    "GenerationRequest",
    "TokenEvent",
    "Completion",
    "RequestHandle",
    "UnknownAdapterError",
    "QueueFullError",
]
