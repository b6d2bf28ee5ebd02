"""Per-rank synchronisation state on the device: op epochs and the timeout status words.

Kernels advance each op's epoch themselves (see ``_finish_launch``), so consecutive calls and
CUDA-graph replays need no host-side reset. When a wait times out, the kernel records which
peer it waited for in ``status``; the host turns that into a ``PeerTimeoutError``:
- on the CPU (interpreter, synchronous) right after the launch;
- on GPUs without a host synchronisation: the next call raises if the words show a timeout. On
  NVIDIA a kernel that records anything also sets an alert word in pinned host memory
  (``_alert_host``): the host reads that word before each call (no copy, nothing launched) and
  only when it is set copies the status words (waiting for the device: an error path). On AMD
  each launch is followed by an asynchronous copy of the words to pinned memory (no event: an
  eager call's host time counts). Either way a write not yet landed is seen at a later call;
  ``check(blocking=True)`` waits and looks now.
After a timeout the epochs of the ranks disagree, so the state refuses further calls.
A bad call the kernels detect themselves (an expert id out of range, more (token, expert) pairs
than an expert-layout expert has slots) is recorded the same way and raised as ``BadCallError``
by ``check()`` or at the end of the next call (after its launch: every rank then made the same
launches, and the kernels ran the bad call in step too, ignoring what they refused), so the
state stays usable.
"""

from __future__ import annotations

import torch

from moe_ep import _platform
from moe_ep.transport.errors import BadCallError, PathMismatchError, PeerTimeoutError
from moe_ep.transport.primitives import (ALERT_ADDRESS, CALL_PATH_BITS, COUNTER_WORDS, INPUT_BAD_EXPERT_ID,
                                         INPUT_SLOTS_OVERFLOW, INPUT_STATUS, PATH_CODES, PHASE_NAMES,
                                         STATUS_PATH_MISMATCH, STATUS_TIMEOUT, STATUS_WORDS)


class SyncState:
    """Epoch counters per op and the status words of one rank, on ``device``."""

    OPS = ("barrier", "dispatch_ll", "dispatch_ht", "dispatch_inter", "combine_ll", "combine_ht", "combine_inter",
           "peer_copy", "dispatch_expert", "combine_expert")

    def __init__(self, rank: int, device: torch.device, timeout_s: float, num_experts: int = 0, slots: int = 0):
        self.rank = rank
        self.num_experts, self.slots = num_experts, slots  # to describe bad calls
        self.device = device
        self.max_polls = _platform.max_polls(timeout_s)
        self.status = torch.zeros(STATUS_WORDS, dtype=torch.int32, device=device)
        self._alerted = _platform.host_alert_word(device)
        if self._alerted:  # the kernels flag a change of their words here (see _alert_host)
            self._alert = torch.zeros(2, dtype=torch.int32, pin_memory=True)
            self._alert_words = self._alert.numpy()
            address = self._alert.data_ptr()
            low, high = address & 0xFFFFFFFF, address >> 32
            self.status[ALERT_ADDRESS.value:ALERT_ADDRESS.value + 2] = torch.tensor(
                [low - (1 << 32) if low >= 1 << 31 else low, high], dtype=torch.int32)
        # [op, COUNTER_WORDS] int32: epoch of the last finished call, programs finished in the
        # current call, then arrivals per peer (see transport.primitives)
        self._counters = torch.zeros(len(self.OPS), COUNTER_WORDS, dtype=torch.int32, device=device)
        self._synchronous = device.type == "cpu"
        self._by_op = {op: self._counters[i] for i, op in enumerate(self.OPS)}
        if not self._synchronous and not self._alerted:
            self._mirror = torch.zeros(STATUS_WORDS, dtype=torch.int32, pin_memory=True)
            self._mirror_words = self._mirror.numpy()  # the same pinned memory, read without torch
        self._raised_epoch = None  # the call of the last bad call raised (a late copy shows it again)
        self.failed: PeerTimeoutError | None = None
        self._bad: BadCallError | None = None  # a bad call recorded, not yet raised
        self.dispatch_calls = 0  # dispatch calls made (every rank makes the same ones: see call_word)

    def call_word(self, path: str) -> int:
        """The word the next dispatch call announces to the peers (``_announce_call``): its number
        (every rank counts its dispatch calls alike) and ``path``. A peer's wait that finds the same
        number with another path reports a PathMismatchError instead of timing out."""
        self.dispatch_calls += 1
        return ((self.dispatch_calls % (1 << 27)) << CALL_PATH_BITS.value) | PATH_CODES[path]

    def counters(self, op: str) -> torch.Tensor:
        """``[COUNTER_WORDS]`` int32 view of ``op``'s counters (epoch first)."""
        return self._by_op[op]

    def before_launch(self) -> None:
        """Raise if an earlier call timed out (without waiting for the device); note a bad call
        the device recorded meanwhile (raised after this call's launch, see ``after_launch``)."""
        if self.failed is not None:
            raise self.failed
        if self._synchronous:
            return
        if self._alerted:
            if self._alert_words[0] and not torch.cuda.is_current_stream_capturing():
                self._alert_words[0] = 0  # (cleared first: a later alert is seen at a later call)
                self._read(self.status)  # a copy that waits for the device: only when a kernel flagged
        elif self._mirror_words[0] or self._mirror_words[INPUT_STATUS.value]:  # the codes
            self._read(self._mirror)

    def after_launch(self) -> None:
        """Raise a bad call an earlier call made (this call has launched on every rank, so the
        ranks stay in step); then look at the status of this launch (CPU: a timeout raises now, a
        bad call at the next call's end or ``check``) or start copying it back (GPU)."""
        earlier, self._bad = self._bad, None
        if self._synchronous:
            self._read(self.status)
        elif not self._alerted and not torch.cuda.is_current_stream_capturing():
            self._mirror.copy_(self.status, non_blocking=True)
        if earlier is not None:
            raise earlier

    def check(self, blocking: bool = True) -> None:
        """Raise ``PeerTimeoutError`` if any call so far timed out, else ``BadCallError`` for a bad
        call not yet raised; waits for the device."""
        if self.failed is not None:
            raise self.failed
        if blocking and not self._synchronous:
            torch.cuda.synchronize(self.device)
        self._read(self.status)
        bad, self._bad = self._bad, None
        if bad is not None:
            raise bad

    def _read(self, status: torch.Tensor) -> None:
        """Raise a timeout recorded in ``status``; keep a bad call it records for later."""
        words = [int(v) for v in status[:ALERT_ADDRESS.value].tolist()]
        code, peer, phase, epoch = words[:4]
        if code == STATUS_TIMEOUT.value:
            self.failed = PeerTimeoutError(self.rank, peer, PHASE_NAMES.get(phase, f"phase {phase}"), epoch)
            raise self.failed
        if code == STATUS_PATH_MISMATCH.value:  # phase: (the peer's path << 8) | this rank's; epoch: the call
            names = {c: p for p, c in PATH_CODES.items()}
            self.failed = PathMismatchError(self.rank, peer, names.get(phase & 255, "?"), names.get(phase >> 8, "?"),
                                            epoch)
            raise self.failed
        bad, value, detail, bad_epoch = words[INPUT_STATUS.value:INPUT_STATUS.value + 4]
        if bad and (bad, value, detail, bad_epoch) == self._raised_epoch:  # raised already (a late copy)
            status[INPUT_STATUS.value:ALERT_ADDRESS.value].zero_()
        elif bad:
            self._raised_epoch = (bad, value, detail, bad_epoch)
            self.status[INPUT_STATUS.value:ALERT_ADDRESS.value].zero_()  # recorded once: the next call starts clean
            if status is not self.status:
                status[INPUT_STATUS.value:ALERT_ADDRESS.value].zero_()
            if bad == INPUT_BAD_EXPERT_ID.value:
                message = (f"topk_ids must lie in [-1, {self.num_experts}); got {value} (token {detail}), "
                           f"which routed nowhere (and any more like it)")
            elif bad == INPUT_SLOTS_OVERFLOW.value:
                message = (f"expert {value} got {detail} (token, expert) pairs, more than the "
                           f"{self.slots} slots per expert of the expert layout (EpConfig.expert_slots)")
            else:
                message = f"bad call (code {bad}, {value}, {detail})"
            if self._bad is None:
                self._bad = BadCallError(self.rank, message, bad_epoch)
