"""The transport's errors (no Triton kernel here: importable before the interpreter is chosen)."""

from __future__ import annotations


class PeerTimeoutError(RuntimeError):
    """A wait for a peer rank gave up: the peer never arrived (or arrived too late)."""

    def __init__(self, rank: int, peer: int, phase: str, epoch: int):
        self.rank, self.peer, self.phase, self.epoch = rank, peer, phase, epoch
        super().__init__(f"rank {rank}: timed out in {phase} waiting for rank {peer} "
                         f"(call {epoch}); the Buffer cannot be used after this, create a new one")
