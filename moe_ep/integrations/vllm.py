"""moe_ep in vLLM 0.33: prepare/finalize for its modular MoE kernel, an all2all manager, registration.

vLLM runs an MoE layer as ``FusedMoEKernel(prepare_finalize, experts)``: ``prepare`` quantises and
dispatches, the experts compute, ``finalize`` combines. Two prepare/finalize classes here, one per
activation format, shaped like vLLM's DeepEP adapters so that every experts class that works
with DeepEP works with them:

- ``MoeEpPrepareAndFinalize`` (format Standard, like DeepEP high-throughput; the prefill side):
  the flat layout. ``prepare`` returns the received rows ``[n, hidden]`` (fp8 with
  ``[n, hidden // 128]`` float32 scales for block-fp8 models), ``topk_ids`` in the global expert
  space (local id + this rank's first expert; a slot of another rank's expert, -1 in moe_ep, is
  set to ``num_experts - 1`` on rank 0 and to 0 elsewhere, experts that ``expert_map`` sends to -1,
  as vLLM's DeepEP-HT adapter does), the weights (0 for those slots) and the rows per local
  expert (on the device and the host, as DeepEP HT's ``ExpertTokensMetadata``). The
  dispatch picks moe_ep's LL or HT path from a token count every rank shares (the largest batch
  over the DP ranks, ``dp_metadata.num_tokens_across_dp_cpu``: a host tensor, no sync) and
  returns HT rows zero-copy (views of the receive memory, read before this rank's next dispatch)
  unless dual-batch overlap (DBO) runs, when two dispatches are in flight. Reading ``n`` is one
  host synchronisation, as DeepEP HT makes; ``padded=True`` skips it: all ``capacity`` rows,
  rows past ``n`` routed to no local expert (``expert_map`` sends them to -1), counts on the
  device only (CUDA-graph safe, mori's convention). ``finalize`` weights and sums each row over
  the token's local experts (the experts' own reduction, or, for experts that delegate it, a
  float32 sum here) and combines.
- ``MoeEpBatchedPrepareAndFinalize`` (format BatchedExperts, like DeepEP low-latency; the decode
  side): the expert layout. ``prepare`` returns ``[local experts, max_tokens * ranks, hidden]``
  rows, valid up to ``expert_num_tokens`` (a device tensor), fp8 scales
  ``[local experts, rows, hidden // 128]`` column-major per expert as DeepEP's
  ``low_latency_dispatch`` gives them, and no topk ids or weights (the kernel keeps the
  originals). ``finalize`` takes the experts' unweighted outputs (their
  ``TopKWeightAndReduceDelegate``), weights each (token, expert) pair and sums in the combine.
  Nothing on this path waits for the host.
Both implement ``prepare_async`` / ``finalize_async``: the batched class returns
``(hook, receiver)`` (the sends are issued, ``hook()`` waits for the peers), the standard class
a receiver (its flat dispatch and combine complete in the call). Under DBO each micro-batch keeps
its own handle (``dbo_current_ubatch_id()``), and the expert layout holds two calls in flight.

Buffers: ``MoeEpAll2AllManager`` (an ``All2AllManagerBase``) owns one ``moe_ep.Buffer`` per
configuration, made by ``get_handle(kwargs)`` as vLLM's managers make theirs.

Registration (vLLM's backend list is closed): moe_ep's ``vllm.general_plugins`` entry point
(``plugins.vllm_plugin``), which vLLM runs in every process, calls ``install()`` when
``MOE_EP_VLLM=1``. It replaces the all2all managers vLLM builds for ``--all2all-backend
deepep_high_throughput`` / ``deepep_low_latency`` with ``MoeEpAll2AllManager``, and the factory
``maybe_make_prepare_finalize`` with one that returns the classes above for such a manager
(Standard for high throughput, BatchedExperts for low latency; every other backend goes to
vLLM's factory). vLLM's own choices keyed on those
backend names (the activation format its experts oracle picks, CUDA graphs off for high
throughput) then fit moe_ep as they fit DeepEP. Without ``MOE_EP_VLLM=1`` nothing changes.

Supported: bf16 activations, dispatched as bf16 (unquantized models) or as fp8 with 1x128 block
scales (block-fp8 models: ``quant_dtype`` fp8 with ``block_shape[1] == 128``; moe_ep quantises
in its dispatch with scale ``max(amax, 1e-4) / fp8_max``); linear expert placement, or
round-robin through vLLM's routing tables (BatchedExperts, as DeepEP low-latency). Other
quantisation schemes raise ``NotImplementedError`` when the layer is built.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from moe_ep.integrations import require
from moe_ep.integrations._common import (BufferCache, column_major_scales, config_overrides, make_config,
                                         padded_rows, read_counts)

_INSTALL = "vllm==0.33.0"
mk = require("vllm.model_executor.layers.fused_moe.modular_kernel", _INSTALL, "vllm")
_base_comm = require("vllm.distributed.device_communicators.base_device_communicator", _INSTALL, "vllm")
_reduce = require("vllm.model_executor.layers.fused_moe.topk_weight_and_reduce", _INSTALL, "vllm")
_ubatching = require("vllm.v1.worker.ubatching", _INSTALL, "vllm")
_forward_context = require("vllm.forward_context", _INSTALL, "vllm")

BACKENDS = ("deepep_high_throughput", "deepep_low_latency")  # the --all2all-backend values moe_ep takes over
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def shared_token_count() -> int | None:
    """The largest batch over the DP ranks of this forward pass (the same on every rank), or None
    outside a forward context (every rank then falls back to the Buffer's capacity alike)."""
    if not _forward_context.is_forward_context_available():
        return None
    dp_metadata = _forward_context.get_forward_context().dp_metadata
    if dp_metadata is None:
        return None
    return int(dp_metadata.num_tokens_across_dp_cpu.max())


class _PrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """What both formats share: the Buffer, the handles per micro-batch, input checks."""

    def __init__(self, buffer, rank_expert_offset: int, async_hooks: bool = True):
        super().__init__()
        self.buffer = buffer
        self.rank_expert_offset = rank_expert_offset
        self.async_hooks = async_hooks
        self.handles: list = [None, None]  # per DBO micro-batch: the handle combine needs
        self.last_path: str | None = None  # path of the last dispatch ("ll", "ht", "expert"): for logs and tests

    def num_dispatchers(self) -> int:
        return self.buffer.world_size

    def output_is_reduced(self) -> bool:
        return True

    def topk_indices_dtype(self) -> torch.dtype | None:
        return None  # int32 and int64 ids both dispatch

    def supports_async(self) -> bool:
        return self.async_hooks

    def _inputs(self, a1, topk_weights, topk_ids, apply_router_weight_on_input, defer_input_quant):
        """(x, topk_ids, topk_weights) as moe_ep.dispatch takes them."""
        if defer_input_quant and self.buffer.cfg.fp8:
            raise NotImplementedError(
                f"{type(self).__name__} dispatches fp8 for this layer: it cannot defer the input quantisation to "
                f"experts that expect unquantized inputs (defer_input_quant=True)")
        if apply_router_weight_on_input:
            if topk_ids.shape[1] != 1:
                raise ValueError("apply_router_weight_on_input needs topk == 1")
            a1 = a1 * topk_weights.to(a1.dtype)
        return a1.contiguous(), topk_ids.contiguous(), topk_weights.float().contiguous()

    def _store_handle(self, handle) -> None:
        self.handles[_ubatching.dbo_current_ubatch_id()] = handle

    def _handle(self):
        handle = self.handles[_ubatching.dbo_current_ubatch_id()]
        if handle is None:
            raise RuntimeError(f"{type(self).__name__}.finalize called before prepare")
        return handle


class MoeEpPrepareAndFinalize(_PrepareAndFinalize):
    """Activation format Standard: moe_ep's flat layout (see the module docstring)."""

    def __init__(self, buffer, rank_expert_offset: int, async_hooks: bool = True, padded: bool = False):
        super().__init__(buffer, rank_expert_offset, async_hooks)
        if "flat" not in buffer.cfg.layouts:
            raise ValueError("MoeEpPrepareAndFinalize needs a Buffer with the flat layout")
        self.padded = padded

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def max_num_tokens_per_rank(self) -> int | None:
        return self.buffer.cfg.max_tokens_per_rank

    def prepare_async(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                      quant_config, defer_input_quant=False) -> mk.ReceiverType:
        x, ids, weights = self._inputs(a1, topk_weights, topk_ids, apply_router_weight_on_input, defer_input_quant)
        out = self.buffer.dispatch(x, ids, weights, num_tokens_hint=shared_token_count(),
                                   zero_copy=not _ubatching.dbo_enabled())
        self._store_handle(out.handle)
        self.last_path = out.handle.path
        return lambda: self._receive(out, num_experts, topk_ids.dtype)

    def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                quant_config, defer_input_quant=False) -> mk.PrepareResultType:
        return self.prepare_async(a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                                  quant_config, defer_input_quant)()

    def _receive(self, out, num_experts: int, ids_dtype: torch.dtype) -> mk.PrepareResultType:
        # A slot of another rank's expert gets an expert that is not this rank's, which expert_map
        # maps to -1 (vLLM's DeepEP-HT convention).
        elsewhere = num_experts - 1 if self.rank_expert_offset == 0 else 0
        if self.padded:
            x, scales, local, weights = out.x, out.x_scales, out.topk_ids, out.topk_weights
            rows = torch.arange(x.shape[0], device=x.device)
            valid = (rows < out.num_tokens)[:, None] & (local >= 0)  # [capacity, topk]
            meta = mk.ExpertTokensMetadata(expert_num_tokens=out.tokens_per_expert, expert_num_tokens_cpu=None)
        else:
            num_rows, per_expert = read_counts(out.num_tokens, out.tokens_per_expert)
            x, local, weights = out.x[:num_rows], out.topk_ids[:num_rows], out.topk_weights[:num_rows]
            scales = None if out.x_scales is None else out.x_scales[:num_rows]
            valid = local >= 0
            meta = mk.ExpertTokensMetadata(expert_num_tokens=out.tokens_per_expert,
                                           expert_num_tokens_cpu=torch.tensor(per_expert, dtype=torch.int32))
        ids = torch.where(valid, local.to(ids_dtype) + self.rank_expert_offset,
                          torch.full_like(local, elsewhere, dtype=ids_dtype))
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        return x, scales, meta, ids, weights

    def finalize_async(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                       weight_and_reduce_impl) -> Callable:
        handle = self._handle()
        num_rows = topk_ids.shape[0]
        if isinstance(weight_and_reduce_impl, _reduce.TopKWeightAndReduceDelegate):
            # [num_rows, topk, hidden] unweighted: weight and sum over the row's local experts in float32
            # (slots of other ranks' experts carry weight 0).
            pairs = fused_expert_output.view(num_rows, topk_ids.shape[1], output.shape[1]).float()
            if not apply_router_weight_on_input:
                pairs = pairs * topk_weights.float()[:, :, None]
            rows = pairs.sum(dim=1).to(torch.bfloat16)
        elif num_rows:
            rows = weight_and_reduce_impl.apply(output=None, fused_expert_output=fused_expert_output,
                                                topk_weights=topk_weights, topk_ids=topk_ids,
                                                apply_router_weight_on_input=apply_router_weight_on_input)
        else:
            rows = fused_expert_output.new_empty(0, output.shape[1])
        y = padded_rows(rows.reshape(num_rows, output.shape[1]), self.buffer.capacity)
        self.buffer.combine(y, handle, out=output)
        return lambda: None

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl) -> None:
        self.finalize_async(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                            weight_and_reduce_impl)()


class MoeEpBatchedPrepareAndFinalize(_PrepareAndFinalize):
    """Activation format BatchedExperts: moe_ep's expert layout (see the module docstring)."""

    def __init__(self, buffer, rank_expert_offset: int, async_hooks: bool = True,
                 global_to_physical: torch.Tensor | None = None, column_major: bool = True):
        super().__init__(buffer, rank_expert_offset, async_hooks)
        cfg = buffer.cfg
        if "expert" not in cfg.layouts:
            raise ValueError("MoeEpBatchedPrepareAndFinalize needs a Buffer with the expert layout")
        if cfg.slots(buffer.world_size) != cfg.expert_tokens * buffer.world_size:
            raise ValueError("vLLM's batched experts take max_tokens * ranks rows per expert: leave "
                             "EpConfig.expert_slots at its default")
        self.global_to_physical = global_to_physical
        self.column_major = column_major

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.BatchedExperts

    def max_num_tokens_per_rank(self) -> int | None:
        return self.buffer.cfg.expert_tokens

    def prepare_async(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                      quant_config, defer_input_quant=False) -> tuple[Callable, mk.ReceiverType]:
        x, ids, weights = self._inputs(a1, topk_weights, topk_ids, apply_router_weight_on_input, defer_input_quant)
        if self.global_to_physical is not None:  # round-robin placement (vLLM's routing tables); -1 stays -1
            physical = self.global_to_physical[ids.long().clamp(min=0)].to(ids.dtype)
            ids = torch.where(ids >= 0, physical, ids)
        out, hook = self.buffer.dispatch(x, ids, weights, layout="expert", return_recv_hook=True)
        self._store_handle(out.handle)
        self.last_path = out.handle.path
        return hook, lambda: self._receive(out)

    def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                quant_config, defer_input_quant=False) -> mk.PrepareResultType:
        hook, receiver = self.prepare_async(a1, topk_weights, topk_ids, num_experts, expert_map,
                                            apply_router_weight_on_input, quant_config, defer_input_quant)
        hook()
        return receiver()

    def _receive(self, out) -> mk.PrepareResultType:
        scales = out.x_scales
        if scales is not None and self.column_major:
            scales = column_major_scales(scales)
        meta = mk.ExpertTokensMetadata(expert_num_tokens=out.tokens_per_expert, expert_num_tokens_cpu=None)
        return out.x, scales, meta, None, None

    def finalize_async(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                       weight_and_reduce_impl) -> tuple[Callable, Callable]:
        if not isinstance(weight_and_reduce_impl, _reduce.TopKWeightAndReduceDelegate):
            raise ValueError(f"{type(self).__name__} weights and sums in its combine: the experts must leave that "
                             f"to it (TopKWeightAndReduceDelegate), got {type(weight_and_reduce_impl).__name__}")
        handle = self._handle()
        _ubatching.dbo_maybe_run_recv_hook()
        _, hook = self.buffer.combine(fused_expert_output.contiguous(), handle, out=output,
                                      weighted=not apply_router_weight_on_input, return_recv_hook=True)
        return hook, lambda: None

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl) -> None:
        hook, receiver = self.finalize_async(output, fused_expert_output, topk_weights, topk_ids,
                                             apply_router_weight_on_input, weight_and_reduce_impl)
        hook()
        receiver()


class MoeEpAll2AllManager(_base_comm.All2AllManagerBase):
    """Owns one ``moe_ep.Buffer`` per configuration for vLLM's EP group. vLLM builds it in place
    of its DeepEP managers (see ``install``); ``from_group`` builds one over any process group."""

    def __init__(self, cpu_group, tcp_store_group=None):
        super().__init__(cpu_group, tcp_store_group)
        self._group = None  # vLLM's EP device group, looked up at the first get_handle
        self.buffers = BufferCache()

    @classmethod
    def from_group(cls, group) -> "MoeEpAll2AllManager":
        """A manager whose Buffers live on ``group`` (every rank one EP rank, one DP rank each),
        without vLLM's parallel state."""
        import torch.distributed as dist

        manager = cls.__new__(cls)
        manager.cpu_group = group
        manager.tcp_store_group = None
        manager.rank, manager.world_size = dist.get_rank(group), dist.get_world_size(group)
        manager.dp_rank, manager.dp_world_size = manager.rank, manager.world_size
        manager.internode = False
        manager.support_fault_tolerance = False
        manager._group = group
        manager.buffers = BufferCache()
        return manager

    def _buffer_group(self):
        if self._group is None:
            from vllm.distributed import get_ep_group

            self._group = get_ep_group().device_group
        return self._group

    def get_handle(self, kwargs: dict):
        """The Buffer for ``kwargs``: hidden, num_experts, topk, max_tokens_per_rank,
        dispatch_dtype and layout ("flat" or "expert"), plus ``$MOE_EP_CONFIG``."""
        kwargs = dict(kwargs)
        layout = kwargs.pop("layout")
        if self.internode and layout == "flat" and "gpus_per_node" not in config_overrides():
            raise ValueError("moe_ep across nodes: set MOE_EP_CONFIG='{\"gpus_per_node\": N}' (the flat layout "
                             "crosses nodes; the expert layout works on one node)")
        mode = {"mode": "ll"} if layout == "expert" else {}
        cfg = make_config(layouts=(layout,), **mode, **kwargs)
        return self.buffers.get(self._buffer_group(), cfg)

    def destroy(self) -> None:
        self.buffers.close()


def dispatch_dtype(quant_config) -> torch.dtype:
    """The dtype moe_ep dispatches for ``quant_config``: bf16 for unquantized activations, the fp8
    dtype for fp8 activations with 1x128 block scales; other schemes are refused."""
    quant_dtype = None if quant_config is None else quant_config.quant_dtype
    if quant_dtype is None:
        return torch.bfloat16
    block = quant_config.block_shape
    if quant_dtype in FP8_DTYPES and block is not None and block[1] == 128:
        return quant_dtype
    raise NotImplementedError(
        f"moe_ep dispatches bf16 or fp8 with 1x128 block scales; this layer quantises its activations as "
        f"{quant_dtype} with block_shape={block}, per_act_token={quant_config.per_act_token_quant}")


def make_prepare_finalize(moe, quant_config, all2all_manager: MoeEpAll2AllManager, routing_tables=None,
                          async_hooks: bool = True, padded: bool = False):
    """moe_ep's prepare/finalize for a vLLM MoE layer (``FusedMoEConfig``) over ``all2all_manager``:
    BatchedExperts for ``--all2all-backend deepep_low_latency``, Standard for
    ``deepep_high_throughput`` (and for a manager from ``from_group`` with neither set)."""
    if moe.in_dtype != torch.bfloat16:
        raise NotImplementedError(f"moe_ep moves bf16 activations; this layer's are {moe.in_dtype}")
    parallel = moe.moe_parallel_config
    batched = parallel.use_deepep_ll_kernels
    fields = dict(hidden=moe.hidden_dim, num_experts=moe.num_experts, topk=moe.experts_per_token,
                  max_tokens_per_rank=moe.max_num_tokens, dispatch_dtype=dispatch_dtype(quant_config),
                  layout="expert" if batched else "flat")
    buffer = all2all_manager.get_handle(fields)
    offset = all2all_manager.rank * moe.num_local_experts
    if batched:
        global_to_physical = None if routing_tables is None else routing_tables[0]
        return MoeEpBatchedPrepareAndFinalize(buffer, offset, async_hooks, global_to_physical)
    if routing_tables is not None:
        raise NotImplementedError("moe_ep's Standard format takes linear expert placement (as DeepEP high-throughput)")
    return MoeEpPrepareAndFinalize(buffer, offset, async_hooks, padded)


# -- registration --------------------------------------------------------------------------------

_ORIGINALS: dict[str, Callable] = {}


def _maybe_make_prepare_finalize(moe, quant_config, routing_tables=None, allow_new_interface=False,
                                 use_monolithic=False, all2all_manager=None, input_dtype=None):
    """vLLM's ``maybe_make_prepare_finalize``, answering for moe_ep's managers."""
    parallel = moe.moe_parallel_config
    if all2all_manager is None and parallel.use_all2all_kernels and parallel.all2all_backend in BACKENDS:
        from vllm.model_executor.layers.fused_moe.all2all_utils import get_ep_all2all_manager

        all2all_manager = get_ep_all2all_manager()
    if not isinstance(all2all_manager, MoeEpAll2AllManager):
        return _ORIGINALS["maybe_make_prepare_finalize"](
            moe, quant_config, routing_tables=routing_tables, allow_new_interface=allow_new_interface,
            use_monolithic=use_monolithic, all2all_manager=all2all_manager, input_dtype=input_dtype)
    if use_monolithic:
        raise NotImplementedError("moe_ep's prepare/finalize are modular: pick a modular MoE backend")
    return make_prepare_finalize(moe, quant_config, all2all_manager, routing_tables)


def _maybe_roundup_layer_hidden_size(hidden_size, act_dtype, moe_parallel_config):
    """No rounding for moe_ep (DeepEP's sizes do not apply); other backends as vLLM rounds."""
    if moe_parallel_config.use_all2all_kernels and moe_parallel_config.all2all_backend in BACKENDS:
        return hidden_size
    return _ORIGINALS["maybe_roundup_layer_hidden_size"](hidden_size, act_dtype, moe_parallel_config)


def install() -> None:
    """Make vLLM use moe_ep for ``--all2all-backend deepep_high_throughput`` / ``deepep_low_latency``
    in this process (idempotent): its all2all module's DeepEP manager classes become
    ``MoeEpAll2AllManager`` (its CUDA communicator imports them when it builds the EP group), and
    ``all2all_utils.maybe_make_prepare_finalize`` / ``maybe_roundup_layer_hidden_size`` answer for
    moe_ep, in that module and in every loaded module that imported them by name."""
    all2all = require("vllm.distributed.device_communicators.all2all", _INSTALL, "vllm")
    utils = require("vllm.model_executor.layers.fused_moe.all2all_utils", _INSTALL, "vllm")
    all2all.DeepEPHTAll2AllManager = MoeEpAll2AllManager
    all2all.DeepEPLLAll2AllManager = MoeEpAll2AllManager
    for name, replacement in (("maybe_make_prepare_finalize", _maybe_make_prepare_finalize),
                              ("maybe_roundup_layer_hidden_size", _maybe_roundup_layer_hidden_size)):
        original = _ORIGINALS.setdefault(name, getattr(utils, name))
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("vllm") and getattr(module, name, None) is original:
                setattr(module, name, replacement)
