"""The transport's errors (no Triton kernel here: importable before the interpreter is chosen)."""

from __future__ import annotations


class PeerTimeoutError(RuntimeError):
    """A wait for a peer rank gave up: the peer never arrived (or arrived too late)."""

    def __init__(self, rank: int, peer: int, phase: str, epoch: int):
        self.rank, self.peer, self.phase, self.epoch = rank, peer, phase, epoch
        super().__init__(f"rank {rank}: timed out in {phase} waiting for rank {peer} "
                         f"(call {epoch}); the Buffer cannot be used after this, create a new one")


class PathMismatchError(PeerTimeoutError):
    """Ranks took different paths for the same dispatch call (a different ``num_tokens_hint`` in
    mode "auto", or one rank's expert layout against another's flat one): a kernel waiting for a
    peer saw it announce this call on another path and gave up at once instead of timing out.
    Like a timeout it leaves the ranks out of step: the Buffer cannot be used after it."""

    def __init__(self, rank: int, peer: int, mine: str, theirs: str, call: int):
        self.rank, self.peer, self.phase, self.epoch = rank, peer, "dispatch", call
        self.mine, self.theirs = mine, theirs
        RuntimeError.__init__(
            self, f"rank {rank}: dispatch call {call} took the {mine!r} path here but the {theirs!r} path on rank "
            f"{peer}: every rank must make the same call (the same num_tokens_hint in mode 'auto', the same "
            f"layout); the Buffer cannot be used after this, create a new one")


class BadCallError(ValueError):
    """A call's input the kernels refused on the device (found without a host synchronisation);
    raised at the next check. What was refused was left out of that call's results."""

    def __init__(self, rank: int, message: str, epoch: int):
        self.rank, self.epoch = rank, epoch
        super().__init__(f"rank {rank}: {message} (call {epoch}; that call's results leave it out, the Buffer "
                         f"stays usable)")
