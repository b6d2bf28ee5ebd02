"""vLLM 0.33's modular MoE kernel with moe_ep's prepare/finalize, on CPU ranks (importable by rank
processes; needs vLLM: run through ``make test-integrations``).

Each rank builds vLLM's own ``FusedMoEConfig`` / ``FusedMoEQuantConfig``, gets moe_ep's
prepare/finalize from vLLM's factory ``maybe_make_prepare_finalize`` (replaced by
``moe_ep.integrations.vllm.install``) or from ``make_prepare_finalize`` (for the variants), and
runs either the prepare/finalize alone (data movement, checked bit for bit against
``moe_ep.reference``) or vLLM's ``FusedMoEKernel`` with the SwiGLU experts below, real subclasses
of vLLM's ``FusedMoEExpertsModular`` (checked against the dense MoE).
A failing check leaves the Buffers open: the rank pool then kills every rank (closing them would
wait for the failed rank's peers and report a timeout instead of the failure).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.forward_context import DPMetadata, ForwardContext, override_forward_context
from vllm.model_executor.layers.fused_moe import all2all_utils
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (FusedMoEConfig, FusedMoEParallelConfig, FusedMoEQuantConfig,
                                                         RoutingMethodType)
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (TopKWeightAndReduceDelegate,
                                                                         TopKWeightAndReduceNoOP)
from vllm.v1.worker.workspace import init_workspace_manager, is_workspace_manager_initialized

import moe_ep.integrations.vllm as moe_ep_vllm
from framework_cases import (CROSSOVER, EXPERTS_PER_RANK, FFN, HIDDEN, MAX_TOKENS, POISON, TOPK, check_accuracy,
                             dense_reference, dequantized, expert_rows_padded, expert_stand_in, flat_stand_in,
                             make_experts, random_inputs, routed_inputs, swiglu)
from moe_ep import reference
from rank_checks import assert_equal

BACKENDS = {"standard": "deepep_high_throughput", "batched": "deepep_low_latency"}
KINDS = ("uniform", "masked", "one_rank", "to_rank0")


class TorchExperts(mk.FusedMoEExpertsModular):
    """Activation format Standard: SwiGLU of each (row, k) whose expert ``expert_map`` places here,
    in float32. ``reduce``: the weighted sum per row (vLLM's TopKWeightAndReduceNoOP, as its Triton
    experts); else the unweighted ``[M, topk, H]`` outputs, weighing and summing left to the
    prepare/finalize (TopKWeightAndReduceDelegate). Checks the prepare's per-expert counts."""

    def __init__(self, moe_config, quant_config, reduce: bool = True):
        super().__init__(moe_config, quant_config)
        self.reduce = reduce

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return True

    @staticmethod
    def _supports_activation(activation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config) -> bool:
        return True

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP() if self.reduce else TopKWeightAndReduceDelegate()

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        return (0,), (0,), ((M, K) if self.reduce else (M, topk, K))

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map,
              a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta, apply_router_weight_on_input):
        x = dequantized(hidden_states, a1q_scale)
        local = expert_map[topk_ids.long()].long()  # [M, topk]: -1 for an expert of another rank
        counts = torch.bincount(local[local >= 0], minlength=w1.shape[0]).int()
        assert_equal("expert_num_tokens", counts, expert_tokens_meta.expert_num_tokens.cpu())
        if expert_tokens_meta.expert_num_tokens_cpu is not None:
            assert_equal("expert_num_tokens_cpu", counts, expert_tokens_meta.expert_num_tokens_cpu)
        num_rows, topk = topk_ids.shape
        pairs = torch.zeros(num_rows, topk, x.shape[1], dtype=torch.float32)
        for e in range(w1.shape[0]):
            rows, ks = (local == e).nonzero(as_tuple=True)
            if rows.numel():
                pairs[rows, ks] = swiglu(x[rows], w1[e], w2[e])
        if self.reduce:
            weights = 1.0 if apply_router_weight_on_input else topk_weights.float()[:, :, None]
            output.copy_((pairs * weights).sum(dim=1))
        else:
            output.view(num_rows, topk, -1).copy_(pairs)


class TorchBatchedExperts(mk.FusedMoEExpertsModular):
    """Activation format BatchedExperts: SwiGLU of rows ``[0, expert_num_tokens[e])`` of each local
    expert e in float32, unweighted (TopKWeightAndReduceDelegate); rows past the count are set
    to NaN (the combine must not read them)."""

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.BatchedExperts

    _supports_current_device = TorchExperts._supports_current_device
    _supports_no_act_and_mul = TorchExperts._supports_no_act_and_mul
    _supports_quant_scheme = TorchExperts._supports_quant_scheme
    _supports_activation = TorchExperts._supports_activation
    _supports_parallel_config = TorchExperts._supports_parallel_config

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceDelegate()

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        return (0,), (0,), (local_num_experts, self.max_num_tokens * self.num_dispatchers, K)

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map,
              a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta, apply_router_weight_on_input):
        x = dequantized(hidden_states, a1q_scale)
        output.fill_(POISON)
        for e, count in enumerate(expert_tokens_meta.expert_num_tokens.tolist()):
            output[e, :count] = swiglu(x[e, :count], w1[e], w2[e]).to(output.dtype)


def setup_rank(ctx) -> moe_ep_vllm.MoeEpAll2AllManager:
    """Per process: the flat Buffers' crossover and a timeout for loaded CPUs ($MOE_EP_CONFIG),
    vLLM's workspace manager on the CPU, moe_ep's factory in vLLM; a manager over the ranks."""
    os.environ["MOE_EP_CONFIG"] = json.dumps({"crossover_tokens": CROSSOVER, "timeout_s": 120.0})
    if not is_workspace_manager_initialized():
        init_workspace_manager(torch.device("cpu"))
    moe_ep_vllm.install()
    return moe_ep_vllm.MoeEpAll2AllManager.from_group(ctx.group)


def moe_config(ctx, fmt: str) -> FusedMoEConfig:
    parallel = FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=ctx.world_size, ep_size=ctx.world_size, tp_rank=0,
                                      pcp_rank=0, dp_rank=ctx.rank, ep_rank=ctx.rank, sp_size=1, use_ep=True,
                                      all2all_backend=BACKENDS[fmt], enable_eplb=False)
    num_experts = EXPERTS_PER_RANK * ctx.world_size
    return FusedMoEConfig(num_experts=num_experts, experts_per_token=TOPK, hidden_dim=HIDDEN, intermediate_size=FFN,
                          num_local_experts=EXPERTS_PER_RANK, num_logical_experts=num_experts,
                          activation=MoEActivation.SILU, device="cpu", routing_method=RoutingMethodType.Renormalize,
                          moe_parallel_config=parallel, in_dtype=torch.bfloat16, max_num_tokens=MAX_TOKENS)


def quant_config(dtype_name: str) -> FusedMoEQuantConfig:
    """Unquantized activations (bf16 dispatch), or fp8 activations with 1x128 block scales (as a
    block-fp8 model's; the experts above keep bf16 weights, the weight scales are unused)."""
    if dtype_name == "bfloat16":
        return FusedMoEQuantConfig.make()
    return FusedMoEQuantConfig.make(quant_dtype=torch.float8_e4m3fn, block_shape=[128, 128],
                                    w1_scale=torch.ones(1), w2_scale=torch.ones(1))


def expert_map(ctx) -> torch.Tensor:
    """vLLM's ``expert_map``: global expert -> local index on this rank, -1 elsewhere (linear placement)."""
    mapping = torch.full((EXPERTS_PER_RANK * ctx.world_size,), -1, dtype=torch.int32)
    mapping[ctx.rank * EXPERTS_PER_RANK:(ctx.rank + 1) * EXPERTS_PER_RANK] = torch.arange(EXPERTS_PER_RANK,
                                                                                        dtype=torch.int32)
    return mapping


def forward_context(counts: list[int]):
    """vLLM's forward context of a DP step whose ranks hold ``counts`` tokens (what the Standard
    format's shared token count comes from)."""
    ctx = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={},
                         dp_metadata=DPMetadata(torch.tensor(counts, dtype=torch.int32)))
    return override_forward_context(ctx)


def _prepare(pf, hooks: bool, x, ids, weights, num_experts, qc):
    args = (x, weights, ids, num_experts, None, False, qc)
    if not hooks:
        return pf.prepare(*args)
    ret = pf.prepare_async(*args)
    hook, receiver = ret if isinstance(ret, tuple) else (None, ret)
    busy = torch.randn(64, 64) @ torch.randn(64, 64)  # other work before the hook
    if hook is not None:
        hook()
    assert bool(busy.isfinite().all())
    return receiver()


def _finalize(pf, hooks: bool, output, fused, weights, ids, reduce_impl) -> None:
    if not hooks:
        pf.finalize(output, fused, weights, ids, False, reduce_impl)
        return
    ret = pf.finalize_async(output, fused, weights, ids, False, reduce_impl)
    hook, receiver = ret if isinstance(ret, tuple) else (None, ret)
    if hook is not None:
        hook()
    receiver()


def run_prepare_finalize(ctx, fmt: str, dtype_name: str, hooks: bool, padded: bool, calls: int,
                         round_robin: bool = False, seed: int = 3) -> list[str]:
    """``calls`` prepare + finalize pairs of moe_ep's ``fmt`` class on fresh inputs (routings with -1
    slots and ranks that send or receive nothing; Standard: batches alternately at most CROSSOVER
    tokens a rank, so the shared count picks LL, and above, HT), every output checked bit for bit
    against moe_ep.reference, outputs poisoned after use. Returns the paths the dispatches took."""
    manager = setup_rank(ctx)
    world, me = ctx.world_size, ctx.rank
    num_experts = EXPERTS_PER_RANK * world
    dtype = getattr(torch, dtype_name)
    qc = quant_config(dtype_name)
    moe = moe_config(ctx, fmt)
    tables = None
    if round_robin:  # vLLM's round-robin routing tables: expert e lives on rank e % R
        physical = torch.tensor([(e % world) * EXPERTS_PER_RANK + e // world for e in range(num_experts)])
        tables = (physical, torch.argsort(physical), None)
    variant = hooks and not padded and not round_robin
    pf = all2all_utils.maybe_make_prepare_finalize(moe, qc, routing_tables=tables, allow_new_interface=True,
                                                   all2all_manager=manager) if variant else \
        moe_ep_vllm.make_prepare_finalize(moe, qc, manager, routing_tables=tables, async_hooks=hooks, padded=padded)
    expected_class = moe_ep_vllm.MoeEpPrepareAndFinalize if fmt == "standard" else \
        moe_ep_vllm.MoeEpBatchedPrepareAndFinalize
    assert type(pf) is expected_class, type(pf)
    assert pf.supports_async() == hooks
    paths = []
    for call in range(calls):
        xs, ids, weights = random_inputs(call, world, seed, KINDS[call % len(KINDS)], small=call % 2 == 1)
        counts = [x.shape[0] for x in xs]
        with forward_context(counts):
            result = _prepare(pf, hooks, xs[me], ids[me], weights[me], num_experts, qc)
        paths.append(pf.last_path)
        if fmt == "standard":
            _check_standard(ctx, pf, hooks, padded, result, xs, ids, weights, dtype, f"call {call}")
            assert pf.last_path == ("ll" if max(counts) <= CROSSOVER else "ht"), (counts, pf.last_path)
        else:
            routed = ids if tables is None else [torch.where(i >= 0, tables[0][i.clamp(min=0)], i) for i in ids]
            _check_batched(ctx, pf, hooks, result, xs, routed, ids, weights, dtype, f"call {call}")
    pf.buffer.check()
    manager.destroy()
    return paths


def _check_standard(ctx, pf, hooks, padded, result, xs, ids, weights, dtype, name) -> None:
    world, me = ctx.world_size, ctx.rank
    num_experts = EXPERTS_PER_RANK * world
    received = reference.dispatch(xs, ids, weights, num_experts, dtype)
    exp = received[me]
    x, scales, meta, ids_out, weights_out = result
    n = exp.num_tokens
    rows = x.shape[0] if padded else n
    assert x.shape[0] == (pf.buffer.capacity if padded else n), (name, x.shape)
    assert_equal(f"x of {name}", exp.x.view(torch.uint8), x[:n].view(torch.uint8))
    if exp.x_scales is not None:
        assert_equal(f"x_scales of {name}", exp.x_scales, scales[:n])
    else:
        assert scales is None
    # Global ids: local + this rank's first expert; another rank's expert (and a padding row) gets an
    # expert that is not this rank's: num_experts - 1 on rank 0, 0 elsewhere.
    elsewhere = num_experts - 1 if me == 0 else 0
    local = torch.full((rows, TOPK), -1, dtype=torch.int32)
    local[:n] = exp.topk_ids
    expected_ids = torch.where(local >= 0, local.long() + me * EXPERTS_PER_RANK, elsewhere).to(ids[me].dtype)
    assert_equal(f"topk_ids of {name}", expected_ids, ids_out)
    expected_weights = torch.zeros(rows, TOPK)
    expected_weights[:n] = exp.topk_weights
    assert_equal(f"topk_weights of {name}", expected_weights, weights_out)
    assert_equal(f"expert_num_tokens of {name}", exp.tokens_per_expert, meta.expert_num_tokens.cpu())
    if padded:
        assert meta.expert_num_tokens_cpu is None
    else:
        assert_equal(f"expert_num_tokens_cpu of {name}", exp.tokens_per_expert, meta.expert_num_tokens_cpu)
    # finalize: stand-in rows, already weighted and reduced (NoOP); padding rows NaN, never read.
    ys = flat_stand_in(received)
    fused = torch.full((rows, HIDDEN), POISON, dtype=torch.bfloat16)
    fused[:n] = ys[me]
    output = torch.full((xs[me].shape[0], HIDDEN), POISON, dtype=torch.bfloat16)
    _finalize(pf, hooks, output, fused, weights_out, ids_out, TopKWeightAndReduceNoOP())
    z = reference.combine(ys, received, [t.shape[0] for t in xs])[me]
    assert_equal(f"combine of {name}", z, output)
    x.view(torch.uint8).fill_(0xFF)  # zero-copy views or fresh rows: the next call must rewrite them


def _check_batched(ctx, pf, hooks, result, xs, routed, ids, weights, dtype, name) -> None:
    world, me = ctx.world_size, ctx.rank
    num_experts = EXPERTS_PER_RANK * world
    slots = MAX_TOKENS * world
    received = reference.dispatch_expert(xs, routed, weights, num_experts, dtype)
    exp = received[me]
    x, scales, meta, ids_out, weights_out = result
    assert ids_out is None and weights_out is None
    assert tuple(x.shape) == (EXPERTS_PER_RANK, slots, HIDDEN), (name, x.shape)
    assert_equal(f"expert_num_tokens of {name}", exp.tokens_per_expert, meta.expert_num_tokens.cpu())
    assert meta.expert_num_tokens_cpu is None
    if exp.x_scales is not None:  # DeepEP's layout: each expert's [slots, groups] column-major
        groups = HIDDEN // 128
        assert tuple(scales.shape) == (EXPERTS_PER_RANK, slots, groups)
        assert scales.stride() == (groups * slots, 1, slots), scales.stride()
    else:
        assert scales is None
    for e in range(EXPERTS_PER_RANK):
        n, rows = int(exp.tokens_per_expert[e]), exp.rows(e)
        assert_equal(f"x of expert {e}, {name}", exp.x[rows].view(torch.uint8), x[e, :n].view(torch.uint8))
        if exp.x_scales is not None:
            assert_equal(f"x_scales of expert {e}, {name}", exp.x_scales[rows], scales[e, :n])
    ys = expert_stand_in(received)
    fused = expert_rows_padded(ys[me], exp, slots)
    output = torch.full((xs[me].shape[0], HIDDEN), POISON, dtype=torch.bfloat16)
    _finalize(pf, hooks, output, fused, weights[me], ids[me], TopKWeightAndReduceDelegate())
    z = reference.combine_expert(ys, received, routed, weights, weighted=True)[me]
    assert_equal(f"combine of {name}", z, output)
    x.view(torch.uint8).fill_(0xFF)


def run_modular_kernel(ctx, fmt: str, dtype_name: str, hooks: bool, padded: bool, reduce: bool, calls: int,
                       seed: int = 11) -> list[dict]:
    """vLLM's ``FusedMoEKernel(moe_ep prepare/finalize, torch SwiGLU experts)`` on ``calls`` batches
    routed by a real router (softmax top-k) against the dense MoE. Returns the errors per call."""
    manager = setup_rank(ctx)
    world, me = ctx.world_size, ctx.rank
    num_experts = EXPERTS_PER_RANK * world
    qc = quant_config(dtype_name)
    moe = moe_config(ctx, fmt)
    experts = make_experts(world, seed)
    w13, w2 = experts.local(me, EXPERTS_PER_RANK)
    pf = moe_ep_vllm.make_prepare_finalize(moe, qc, manager, async_hooks=hooks, padded=padded)
    if fmt == "standard":
        compute = TorchExperts(moe, qc, reduce)
    else:
        compute = TorchBatchedExperts(moe, qc, max_num_tokens=pf.max_num_tokens_per_rank(),
                                      num_dispatchers=pf.num_dispatchers())
    kernel = mk.FusedMoEKernel(pf, compute)
    stats = []
    for call in range(calls):
        xs, ids, weights, _ = routed_inputs(call, world, seed, small=call % 2 == 1)
        with forward_context([x.shape[0] for x in xs]):
            out = kernel.apply(xs[me], w13, w2, weights[me], ids[me], MoEActivation.SILU, num_experts,
                               expert_map(ctx), False)
        ref = dense_reference(xs[me], ids[me], weights[me], experts)
        stats.append({"call": call, "path": pf.last_path,
                      **check_accuracy(f"call {call}", dtype_name, out, ref)})
    pf.buffer.check()
    manager.destroy()
    return stats


def check_registration() -> dict:
    """In this process (vLLM's plugin loader runs once per process): moe_ep's entry point with
    ``$MOE_EP_VLLM`` unset changes nothing; ``load_general_plugins()`` with it set runs moe_ep's
    entry point, after which vLLM builds moe_ep's manager for the DeepEP backends, its factory
    (also where an oracle imported it by name) answers for moe_ep's managers and hands every other
    backend to vLLM's own, and hidden sizes are not rounded for DeepEP."""
    from importlib.metadata import entry_points

    import vllm.distributed.device_communicators.all2all as all2all
    import vllm.model_executor.layers.fused_moe.oracle.unquantized as oracle
    from vllm.plugins import load_general_plugins

    from moe_ep.integrations import plugins

    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "moe_ep"]
    assert [ep.value for ep in found] == ["moe_ep.integrations.plugins:vllm_plugin"], found
    originals = (all2all.DeepEPLLAll2AllManager, all2all_utils.maybe_make_prepare_finalize)
    os.environ.pop(plugins.VLLM_ENV, None)
    found[0].load()()
    assert (all2all.DeepEPLLAll2AllManager, all2all_utils.maybe_make_prepare_finalize) == originals
    os.environ[plugins.VLLM_ENV] = "1"
    load_general_plugins()
    assert all2all.DeepEPHTAll2AllManager is moe_ep_vllm.MoeEpAll2AllManager
    assert all2all.DeepEPLLAll2AllManager is moe_ep_vllm.MoeEpAll2AllManager
    for module in (all2all_utils, oracle):
        assert module.maybe_make_prepare_finalize is moe_ep_vllm._maybe_make_prepare_finalize, module.__name__
    parallel = FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=2, ep_size=2, tp_rank=0, pcp_rank=0, dp_rank=0,
                                      ep_rank=0, sp_size=1, use_ep=True, all2all_backend="deepep_high_throughput",
                                      enable_eplb=False)
    assert all2all_utils.maybe_roundup_layer_hidden_size(2880, torch.bfloat16, parallel) == 2880
    # Another backend goes to vLLM's factory (all-gather / reduce-scatter prepare/finalize here).
    two_ranks = SimpleNamespace(world_size=2, rank=0)
    other = moe_config(two_ranks, "standard")
    other.moe_parallel_config.all2all_backend = "allgather_reducescatter"
    pf = all2all_utils.maybe_make_prepare_finalize(other, quant_config("bfloat16"), allow_new_interface=True,
                                                   all2all_manager=two_ranks)
    assert not isinstance(pf, (moe_ep_vllm.MoeEpPrepareAndFinalize, moe_ep_vllm.MoeEpBatchedPrepareAndFinalize))
    return {"other_backend": type(pf).__name__}
