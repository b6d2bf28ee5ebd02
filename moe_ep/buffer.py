"""Buffer: the public dispatch and combine of one EP group.

``Buffer(group, cfg)`` allocates the symmetric heap collectively (every rank of ``group`` must
construct it) and owns the per-rank device state. ``dispatch`` sends each token to the ranks
that hold its experts; ``combine`` brings the expert outputs back and sums them. Shapes are
static (capacity = max_tokens_per_rank * world_size rows) and counts stay on the device, so
nothing on the path waits for the host. Shapes, dtypes and devices are validated before any
kernel is launched (``moe_ep.validation``); a bad call raises ``ValueError``/``TypeError`` and
leaves the Buffer usable. Expert-id values are checked by the kernels (``BadCallError`` at the
next check), or on the host too with ``check_inputs``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Union

import torch
import torch.distributed as dist

from moe_ep import _platform
from moe_ep.config import INTER_PATHS, EpConfig
from moe_ep.kernels.barrier import launch_barrier
from moe_ep.kernels.combine import launch_combine
from moe_ep.kernels.combine_expert import launch_combine_expert
from moe_ep.kernels.dispatch import HtStaging, launch_dispatch
from moe_ep.kernels.dispatch_expert import PHASE_ALL, PHASE_RECV, PHASE_SEND, launch_dispatch_expert
from moe_ep.kernels.dispatch_ht import launch_dispatch_ht
from moe_ep.kernels.internode import launch_combine_internode, launch_dispatch_internode
from moe_ep.kernels.release_check import check_release_ordering
from moe_ep.outputs import DispatchHandle, DispatchOutput, ExpertDispatchOutput, ExpertHandle, RecvHook, make_frozen
from moe_ep.regions import heap_bytes, heap_regions
from moe_ep.transport import BadCallError, PeerTimeoutError, SymmetricHeap, SyncState
from moe_ep.transport.primitives import MAX_RANKS
from moe_ep.tuning import Choice, TunedTable, TuneKey, token_bucket
from moe_ep.validation import check_dispatch, check_tensor

log = logging.getLogger("moe_ep")


XInput = Union[torch.Tensor, tuple]
EXPERT_PATH = "expert"  # the launch parameters' path name of the expert layout


class Buffer:
    """Dispatch and combine over ``group`` for ``cfg``: on the current GPU (a nccl or gloo group), or
    on CPU tensors when the kernels run in Triton's interpreter (a gloo group); ``device``
    overrides."""

    def __init__(self, group: dist.ProcessGroup, cfg: EpConfig, device: torch.device | None = None,
                 check_inputs: bool = False, tuned: str | None = None):
        """``check_inputs``: also check the expert-id values on the host before each dispatch (one
        device-to-host copy: a synchronisation; skipped while a CUDA graph is being captured). The
        kernels check them on the device in any case: an id outside [-1, num_experts) routes
        nowhere and raises ``BadCallError`` at the next check (the next call, or ``check()``).
        Shapes, dtypes and devices are always checked on the host.
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
        if "expert" in cfg.layouts and self.nodes > 1:
            raise ValueError("the expert layout works on one node (EpConfig.gpus_per_node must be None or the "
                             "world size)")
        if device is None:
            device = torch.device("cpu") if _platform.interpreting() or not _platform.gpu_available() else \
                torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        _platform.require_interpreted_kernels(self.device)  # before any allocation or launch
        self.capacity = cfg.capacity(self.world_size)
        self.check_inputs = check_inputs
        _check_ranks_agree(group, self.rank, self.world_size, cfg, self.device)  # before anything is allocated
        if self.device.type == "cuda":  # AMD: refuse a Triton whose releases do not wait for the stores
            check_release_ordering(self.device)
        self.heap = SymmetricHeap(group, heap_regions(cfg, self.world_size), self.device, cfg.backend)
        self.sync = SyncState(self.rank, self.device, cfg.timeout_s, cfg.num_experts,
                              cfg.slots(self.world_size) if cfg.expert_tokens else 0)
        self._on_gpu = self.device.type != "cpu"
        self._expert = _ExpertState(self) if cfg.expert_tokens else None
        self._ht_views = None  # the zero-copy HT outputs (views of the receive regions), made at first use
        self._output_layouts: dict = {}  # views -> the layout of a dispatch's output allocation
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
                 zero_copy: bool = False, layout: str = "flat", return_recv_hook: bool = False):
        """Send each token to the ranks that hold its experts.

        x             [num_tokens, hidden] bf16 (0 <= num_tokens <= max_tokens_per_rank; the expert
                      layout: <= cfg.expert_tokens), or, for
                      fp8 dispatch, a tuple ([num_tokens, hidden] fp8 of cfg.dispatch_dtype,
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
        layout        "flat" (a DispatchOutput) or "expert" (an ExpertDispatchOutput: one row per
                      (token, expert) pair in [experts_per_rank, slots, hidden], written in place by
                      the senders; views of the Buffer's memory, valid until this rank's dispatch
                      that reuses them, the call after next). Every rank passes the same layout.
        return_recv_hook  (expert layout) return ``(output, hook)`` once the sends are issued; the
                      output is valid after ``hook()`` (a ``RecvHook``), which must run before this
                      rank's dispatch after next. Other work may run in between.
        Returns a DispatchOutput; its rows [0, num_tokens) are valid.
        """
        if layout not in self.cfg.layouts:
            raise ValueError(f"layout {layout!r} is not among this Buffer's EpConfig.layouts {self.cfg.layouts}")
        if layout == "expert":
            if out is not None or zero_copy:
                raise ValueError("the expert layout's outputs are always views of the Buffer's receive regions: "
                                 "it takes no out and no zero_copy")
            x, x_scales = check_dispatch(self.cfg, self.device, x, topk_ids, topk_weights, self.check_inputs, layout)
            self._check_not_own_memory(x, x_scales, topk_ids, topk_weights)
            if num_tokens_hint is not None and num_tokens_hint < x.shape[0]:
                raise ValueError(f"num_tokens_hint ({num_tokens_hint}) is below this rank's {x.shape[0]} tokens")
            return self._expert.dispatch(x, x_scales, topk_ids, topk_weights, return_recv_hook)
        if return_recv_hook:
            raise ValueError("return_recv_hook needs layout='expert'")
        x, x_scales = check_dispatch(self.cfg, self.device, x, topk_ids, topk_weights, self.check_inputs)
        self._check_not_own_memory(x, x_scales, topk_ids, topk_weights)
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
        if out is None:
            out = self._new_dispatch_output(zero_copy, num_tokens, path)
        elif not isinstance(out, DispatchOutput) or out.handle.buffer_id != id(self):
            raise TypeError("out must be a DispatchOutput made by this Buffer")
        else:  # the tensors are rewritten: an earlier handle on them goes stale
            out.handle.stamp[0] += 1
            part_rows = out.handle.part_rows
            if part_rows is None and path == "ht":  # outputs of an LL call: HT's part_rows is in their allocation
                part_rows = self._part_rows(out.handle)
            out = dataclasses.replace(out, handle=dataclasses.replace(out.handle, num_tokens=num_tokens, path=path,
                                                                      generation=out.handle.stamp[0],
                                                                      part_rows=part_rows))
        params = self.launch_params(path, num_tokens, zero_copy).dispatch
        call_word = self.sync.call_word(path)  # (the inter-node kernels do not announce their calls)
        if path in INTER_PATHS:
            launch_dispatch_internode(self.heap, self.sync, self.cfg, params, x, x_scales, topk_ids, topk_weights, out,
                                      self._staging if path == "inter_ht" else None)
        elif path == "ht":
            launch_dispatch_ht(self.heap, self.sync, self.cfg, params, x, x_scales, topk_ids, topk_weights, out,
                               self._staging, call_word, zero_copy)
        else:
            launch_dispatch(self.heap, self.sync, self.cfg, params, x, x_scales, topk_ids, topk_weights, out,
                            call_word)
        return out

    def empty_dispatch_output(self) -> DispatchOutput:
        """Freshly allocated (uninitialised) dispatch outputs."""
        return self._new_dispatch_output(False, every_field=True)

    def _new_dispatch_output(self, views: bool, num_tokens: int = 0, path: str = "ll",
                             every_field: bool = False) -> DispatchOutput:
        """Dispatch outputs (of a call of ``num_tokens`` tokens over ``path``); with ``views`` x,
        x_scales, topk_ids and topk_weights are views of the HT receive regions, which hold the rows
        in the outputs' layout (``moe_ep.regions``). The other tensors share one allocation (one
        call into the caching allocator instead of one per tensor: the eager host path), of int32
        words, so only the other dtypes need a typed view of it. ``part_rows`` (HT's) is made only
        for an HT call or with ``every_field``; its bytes are in the allocation either way."""
        layout = self._output_layouts.get(views)
        if layout is None:
            layout = self._output_layouts[views] = self._output_layout(views)
        words, fields = layout
        block = torch.empty(words, dtype=torch.int32, device=self.device)
        typed = {torch.int32: block}
        out = {}
        skip = None if every_field or path == "ht" else "part_rows"
        for name, dtype, shape, strides, offset in fields:
            if name == skip:
                continue
            base = typed.get(dtype)
            if base is None:
                base = typed[dtype] = block.view(dtype)
            out[name] = base.as_strided(shape, strides, offset)
        if views:
            if self._ht_views is None:  # the same memory every call: made once
                self._ht_views = {name: self.heap.view("ht_dispatch_" + name, dtype, (self.capacity, width))
                                  for name, dtype, width in self._row_fields()}
            out.update(self._ht_views)
        get = out.get
        src, count = out["src"], out["num_recv_tokens"]
        handle = make_frozen(DispatchHandle, src=src, num_recv_tokens=count, send_mask=out["send_mask"],
                             num_tokens=num_tokens, path=path, buffer_id=id(self), forwarded_token=get("forwarded_token"),
                             forwarded_mask=get("forwarded_mask"), forwarded_count=get("forwarded_count"),
                             part_rows=get("part_rows"), generation=0, stamp=[0], block=block)
        return make_frozen(DispatchOutput, x=out["x"], x_scales=get("scales"), topk_ids=out["topk_ids"],
                           topk_weights=out["topk_weights"], src=src, num_tokens=count,
                           tokens_per_expert=out["tokens_per_expert"], handle=handle, layout="flat")

    def _part_rows(self, handle: DispatchHandle) -> torch.Tensor:
        """``part_rows`` of outputs made without it (an LL call's): the first field of their
        allocation, alike in either layout (``_output_layout``)."""
        name, _, shape, strides, offset = next(iter(self._output_layouts.values()))[1][0]
        assert name == "part_rows", name
        return handle.block.as_strided(shape, strides, offset)

    def _output_layout(self, views: bool) -> tuple:
        """(int32 words, fields) of the one allocation behind a dispatch's outputs: per field (name,
        dtype, shape, strides, offset in elements of dtype), each field starting on a 256-byte
        boundary; HT's part_rows first (``_part_rows``)."""
        cfg, cap = self.cfg, self.capacity
        fields = [("part_rows", torch.int32, (self.world_size, cfg.ht_parts + 1))] \
            if self.nodes == 1 and cfg.ht_tokens else []
        if not views:
            fields += [(name, dtype, (cap, width)) for name, dtype, width in self._row_fields()]
        fields += [("src", torch.int32, (cap, 2)), ("num_recv_tokens", torch.int32, (1,)),
                   ("send_mask", torch.int64, (cfg.max_tokens_per_rank,)),
                   ("tokens_per_expert", torch.int32, (self.experts_per_rank,))]
        if self.nodes > 1:
            fields += [("forwarded_token", torch.int32, (self.nodes, cfg.max_tokens_per_rank)),
                       ("forwarded_mask", torch.int64, (self.nodes, cfg.max_tokens_per_rank)),
                       ("forwarded_count", torch.int32, (self.nodes,))]
        placed, offset = [], 0
        for name, dtype, shape in fields:
            size = dtype.itemsize
            strides = tuple(int(torch.Size(shape[i + 1:]).numel()) for i in range(len(shape)))
            placed.append((name, dtype, shape, strides, offset // size))
            offset += -(-torch.Size(shape).numel() * size // 256) * 256
        return max(offset, 256) // 4, tuple(placed)

    def _row_fields(self) -> tuple:
        """(name, dtype, values per row) of the flat outputs' row tensors (scales for fp8 only)."""
        cfg = self.cfg
        fields = (("x", cfg.dispatch_dtype, cfg.hidden), ("topk_ids", torch.int32, cfg.topk),
                  ("topk_weights", torch.float32, cfg.topk))
        return fields + ((("scales", torch.float32, cfg.num_scales),) if cfg.fp8 else ())

    # -- combine --------------------------------------------------------------------------------

    def combine(self, y: torch.Tensor, handle, out: torch.Tensor | None = None, weighted: bool = False,
                return_recv_hook: bool = False):
        """Send expert outputs back to their tokens' ranks and sum them there.

        y       flat layout: [capacity, hidden] bf16, per valid row of the dispatch sum_k w_k *
                expert_k(row) over this rank's experts (rows past num_tokens are never read);
                expert layout: [experts_per_rank, slots, hidden] bf16, one row per pair (rows past
                each expert's tokens_per_expert are never read)
        handle  the ``handle`` of the dispatch output these rows came from
        out     optional [num_tokens, hidden] bf16 to write into
        weighted  (expert layout) multiply each pair's row by its weight before summing
        return_recv_hook  (expert layout) return ``(result, hook)`` once the sends are issued; the
                result is valid after ``hook()``, which must run before this rank's combine
                after next
        Returns [num_tokens, hidden] bf16, num_tokens being what this rank dispatched. Flat: each row
        is the float32 sum, in rank order, of the rows sent back; expert: the float32 sum over the
        token's k in order of (w_k *) its pairs' rows; zeros for a token with no expert.
        """
        if isinstance(handle, ExpertHandle) and handle.buffer_id == id(self):
            if out is not None:
                check_tensor("out", out, (torch.bfloat16,), (handle.num_tokens, self.cfg.hidden), self.device)
            return self._expert.combine(y, handle, out, weighted, return_recv_hook)
        if weighted or return_recv_hook:
            raise ValueError("weighted and return_recv_hook combine the expert layout's outputs (a handle of "
                             "dispatch(..., layout='expert'))")
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
        dispatch + combine per path (and layout) and token bucket up to the path's capacity, before
        the first timed or serving call."""
        cfg = self.cfg
        if self.nodes > 1:  # LL variant up to the LL capacity, the HT variant (mode "ht"/"auto") up to all
            paths = [("inter", cfg.ll_tokens), ("inter_ht", cfg.max_tokens_per_rank if cfg.mode != "ll" else 0)]
        elif "flat" in cfg.layouts:
            paths = [("ll", cfg.ll_tokens), ("ht", cfg.ht_tokens)]
        else:
            paths = []
        if cfg.expert_tokens:
            paths.append((EXPERT_PATH, cfg.expert_tokens))
        for path, capacity in paths:
            bucket = 1
            while capacity and bucket <= token_bucket(capacity):
                tokens = min(bucket, capacity)
                x = torch.zeros(tokens, cfg.hidden, dtype=torch.bfloat16, device=self.device)
                ids = torch.arange(tokens * cfg.topk, device=self.device).view(tokens, cfg.topk) % cfg.num_experts
                w = torch.ones(tokens, cfg.topk, device=self.device)
                if path == EXPERT_PATH:
                    for hook in (False, True):  # one launch, and the send launch + its hook
                        out = self.dispatch(x, ids, w, layout="expert", return_recv_hook=hook)
                        if hook:
                            out, receive = out
                            receive()
                        y = torch.zeros(out.x.shape, dtype=torch.bfloat16, device=self.device)
                        for weighted in (False, True):
                            z = self.combine(y, out.handle, weighted=weighted, return_recv_hook=hook)
                            if hook:
                                z[1]()
                else:
                    out = self._dispatch(path, x, None, ids, w, None)
                    self.combine(torch.zeros(self.capacity, cfg.hidden, dtype=torch.bfloat16, device=self.device),
                                 out.handle)
                    if path == "ht":  # the zero-copy dispatch: a kernel variant of its own
                        self._dispatch(path, x, None, ids, w, None, zero_copy=True)
                bucket *= 2
        self.check()

    # -- checks ---------------------------------------------------------------------------------

    def _check_not_own_memory(self, *tensors) -> None:
        """Refuse dispatch inputs that live in this Buffer's receive memory (zero-copy or expert-layout
        outputs): peers overwrite it while the call reads it. Copy them first."""
        start = self.heap.local.data_ptr()
        end = start + self.heap.nbytes
        for t in tensors:
            if t is not None and t.numel() and start <= t.data_ptr() < end:
                raise ValueError("a dispatch input is a view of this Buffer's receive memory (a zero_copy or expert-layout "
                                 "output), which the peers overwrite during the call: pass a copy (.clone())")

    def _check_combine(self, y, handle, out):
        if not isinstance(handle, DispatchHandle) or handle.buffer_id != id(self):
            raise TypeError("handle must be the handle of a DispatchOutput of this Buffer")
        if handle.generation != handle.stamp[0]:
            raise ValueError("stale handle: its DispatchOutput was passed as out= to a later dispatch, which overwrote "
                             "what this handle refers to (combine a dispatch before reusing its outputs)")
        check_tensor("y", y, (torch.bfloat16,), (self.capacity, self.cfg.hidden), self.device)
        if out is not None:
            check_tensor("out", out, (torch.bfloat16,), (handle.num_tokens, self.cfg.hidden), self.device)

    # -- life -----------------------------------------------------------------------------------

    def check(self) -> None:
        """Wait for the device and raise ``PeerTimeoutError`` if any call so far timed out."""
        self.sync.check(blocking=True)

    def close(self) -> None:
        """Free the symmetric heap. Collective: every rank closes its Buffer, and a device barrier
        first makes sure no peer still reads or writes this rank's heap. It never hangs on a peer
        that failed or died: the barrier gives up after ``cfg.timeout_s``, and a rank whose call
        timed out skips it (its peers may be gone); either way it then frees this rank's heap."""
        if self.heap is None:
            return
        try:
            try:
                self.sync.check(blocking=True)  # waits for the device; raises if a call timed out
            except BadCallError:
                pass  # an earlier call's refused input: nothing to do with the peers
            launch_barrier(self.heap, self.sync)
            self.sync.check(blocking=True)
        except PeerTimeoutError as err:
            log.warning("moe_ep: %s; freeing this rank's heap without its peers", err)
        finally:
            self.heap.close()
            self.heap = None


class _ExpertState:
    """The expert layout of a Buffer: its output views, the host's alternation of the halves of its
    double-buffered regions, and the hooks still to be called (see kernels/dispatch_expert.py)."""

    def __init__(self, buf: Buffer):
        self.buf = buf
        cfg, world, dev = buf.cfg, buf.world_size, buf.device
        experts, slots = buf.experts_per_rank, cfg.slots(world)
        heap = buf.heap
        self.tokens_per_expert = torch.zeros(2, experts, dtype=torch.int32, device=dev)
        self.pair_ids = torch.empty(2, cfg.expert_tokens, cfg.topk, dtype=torch.int32, device=dev)
        self.pair_weights = torch.empty(2, cfg.expert_tokens, cfg.topk, dtype=torch.float32, device=dev)
        self.views = []  # per half: (x, x_scales, topk_weights, src) of the receive regions
        for half in range(2):
            x = heap.view("ex_dispatch_x", cfg.dispatch_dtype, (2, experts, slots, cfg.hidden))[half]
            scales = heap.view("ex_dispatch_scales", torch.float32, (2, experts, slots, cfg.num_scales))[half] \
                if cfg.fp8 else None
            weights = heap.view("ex_dispatch_topk_weights", torch.float32, (2, experts, slots))[half]
            src = heap.view("ex_dispatch_src", torch.int32, (2, experts, slots, 2))[half]
            self.views.append((x, scales, weights, src))
        self._pair_views: dict = {}  # (half, tokens) -> views of tokens_per_expert, pair_ids, pair_weights
        self.dispatches = 0  # expert-layout dispatches issued (call c uses half c % 2)
        self.combines = 0
        self.pending = {"dispatch": set(), "combine": set()}  # calls whose hook is still to run

    def _issue(self, op: str) -> int:
        """The call number of a new ``op`` call; refuses it while the hook of the call before the
        last is still to run (its half would be reused under it)."""
        call = self.dispatches if op == "dispatch" else self.combines
        late = [c for c in self.pending[op] if c <= call - 2]
        if late:
            raise RuntimeError(f"the receive hook of expert-layout {op} call {min(late)} has not run: call it before "
                               f"issuing two more {op} calls (at most two may be in flight)")
        return call

    def _hook(self, op: str, call: int, launch) -> RecvHook:
        self.pending[op].add(call)

        def run():
            self.pending[op].discard(call)
            launch()
        return RecvHook(run, lambda: None)

    def dispatch(self, x, x_scales, topk_ids, topk_weights, hook: bool):
        buf, cfg = self.buf, self.buf.cfg
        call = self._issue("dispatch")
        half = call % 2
        num_tokens = x.shape[0]
        pair_views = self._pair_views.get((half, num_tokens))
        if pair_views is None:  # views of the persistent pair tensors, made once per (half, tokens)
            pair_views = self._pair_views[(half, num_tokens)] = (
                self.tokens_per_expert[half], self.pair_ids[half, :num_tokens], self.pair_weights[half, :num_tokens])
        counts, pair_ids, pair_weights = pair_views
        handle = make_frozen(ExpertHandle, half=half, call=call, num_tokens=num_tokens, tokens_per_expert=counts,
                             pair_ids=pair_ids, pair_weights=pair_weights, buffer_id=id(buf), path="expert")
        rows, scales, weights, src = self.views[half]
        out = make_frozen(ExpertDispatchOutput, x=rows, x_scales=scales, topk_weights=weights, src=src,
                          tokens_per_expert=counts, handle=handle, layout="expert")
        params = buf.launch_params(EXPERT_PATH, num_tokens).dispatch
        call_word = buf.sync.call_word(EXPERT_PATH)

        def launch(phase):
            launch_dispatch_expert(buf.heap, buf.sync, cfg, params, x, x_scales, topk_ids, topk_weights, out, half,
                                   phase.value, call_word)
        launch(PHASE_SEND if hook else PHASE_ALL)
        self.dispatches += 1
        return (out, self._hook("dispatch", call, lambda: launch(PHASE_RECV))) if hook else out

    def combine(self, y, handle: ExpertHandle, out, weighted: bool, hook: bool):
        buf, cfg = self.buf, self.buf.cfg
        if self.dispatches > handle.call + 2:
            raise ValueError(f"stale handle: expert-layout dispatch call {handle.call} was overwritten by call "
                             f"{handle.call + 2} (combine a dispatch before issuing two more)")
        if handle.call in self.pending["dispatch"]:
            raise RuntimeError("combine before the dispatch's receive hook ran: call the hook first")
        check_tensor("y", y, (torch.bfloat16,), (buf.experts_per_rank, cfg.slots(buf.world_size), cfg.hidden),
                     buf.device)
        call = self._issue("combine")
        half = call % 2
        if out is None:
            out = torch.empty(handle.num_tokens, cfg.hidden, dtype=torch.bfloat16, device=buf.device)
        params = buf.launch_params(EXPERT_PATH, handle.num_tokens).combine

        def launch(phase):
            launch_combine_expert(buf.heap, buf.sync, cfg, params, y, handle, out, half, weighted, phase.value)
        launch(PHASE_SEND if hook else PHASE_ALL)
        self.combines += 1
        return (out, self._hook("combine", call, lambda: launch(PHASE_RECV))) if hook else out


def _check_ranks_agree(group, rank: int, world_size: int, cfg: EpConfig, device: torch.device) -> None:
    """Every rank of ``group`` builds its Buffer with the same configuration and heap layout (one
    all-gather); otherwise every rank raises the same ValueError naming what differs, before any
    allocation (a rank with another hidden size would wait for the others in the first call)."""
    import moe_ep

    mine = {f"EpConfig.{f.name}": str(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    mine.update({"world size": str(world_size), "heap bytes": str(heap_bytes(cfg, world_size)),
                 "device type": device.type, "moe_ep version": getattr(moe_ep, "__version__", "")})
    every: list = [None] * world_size
    dist.all_gather_object(every, mine, group=group)
    differ = [name for name in mine if len({e[name] for e in every}) > 1]
    if differ:
        detail = "; ".join(f"{name}: " + ", ".join(f"rank {r} {e[name]}" for r, e in enumerate(every))
                           for name in differ)
        raise ValueError(f"rank {rank}: the ranks of this Buffer's group disagree on {', '.join(differ)} "
                         f"({detail}); every rank must build its Buffer alike")
