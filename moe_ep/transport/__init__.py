"""Where the bytes live (the symmetric heap) and how kernels reach peers (device primitives).

Names load their modules on first use (PEP 562): the heap and the error types define no Triton
kernel, so ``moe_ep.heap_bytes`` or ``except moe_ep.PeerTimeoutError`` before
``moe_ep.use_interpreter()`` leave the choice of interpreter open; ``SyncState`` loads the
device primitives.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moe_ep.transport.errors import BadCallError, PathMismatchError, PeerTimeoutError
from moe_ep.transport.heap import ALIGN, BACKENDS, Region, SymmetricHeap, carve, default_backend

if TYPE_CHECKING:
    from moe_ep.transport.sync import SyncState

__all__ = ["ALIGN", "BACKENDS", "Region", "SymmetricHeap", "carve", "default_backend",
           "BadCallError", "PathMismatchError", "PeerTimeoutError", "SyncState"]


def __getattr__(name: str):
    if name != "SyncState":
        raise AttributeError(f"module 'moe_ep.transport' has no attribute {name!r}")
    value = globals()[name] = importlib.import_module("moe_ep.transport.sync").SyncState
    return value
