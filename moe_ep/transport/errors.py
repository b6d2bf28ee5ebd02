"""The transport's errors (no Triton kernel here: importable before the interpreter is chosen)."""

from __future__ import annotations


class PeerTimeoutError(RuntimeError):
    """A wait for a peer rank gave up: the peer never arrived (or arrived too late)."""

    def __init__(self, rank: int, peer: int, phase: str, epoch: int):
        self.rank, self.peer, self.phase, self.epoch = rank, peer, phase, epoch
        super().__init__(f"rank {rank}: timed out in {phase} waiting for rank {peer} "
                         f"(call {epoch}); the Buffer cannot be used after this, create a new one")


class BadCallError(ValueError):
    """A call's input the kernels refused on the device (found without a host synchronisation);
    raised at the next check. What was refused was left out of that call's results."""

    def __init__(self, rank: int, message: str, epoch: int):
        self.rank, self.epoch = rank, epoch
        super().__init__(f"rank {rank}: {message} (call {epoch}; that call's results leave it out, the Buffer "
                         f"stays usable)")
