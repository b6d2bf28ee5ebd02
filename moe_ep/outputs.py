"""What dispatch returns and what combine needs: outputs, handles and receive hooks.

Two layouts (``Buffer.dispatch(..., layout=...)``):
- "flat" (``DispatchOutput``): ``[capacity, hidden]`` rows, one per (source rank, token), in
  source-rank then token order; each row carries the token's local expert ids and weights.
- "expert" (``ExpertDispatchOutput``): ``[experts_per_rank, slots, hidden]``, one row per
  (token, expert) pair, rows ``[0, tokens_per_expert[e])`` of expert e valid, in source-rank,
  token, k order: the activation format of grouped / masked expert GEMMs. Its tensors are views
  of the Buffer's receive regions (the senders wrote them in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs from a flat dispatch (keep it until that combine is done)."""

    src: torch.Tensor  # [capacity, 2] int32: (source rank, token index there) of each received row
    num_recv_tokens: torch.Tensor  # [1] int32 (device): received rows, [0, num_recv_tokens) valid
    send_mask: torch.Tensor  # [max_tokens_per_rank] int64: bit d set when this rank's token t went to rank d
    num_tokens: int  # tokens this rank dispatched: rows of combine's output
    path: str  # "ll", "ht", "inter" or "inter_ht": the path that dispatched
    buffer_id: int  # id() of the Buffer that dispatched
    # Inter-node path only (None otherwise): what this rank forwarded for each other node's rank
    # with its local index, as that rank's proxy.
    forwarded_token: Optional[torch.Tensor] = None  # [nodes, max_tokens_per_rank] int32: token index there
    forwarded_mask: Optional[torch.Tensor] = None  # [nodes, max_tokens_per_rank] int64: bit d = sent to rank d
    forwarded_count: Optional[torch.Tensor] = None  # [nodes] int32: rows forwarded from each node
    # HT path (one node): where each source's token ranges start among the received rows (the
    # HT combine sends them back range by range): [world_size, ht_parts + 1] int32.
    part_rows: Optional[torch.Tensor] = None
    # Staleness: ``stamp`` is shared by every handle over the same tensors (an output passed as
    # out= again); the handle is current while stamp[0] == generation.
    generation: int = 0
    stamp: list = field(default_factory=lambda: [0], compare=False)
    # The one allocation behind the outputs (flat dispatch; keeps it alive, holds part_rows' place).
    block: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DispatchOutput:
    """Received rows, laid out compactly in (source rank, token index) order."""

    x: torch.Tensor  # [capacity, hidden] bf16, or the fp8 dispatch dtype (float8_e4m3fn or float8_e4m3fnuz)
    x_scales: Optional[torch.Tensor]  # [capacity, hidden // 128] float32 (None for bf16)
    topk_ids: torch.Tensor  # [capacity, topk] int32: local expert index on this rank, -1 elsewhere
    topk_weights: torch.Tensor  # [capacity, topk] float32: 0 where topk_ids is -1
    src: torch.Tensor  # [capacity, 2] int32: (source rank, token index on that rank)
    num_tokens: torch.Tensor  # [1] int32 (device): rows [0, num_tokens) are valid
    tokens_per_expert: torch.Tensor  # [experts_per_rank] int32 (device)
    handle: DispatchHandle  # what combine needs
    layout: str = "flat"


@dataclass(frozen=True)
class ExpertHandle:
    """What combine needs from an expert-layout dispatch (keep it until that combine is done)."""

    half: int  # which half of the Buffer's double-buffered expert regions the call used
    call: int  # the Buffer's count of expert-layout dispatches when this one was made (staleness)
    num_tokens: int  # tokens this rank dispatched: rows of combine's output
    tokens_per_expert: torch.Tensor  # [experts_per_rank] int32 (device): valid rows of each expert of y
    pair_ids: torch.Tensor  # [num_tokens, topk] int32 (device): this rank's pairs' expert ids, -1: none
    pair_weights: torch.Tensor  # [num_tokens, topk] float32 (device): their weights
    buffer_id: int  # id() of the Buffer that dispatched
    path: str = "expert"


@dataclass(frozen=True)
class ExpertDispatchOutput:
    """Received (token, expert) pairs grouped by local expert; views of the Buffer's receive
    regions, valid until this rank's dispatch that reuses their half (the call after next:
    two dispatches may be in flight)."""

    x: torch.Tensor  # [experts_per_rank, slots, hidden] bf16, or the fp8 dispatch dtype
    x_scales: Optional[torch.Tensor]  # [experts_per_rank, slots, hidden // 128] float32 (None for bf16)
    topk_weights: torch.Tensor  # [experts_per_rank, slots] float32: the weight of each row's pair
    src: torch.Tensor  # [experts_per_rank, slots, 2] int32: (source rank, token index on that rank)
    tokens_per_expert: torch.Tensor  # [experts_per_rank] int32 (device): rows [0, count) of each expert valid
    handle: ExpertHandle  # what combine needs
    layout: str = "expert"


def make_frozen(cls, **values):
    """An instance of the frozen dataclass ``cls`` from the value of every one of its fields,
    without its generated ``__init__``: one dict update instead of an ``object.__setattr__`` per
    field (a flat dispatch makes two such objects of 9 and 13 fields on every call's host path;
    ``test_stale_handles_and_own_memory_are_refused`` checks every field is set)."""
    obj = object.__new__(cls)
    obj.__dict__.update(values)
    return obj


class RecvHook:
    """Returned with ``return_recv_hook=True``: the sends have been issued; calling the hook (once)
    enqueues the wait for what the peers sent on the current stream, after which the result is
    valid. Other work may run between the call and the hook (e.g. a second micro-batch)."""

    def __init__(self, launch: Callable[[], None], check: Callable[[], None]):
        self._launch, self._check = launch, check
        self.done = False

    def __call__(self) -> None:
        if self.done:
            raise RuntimeError("this receive hook was already called")
        self._check()
        self._launch()
        self.done = True
