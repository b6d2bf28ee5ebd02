"""Buffer: the public dispatch and combine of one EP group.

``Buffer(group, cfg)`` allocates the symmetric heap collectively (every rank of ``group`` must
construct it) and owns the per-rank device state. ``dispatch`` sends each token to the ranks
that hold its experts; ``combine`` brings the expert outputs back and sums them. Shapes are
static (capacity = max_tokens_per_rank * world_size rows) and counts stay on the device, so
nothing on the path waits for the host except the optional expert-id range check
(``check_inputs``). Every input is validated before any kernel is launched; a bad call raises
``ValueError``/``TypeError`` and leaves the Buffer usable.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from moe_ep import _platform
from moe_ep.config import INTER_PATHS, EpConfig
from moe_ep.kernels.combine import launch_combine
from moe_ep.kernels.dispatch import HtStaging, launch_dispatch
from moe_ep.kernels.dispatch_ht import launch_dispatch_ht
from moe_ep.kernels.internode import launch_combine_internode, launch_dispatch_internode
from moe_ep.regions import heap_regions
from moe_ep.transport import SymmetricHeap, SyncState
from moe_ep.transport.primitives import MAX_RANKS
from moe_ep.tuning import Choice, TunedTable, TuneKey, token_bucket

log = logging.getLogger("moe_ep")


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs from a dispatch (keep it until that combine is done)."""

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


@dataclass(frozen=True)
class DispatchOutput:
    """Received rows, laid out compactly in (source rank, token index) order."""

    x: torch.Tensor  # [capacity, hidden] bf16, or float8_e4m3fn for fp8 dispatch
    x_scales: Optional[torch.Tensor]  # [capacity, hidden // 128] float32 (None for bf16)
    topk_ids: torch.Tensor  # [capacity, topk] int32: local expert index on this rank, -1 elsewhere
    topk_weights: torch.Tensor  # [capacity, topk] float32: 0 where topk_ids is -1
    src: torch.Tensor  # [capacity, 2] int32: (source rank, token index on that rank)
    num_tokens: torch.Tensor  # [1] int32 (device): rows [0, num_tokens) are valid
    tokens_per_expert: torch.Tensor  # [experts_per_rank] int32 (device)
    handle: DispatchHandle  # what combine needs


XInput = Union[torch.Tensor, tuple]


class Buffer:
    """Dispatch and combine over ``group`` (gloo + CPU tensors, or nccl + GPUs) for ``cfg``."""

    def __init__(self, group: dist.ProcessGroup, cfg: EpConfig, device: torch.device | None = None,
                 check_inputs: bool = True, tuned: str | None = None):
        """``check_inputs``: also check expert-id values (one device-to-host copy per dispatch;
        skipped while a CUDA graph is being captured). Shapes, dtypes and devices are always checked.
        ``tuned``: a tuned-parameters JSON file to use besides the shipped ones, the user's and
        $MOE_EP_TUNED, or "off" for the defaults only (see ``moe_ep.tuning``)."""
        self.group = group
        self.cfg = cfg
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.experts_per_rank = cfg.experts_per_rank(self.world_size)
        self.nodes = cfg.nodes(self.world_size)
        # Per-token destination masks are int64 bit sets, and each op's arrival counters hold
        # MAX_RANKS slots (the inter-node send counts one per rank and one per node).
        slots = self.world_size + (self.nodes if self.nodes > 1 else 0)
        if self.world_size > 63 or slots > MAX_RANKS.value:
            raise ValueError(f"{self.world_size} ranks in {self.nodes} nodes exceed what one Buffer addresses "
                             f"(at most 63 ranks, and ranks + nodes <= {MAX_RANKS.value} across nodes)")
        if device is None:
            device = torch.device("cpu") if dist.get_backend(group) == "gloo" else \
                torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        _platform.require_interpreted_kernels(self.device)  # before any allocation or launch
        self.capacity = cfg.capacity(self.world_size)
        self.check_inputs = check_inputs
        self.heap = SymmetricHeap(group, heap_regions(cfg, self.world_size), self.device, cfg.backend)
        self.sync = SyncState(self.rank, self.device, cfg.timeout_s)
        self._on_gpu = self.device.type != "cpu"
        if self.nodes > 1:  # the inter-node path's HT variant stages every token, with node slots
            self._staging = HtStaging.allocate(cfg, self.world_size, self.device, cfg.max_tokens_per_rank,
                                               self.nodes) if cfg.mode != "ll" else None
        else:
            self._staging = HtStaging.allocate(cfg, self.world_size, self.device, cfg.ht_tokens) \
                if cfg.ht_tokens else None
        self._tuned = TunedTable.load(tuned)
        self._choices: dict[tuple[str, int, bool], Choice] = {}  # (path, bucket, zero_copy)

    @property
    def heap_bytes(self) -> int:
        """Symmetric-heap bytes this rank allocated (see ``moe_ep.regions``)."""
        return self.heap.nbytes

    def path(self, num_tokens_hint: int | None = None) -> str:
        """The path ("ll" or "ht") of a dispatch. Every rank must take the same one, so "auto"
        decides from a count all ranks share: ``num_tokens_hint`` (e.g. the step's largest
        per-rank batch, which serving stacks know) or else ``cfg.max_tokens_per_rank``.
        LL up to ``cfg.crossover_tokens`` (and the LL capacity), HT above."""
        cfg = self.cfg
        if cfg.mode != "auto":
            path = cfg.mode
        else:
            shared = cfg.max_tokens_per_rank if num_tokens_hint is None else \
                min(num_tokens_hint, cfg.max_tokens_per_rank)
            path = "ll" if shared <= cfg.ll_tokens else "ht"
        if self.nodes > 1:  # across nodes: the inter-node path's LL or HT variant
            return "inter" if path == "ll" else "inter_ht"
        return path

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(self, x: XInput, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 out: DispatchOutput | None = None, num_tokens_hint: int | None = None,
                 zero_copy: bool = False) -> DispatchOutput:
        """Send each token to the ranks that hold its experts.

        x             [num_tokens, hidden] bf16 (0 <= num_tokens <= max_tokens_per_rank), or, for
                      fp8 dispatch, a tuple ([num_tokens, hidden] float8_e4m3fn,
                      [num_tokens, hidden // 128] float32 scales) already quantised
        topk_ids      [num_tokens, topk] int32/int64 global expert ids; -1 means no expert
        topk_weights  [num_tokens, topk] float32
        out           optional outputs of an earlier dispatch to overwrite (no allocation)
        num_tokens_hint  for mode "auto": a token count every rank passes alike (>= num_tokens),
                      from which all ranks pick the same path (see ``path``)
        zero_copy     let x, x_scales, topk_ids and topk_weights be views of this Buffer's receive
                      memory, valid until this rank's next dispatch (any path) or close(); the HT
                      path then copies no row out of it (mori's outputs; faster at prefill
                      sizes). src, num_tokens, tokens_per_expert and the handle stay this call's
                      own. Other paths return ordinary outputs. Not with ``out``. Each rank
                      chooses for itself (its peers may pass another value).
        Returns a DispatchOutput; its rows [0, num_tokens) are valid.
        """
        x, x_scales = self._check_dispatch(x, topk_ids, topk_weights)
        num_tokens = x.shape[0]
        if num_tokens_hint is not None and num_tokens_hint < num_tokens:
            raise ValueError(f"num_tokens_hint ({num_tokens_hint}) is below this rank's {num_tokens} tokens")
        if zero_copy and out is not None:
            raise ValueError("zero_copy returns views of the Buffer's memory: it takes no out")
        return self._dispatch(self.path(num_tokens_hint), x, x_scales, topk_ids, topk_weights, out, zero_copy)

    def _dispatch(self, path, x, x_scales, topk_ids, topk_weights, out, zero_copy=False):
        """Dispatch checked inputs over ``path``, whose capacity holds them (see ``path``)."""
        num_tokens = x.shape[0]
        zero_copy = zero_copy and path == "ht"
        if zero_copy:
            out = self._new_dispatch_output(views=True)
        elif out is None:
            out = self.empty_dispatch_output()
        elif not isinstance(out, DispatchOutput) or out.handle.buffer_id != id(self):
            raise TypeError("out must be a DispatchOutput made by this Buffer")
        out = dataclasses.replace(out, handle=dataclasses.replace(out.handle, num_tokens=num_tokens, path=path))
        params = self.launch_params(path, num_tokens, zero_copy).dispatch
        if path in INTER_PATHS:
            launch_dispatch_internode(self.heap, self.sync, self.cfg, params, x, x_scales, topk_ids, topk_weights, out,
                                      self._staging if path == "inter_ht" else None)
        elif path == "ht":
            launch_dispatch_ht(self.heap, self.sync, self.cfg, params, x, x_scales, topk_ids, topk_weights, out,
                               self._staging, zero_copy)
        else:
            launch_dispatch(self.heap, self.sync, self.cfg, params, x, x_scales, topk_ids, topk_weights, out)
        return out

    def empty_dispatch_output(self) -> DispatchOutput:
        """Freshly allocated (uninitialised) dispatch outputs."""
        return self._new_dispatch_output(views=False)

    def _new_dispatch_output(self, views: bool) -> DispatchOutput:
        """Dispatch outputs; with ``views`` x, x_scales, topk_ids and topk_weights are views of the
        HT receive regions, which hold the rows in the outputs' layout (``moe_ep.regions``)."""
        cfg, cap, dev = self.cfg, self.capacity, self.device
        src = torch.empty(cap, 2, dtype=torch.int32, device=dev)
        num_tokens = torch.empty(1, dtype=torch.int32, device=dev)
        forwarded = {}
        if self.nodes > 1:
            forwarded = dict(
                forwarded_token=torch.empty(self.nodes, cfg.max_tokens_per_rank, dtype=torch.int32, device=dev),
                forwarded_mask=torch.empty(self.nodes, cfg.max_tokens_per_rank, dtype=torch.int64, device=dev),
                forwarded_count=torch.empty(self.nodes, dtype=torch.int32, device=dev))
        part_rows = torch.empty(self.world_size, cfg.ht_parts + 1, dtype=torch.int32, device=dev) \
            if self.nodes == 1 and cfg.ht_tokens else None
        handle = DispatchHandle(src=src, num_recv_tokens=num_tokens,
                                send_mask=torch.empty(cfg.max_tokens_per_rank, dtype=torch.int64, device=dev),
                                num_tokens=0, path="ll", buffer_id=id(self), part_rows=part_rows, **forwarded)
        fields = (("x", cfg.dispatch_dtype, cfg.hidden), ("scales", torch.float32, cfg.num_scales),
                  ("topk_ids", torch.int32, cfg.topk), ("topk_weights", torch.float32, cfg.topk))
        rows = {name: self.heap.view("ht_dispatch_" + name, dtype, (cap, width)) if views else
                torch.empty(cap, width, dtype=dtype, device=dev) for name, dtype, width in fields}
        return DispatchOutput(
            x=rows["x"], x_scales=rows["scales"] if cfg.fp8 else None, topk_ids=rows["topk_ids"],
            topk_weights=rows["topk_weights"], src=src, num_tokens=num_tokens,
            tokens_per_expert=torch.empty(self.experts_per_rank, dtype=torch.int32, device=dev),
            handle=handle)

    # -- combine --------------------------------------------------------------------------------

    def combine(self, y: torch.Tensor, handle: DispatchHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        """Send expert outputs back to their tokens' ranks and sum them there.

        y       [capacity, hidden] bf16: per valid row of the dispatch, sum_k w_k * expert_k(row)
                over this rank's experts (rows past num_tokens are never read)
        handle  the ``handle`` of the DispatchOutput these rows came from
        out     optional [num_tokens, hidden] bf16 to write into
        Returns [num_tokens, hidden] bf16, num_tokens being what this rank dispatched; each row is
        the float32 sum, in rank order, of the rows sent back (zeros for a token with no expert).
        """
        self._check_combine(y, handle, out)
        if out is None:
            out = torch.empty(handle.num_tokens, self.cfg.hidden, dtype=torch.bfloat16, device=self.device)
        params = self.launch_params(handle.path, handle.num_tokens).combine
        if handle.path in INTER_PATHS:
            launch_combine_internode(self.heap, self.sync, self.cfg, params, y, handle, out)
        else:
            launch_combine(self.heap, self.sync, self.cfg, params, handle.path, y, handle, out)
        return out

    # -- launch parameters ------------------------------------------------------------------------

    def launch_params(self, path: str, num_tokens: int, zero_copy: bool = False) -> Choice:
        """The launch parameters a ``path`` call with ``num_tokens`` tokens uses (``zero_copy``: an
        HT dispatch that returns its receive regions, whose best parameters differ: run 14), and
        their source ("default" or the tuned file): chosen once per (path, token bucket, zero_copy)."""
        slot = (path, token_bucket(num_tokens), zero_copy)
        choice = self._choices.get(slot)
        if choice is None:
            key = self.tune_key(path, num_tokens, zero_copy)
            choice = self._choices[slot] = self._tuned.choose(key, self._on_gpu)
            log.info("moe_ep: %s launch parameters for %s", choice.source, key)
        return choice

    def tune_key(self, path: str, num_tokens: int, zero_copy: bool = False) -> TuneKey:
        """The key of tuned tables for a ``path`` call of ``num_tokens`` tokens on this Buffer."""
        return TuneKey(gpu=_platform.device_name(self.device), world_size=self.world_size, hidden=self.cfg.hidden,
                       num_experts=self.cfg.num_experts, topk=self.cfg.topk,
                       dispatch_dtype="fp8" if self.cfg.fp8 else "bf16", path=path, bucket=token_bucket(num_tokens),
                       gpus_per_node=self.cfg.gpus_per_node if path in INTER_PATHS else 0, zero_copy=zero_copy)

    def set_launch_params(self, path: str, num_tokens: int, choice: Choice, zero_copy: bool = False) -> None:
        """Use ``choice`` for ``path`` calls in ``num_tokens``'s bucket (as ``moe_ep.tune`` does)."""
        self._choices[(path, token_bucket(num_tokens), zero_copy)] = choice

    def warmup(self) -> None:
        """Compile every kernel this Buffer can launch (collective: all ranks call it): one
        dispatch + combine per path and token bucket up to the path's capacity, before the first
        timed or serving call."""
        cfg = self.cfg
        if self.nodes > 1:  # LL variant up to the LL capacity, the HT variant (mode "ht"/"auto") up to all
            paths = [("inter", cfg.ll_tokens), ("inter_ht", cfg.max_tokens_per_rank if cfg.mode != "ll" else 0)]
        else:
            paths = [("ll", cfg.ll_tokens), ("ht", cfg.ht_tokens)]
        for path, capacity in paths:
            bucket = 1
            while capacity and bucket <= token_bucket(capacity):
                tokens = min(bucket, capacity)
                x = torch.zeros(tokens, cfg.hidden, dtype=torch.bfloat16, device=self.device)
                ids = torch.arange(tokens * cfg.topk, device=self.device).view(tokens, cfg.topk) % cfg.num_experts
                w = torch.ones(tokens, cfg.topk, device=self.device)
                out = self._dispatch(path, x, None, ids, w, None)
                self.combine(torch.zeros(self.capacity, cfg.hidden, dtype=torch.bfloat16, device=self.device),
                             out.handle)
                if path == "ht":  # the zero-copy dispatch: a kernel variant of its own
                    self._dispatch(path, x, None, ids, w, None, zero_copy=True)
                bucket *= 2
        self.check()

    # -- checks ---------------------------------------------------------------------------------

    def _check_tensor(self, name, t, dtypes, shape):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, this Buffer works on {self.device}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    def _check_dispatch(self, x, topk_ids, topk_weights):
        cfg = self.cfg
        x_scales = None
        if isinstance(x, tuple):
            if not cfg.fp8 or len(x) != 2:
                raise TypeError("x may be a (float8_e4m3fn values, float32 scales) tuple only for fp8 dispatch")
            x, x_scales = x
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a [num_tokens, {cfg.hidden}] tensor")
        num_tokens = x.shape[0]
        if num_tokens > cfg.max_tokens_per_rank:
            raise ValueError(f"x has {num_tokens} tokens, more than max_tokens_per_rank={cfg.max_tokens_per_rank}")
        x_dtypes = (torch.float8_e4m3fn,) if x_scales is not None else (torch.bfloat16,)
        self._check_tensor("x", x, x_dtypes, (num_tokens, cfg.hidden))
        if x_scales is not None:
            self._check_tensor("x_scales", x_scales, (torch.float32,), (num_tokens, cfg.num_scales))
        self._check_tensor("topk_ids", topk_ids, (torch.int32, torch.int64), (num_tokens, cfg.topk))
        self._check_tensor("topk_weights", topk_weights, (torch.float32,), (num_tokens, cfg.topk))
        capturing = self._on_gpu and torch.cuda.is_current_stream_capturing()
        if self.check_inputs and num_tokens and not capturing:
            low, high = int(topk_ids.min()), int(topk_ids.max())
            if low < -1 or high >= cfg.num_experts:
                raise ValueError(f"topk_ids must lie in [-1, {cfg.num_experts}); got values in [{low}, {high}]")
        return x, x_scales

    def _check_combine(self, y, handle, out):
        if not isinstance(handle, DispatchHandle) or handle.buffer_id != id(self):
            raise TypeError("handle must be the handle of a DispatchOutput of this Buffer")
        self._check_tensor("y", y, (torch.bfloat16,), (self.capacity, self.cfg.hidden))
        if out is not None:
            self._check_tensor("out", out, (torch.bfloat16,), (handle.num_tokens, self.cfg.hidden))

    # -- life -----------------------------------------------------------------------------------

    def check(self) -> None:
        """Wait for the device and raise ``PeerTimeoutError`` if any call so far timed out."""
        self.sync.check(blocking=True)

    def close(self) -> None:
        """Free the symmetric heap (collective: every rank closes its Buffer)."""
        if self.heap is not None:
            if self._on_gpu:
                torch.cuda.synchronize(self.device)
            self.heap.barrier()
            self.heap.close()
            self.heap = None
