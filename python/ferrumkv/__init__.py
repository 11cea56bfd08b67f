"""ferrumkv: a paged KV-cache engine for LLM serving, with a Rust core.

A cache, and a sequence in it (the README's "Quickstart" runs one end to end):

    import ferrumkv
    cfg = ferrumkv.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=128)
    async with ferrumkv.KvCache(cfg) as cache:
        seq = await cache.allocate("req-1", list(range(100)))
"""

from __future__ import annotations

from ._core import EVICTION_POLICIES, BatchLayout, CacheConfig, KvView, SequenceHandle, __version__
from .cache import KvCache, Subscription
from .errors import (
    CacheClosedError,
    CopyError,
    CudaError,
    CudaUnavailableError,
    DuplicateRequestError,
    FerrumKVError,
    InvalidStateError,
    OutOfBlocksError,
    RemoteUnavailableError,
    UnknownRequestError,
)
from .types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheStats,
    EvictionEvent,
    GcStats,
    IterationStats,
    PrefixMatch,
    PressureEvent,
    PressureLevel,
    TierStats,
)

__all__ = [
    "EVICTION_POLICIES",
    "AllBlocksCleared",
    "BatchLayout",
    "BlockRemoved",
    "BlockStored",
    "CacheClosedError",
    "CacheConfig",
    "CacheStats",
    "CopyError",
    "CudaError",
    "CudaUnavailableError",
    "DuplicateRequestError",
    "EvictionEvent",
    "FerrumKVError",
    "GcStats",
    "InvalidStateError",
    "IterationStats",
    "KvCache",
    "KvView",
    "OutOfBlocksError",
    "PrefixMatch",
    "PressureEvent",
    "PressureLevel",
    "RemoteUnavailableError",
    "SequenceHandle",
    "Subscription",
    "TierStats",
    "UnknownRequestError",
    "__version__",
]
