"""The exception tree of ferrumkv: every error the engine raises is a `FerrumKVError`."""

from __future__ import annotations

__all__ = [
    "CacheClosedError",
    "CopyError",
    "CudaError",
    "CudaUnavailableError",
    "DuplicateRequestError",
    "FerrumKVError",
    "InvalidStateError",
    "OutOfBlocksError",
    "RemoteUnavailableError",
    "UnknownRequestError",
]


class FerrumKVError(Exception):
    """Base of every error the engine raises (bad argument types/values raise the
    built-in TypeError / ValueError; a tier too large for the memory left, MemoryError)."""


class OutOfBlocksError(FerrumKVError):
    """Not enough blocks: the request can never fit, or waiting ended (timeout)."""


class UnknownRequestError(FerrumKVError, KeyError):
    """No live sequence has this request id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DuplicateRequestError(FerrumKVError, ValueError):
    """A live or waiting sequence already has this request id."""


class InvalidStateError(FerrumKVError):
    """The call does not fit the sequence's state (e.g. extend of a swapped-out one)."""


class CacheClosedError(FerrumKVError):
    """The cache was closed."""


class CudaUnavailableError(FerrumKVError):
    """`device="cuda:N"` without a usable CUDA driver or GPU."""


class CopyError(FerrumKVError):
    """A block copy failed (a device fault, or a failure on the copy worker). The call that
    asked for it was undone: a swap leaves the sequence where it was."""


class CudaError(CopyError):
    """The GPU failed after the cache was built (a failed copy, a lost context). The cache
    stops serving: the call that saw it and every later call raise this; close the cache."""


class RemoteUnavailableError(FerrumKVError):
    """The store `remote_url` names could not be reached when the cache was built (within
    `remote_timeout_s`). With `remote_required=False` the cache runs local-only instead and
    keeps trying to reconnect."""
