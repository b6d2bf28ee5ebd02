"""Per-rank synchronisation state on the device: op epochs and the timeout status words.

Kernels advance each op's epoch themselves (see ``_finish_launch``), so consecutive calls and
CUDA-graph replays need no host-side reset. When a wait times out, the kernel records which
peer it waited for in ``status``; the host turns that into a ``PeerTimeoutError``:
- on the CPU (interpreter, synchronous) right after the launch;
- on GPUs without a host synchronisation: after each launch the status is copied to pinned
  memory asynchronously and the next call raises if that copy (finished by then) shows a
  timeout; ``check(blocking=True)`` waits and looks now.
After a timeout the epochs of the ranks disagree, so the state refuses further calls.
"""

from __future__ import annotations

import torch

from moe_ep import _platform
from moe_ep.transport.errors import PeerTimeoutError
from moe_ep.transport.primitives import COUNTER_WORDS, PHASE_NAMES, STATUS_TIMEOUT, STATUS_WORDS


class SyncState:
    """Epoch counters per op and the status words of one rank, on ``device``."""

    OPS = ("barrier", "dispatch_ll", "dispatch_ht", "dispatch_inter", "combine_ll", "combine_ht", "combine_inter",
           "peer_copy")

    def __init__(self, rank: int, device: torch.device, timeout_s: float):
        self.rank = rank
        self.device = device
        self.max_polls = _platform.max_polls(timeout_s)
        self.status = torch.zeros(STATUS_WORDS, dtype=torch.int32, device=device)
        # [op, COUNTER_WORDS] int32: epoch of the last finished call, programs finished in the
        # current call, then arrivals per peer (see transport.primitives)
        self._counters = torch.zeros(len(self.OPS), COUNTER_WORDS, dtype=torch.int32, device=device)
        self._synchronous = device.type == "cpu"
        if not self._synchronous:
            self._mirror = torch.zeros(STATUS_WORDS, dtype=torch.int32, pin_memory=True)
            self._mirror_ready = torch.cuda.Event()
            self._mirror_pending = False
        self.failed: PeerTimeoutError | None = None

    def counters(self, op: str) -> torch.Tensor:
        """``[COUNTER_WORDS]`` int32 view of ``op``'s counters (epoch first)."""
        return self._counters[self.OPS.index(op)]

    def before_launch(self) -> None:
        """Raise if an earlier call timed out (without waiting for the device)."""
        if self.failed is not None:
            raise self.failed
        if (not self._synchronous and self._mirror_pending and not torch.cuda.is_current_stream_capturing()
                and self._mirror_ready.query()):
            self._mirror_pending = False
            self._raise_from(self._mirror)

    def after_launch(self) -> None:
        """Look at the status of the launch just made (CPU) or start copying it back (GPU)."""
        if self._synchronous:
            self._raise_from(self.status)
        elif not torch.cuda.is_current_stream_capturing():
            self._mirror.copy_(self.status, non_blocking=True)
            self._mirror_ready.record()
            self._mirror_pending = True

    def check(self, blocking: bool = True) -> None:
        """Raise ``PeerTimeoutError`` if any call so far timed out; waits for the device."""
        if self.failed is not None:
            raise self.failed
        if blocking and not self._synchronous:
            torch.cuda.synchronize(self.device)
        self._raise_from(self.status)

    def _raise_from(self, status: torch.Tensor) -> None:
        code, peer, phase, epoch = (int(v) for v in status.tolist())
        if code == STATUS_TIMEOUT.value:
            self.failed = PeerTimeoutError(self.rank, peer, PHASE_NAMES.get(phase, f"phase {phase}"), epoch)
            raise self.failed
