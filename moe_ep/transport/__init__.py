"""Where the bytes live (the symmetric heap) and how kernels reach peers (device primitives)."""

from moe_ep.transport.heap import ALIGN, BACKENDS, Region, SymmetricHeap, carve, default_backend
from moe_ep.transport.sync import BadCallError, PeerTimeoutError, SyncState

__all__ = ["ALIGN", "BACKENDS", "Region", "SymmetricHeap", "carve", "default_backend",
           "BadCallError", "PeerTimeoutError", "SyncState"]
