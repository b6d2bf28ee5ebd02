"""SGLang 0.5.23's dispatcher interface and DeepEP output formats with moe_ep's dispatcher, on CPU
ranks (importable by rank processes; needs SGLang: run through ``make test-integrations``).

SGLang's DeepEP expert runners need DeepGEMM (a GPU), so the experts here are plain torch that
consume SGLang's own dataclasses (``DeepEPNormalDispatchOutput`` / ``DeepEPLLDispatchOutput``) and
hand back its combine inputs. The mode comes from SGLang's ``is_extend_in_batch`` flag, the
shared token count from its DP-attention state (``set_dp_buffer_len``), two-batch overlap from
its flag and its ``MaybeTboDeepEPDispatcher``, the registration from its plugin loader.
A failing check leaves the Buffers open: the rank pool then kills every rank (closing them would
wait for the failed rank's peers and report a timeout instead of the failure).
"""

from __future__ import annotations

import json
import os

import torch
from sglang.srt.layers.dp_attention import set_dp_buffer_len, set_is_extend_in_batch
from sglang.srt.layers.moe.token_dispatcher import (CombineInputFormat, DeepEPLLCombineInput, DeepEPLLDispatchOutput,
                                                    DeepEPNormalCombineInput, DeepEPNormalDispatchOutput,
                                                    DispatchOutputFormat)
from sglang.srt.layers.moe.topk import StandardTopKOutput
from sglang.srt.layers.moe.utils import DeepEPMode, MoeA2ABackend
from sglang.srt.runtime_context import get_flags

import moe_ep.integrations.sglang as moe_ep_sglang
from framework_cases import (CROSSOVER, EXPERTS_PER_RANK, HIDDEN, MAX_TOKENS, TOPK, check_accuracy, dense_reference,
                             dequantized, expert_rows_padded, expert_stand_in, flat_stand_in, make_experts,
                             random_inputs, routed_inputs, swiglu)
from moe_ep import reference
from moe_ep.integrations._common import align_counts
from rank_checks import assert_equal

KINDS = ("uniform", "masked", "one_rank", "to_rank0")
ALIGNMENT = 4  # the normal mode's count alignment in the tests (DeepGEMM's is 128)


def setup_rank(tbo: bool = False, server_args: bool = False) -> None:
    """Per call of a test: the flat Buffers' crossover and a timeout for loaded CPUs
    ($MOE_EP_CONFIG), SGLang's flags as ``--moe-a2a-backend deepep`` sets them (two-batch overlap
    on or off), and the token capacities: DeepEP's decode setting, and the prefill one from
    $MOE_EP_SGLANG_NORMAL_TOKENS or (``server_args``) from SGLang's published server arguments
    (``--chunked-prefill-size``; they also feed SGLang's choice of the dispatch dtypes)."""
    os.environ["MOE_EP_CONFIG"] = json.dumps({"crossover_tokens": CROSSOVER, "timeout_s": 120.0})
    os.environ["SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"] = str(MAX_TOKENS)
    if server_args:
        from sglang.srt.runtime_context import get_context
        from sglang.srt.server_args import ServerArgs

        os.environ.pop(moe_ep_sglang.NORMAL_TOKENS_ENV, None)
        # The process-wide slot, without publish()'s resolution (which loads the model's config).
        get_context().set_server_args(ServerArgs(model_path="unused", moe_a2a_backend="deepep",
                                                 chunked_prefill_size=MAX_TOKENS))
    else:
        os.environ[moe_ep_sglang.NORMAL_TOKENS_ENV] = str(MAX_TOKENS)
    moe = get_flags().moe
    moe.a2a_backend = MoeA2ABackend.DEEPEP
    moe.deepep_mode = DeepEPMode.AUTO
    moe.tbo_enabled = tbo


def dispatcher(ctx, mode: DeepEPMode, dtype_name: str, alignment: int = 1) -> moe_ep_sglang.MoeEpDispatcher:
    dtype = getattr(torch, dtype_name)
    return moe_ep_sglang.MoeEpDispatcher(
        ctx.group, router_topk=TOPK, num_experts=EXPERTS_PER_RANK * ctx.world_size,
        num_local_experts=EXPERTS_PER_RANK, hidden_size=HIDDEN, params_dtype=torch.bfloat16, deepep_mode=mode,
        normal_dtype=dtype, low_latency_dtype=dtype, normal_max_tokens=MAX_TOKENS, low_latency_max_tokens=MAX_TOKENS,
        expert_alignment=alignment)


def step(counts: list[int], me: int, extend: bool) -> None:
    """SGLang's per-batch state: the mode flag and the DP ranks' token counts."""
    set_is_extend_in_batch(extend)
    set_dp_buffer_len(sum(counts), counts[me], False, counts)


def topk_output(ids: torch.Tensor, weights: torch.Tensor) -> StandardTopKOutput:
    return StandardTopKOutput(topk_weights=weights, topk_ids=ids.int(), router_logits=torch.empty(ids.shape[0], 0))


def _dispatch(d, split: bool, x, topk, **tbo):
    if not split:
        return d.dispatch(hidden_states=x, topk_output=topk, **tbo)
    d.dispatch_a(hidden_states=x, topk_output=topk, **tbo)
    assert bool((torch.randn(32, 32) @ torch.randn(32, 32)).isfinite().all())  # other work between the halves
    return d.dispatch_b(**tbo)


def _combine(d, split: bool, combine_input, **tbo):
    if not split:
        return d.combine(combine_input=combine_input, **tbo)
    d.combine_a(combine_input=combine_input, **tbo)
    return d.combine_b(**tbo)


class Call:
    """One call's inputs on every rank, what the oracle says this rank receives and gets back, and
    the checks of the dispatch output and the combine."""

    def __init__(self, ctx, call: int, seed: int, normal: bool, dtype_name: str, alignment: int = 1,
                 combine_weight_scale: float = 1.0):
        world, me = ctx.world_size, ctx.rank
        self.me, self.world, self.normal, self.alignment = me, world, normal, alignment
        self.name = f"call {call} ({'normal' if normal else 'low latency'})"
        self.num_experts = EXPERTS_PER_RANK * world
        self.xs, self.ids, self.weights = random_inputs(call, world, seed, KINDS[call % len(KINDS)],
                                                        small=call % 4 >= 2)
        self.counts = [x.shape[0] for x in self.xs]
        self.topk = topk_output(self.ids[me], self.weights[me])
        dtype = getattr(torch, dtype_name)
        self.scale = combine_weight_scale
        if normal:
            self.received = reference.dispatch(self.xs, self.ids, self.weights, self.num_experts, dtype)
            self.ys = flat_stand_in(self.received)
            self.z = reference.combine(self.ys, self.received, self.counts)[me]
        else:
            self.received = reference.dispatch_expert(self.xs, self.ids, self.weights, self.num_experts, dtype)
            self.ys = expert_stand_in(self.received)
            self.z = reference.combine_expert(self.ys, self.received, self.ids,
                                              [w * combine_weight_scale for w in self.weights], weighted=True)[me]

    def path(self) -> str:
        if not self.normal:
            return "expert"
        return "ll" if max(self.counts) <= CROSSOVER else "ht"

    def check_dispatch(self, out) -> None:
        exp = self.received[self.me]
        if self.normal:
            assert isinstance(out, DeepEPNormalDispatchOutput) and out.format == DispatchOutputFormat.DEEPEP_NORMAL
            n = exp.num_tokens
            assert out.hidden_states.shape[0] == n, (self.name, out.hidden_states.shape)
            assert_equal(f"hidden_states of {self.name}", exp.x.view(torch.uint8), out.hidden_states.view(torch.uint8))
            if exp.x_scales is not None:
                assert_equal(f"hidden_states_scale of {self.name}", exp.x_scales, out.hidden_states_scale)
            else:
                assert out.hidden_states_scale is None
            assert_equal(f"topk_ids of {self.name}", exp.topk_ids.long(), out.topk_ids)  # local ids, -1 elsewhere
            assert_equal(f"topk_weights of {self.name}", exp.topk_weights, out.topk_weights)
            per_expert = exp.tokens_per_expert.tolist()
            assert out.num_recv_tokens_per_expert == align_counts(per_expert, self.alignment), \
                (self.name, out.num_recv_tokens_per_expert, per_expert)
            return
        assert isinstance(out, DeepEPLLDispatchOutput) and out.format == DispatchOutputFormat.DEEPEP_LL
        slots = MAX_TOKENS * self.world
        assert tuple(out.hidden_states.shape) == (EXPERTS_PER_RANK, slots, HIDDEN), out.hidden_states.shape
        assert_equal(f"masked_m of {self.name}", exp.tokens_per_expert, out.masked_m.cpu())
        assert out.expected_m == (self.counts[self.me] * self.world * TOPK + self.num_experts) // self.num_experts
        assert_equal(f"topk_ids of {self.name}", self.ids[self.me].long(), out.topk_ids)
        assert_equal(f"topk_weights of {self.name}", self.weights[self.me], out.topk_weights)
        scales = out.hidden_states_scale
        if exp.x_scales is not None:  # DeepEP's layout: each expert's [slots, groups] column-major
            groups = HIDDEN // 128
            assert scales.stride() == (groups * slots, 1, slots), scales.stride()
        else:
            assert scales is None
        for e in range(EXPERTS_PER_RANK):
            n, rows = int(exp.tokens_per_expert[e]), exp.rows(e)
            assert_equal(f"x of expert {e}, {self.name}", exp.x[rows].view(torch.uint8),
                         out.hidden_states[e, :n].view(torch.uint8))
            if exp.x_scales is not None:
                assert_equal(f"scales of expert {e}, {self.name}", exp.x_scales[rows], scales[e, :n])

    def combine_input(self, out):
        if self.normal:
            ci = DeepEPNormalCombineInput(hidden_states=self.ys[self.me], topk_ids=out.topk_ids,
                                          topk_weights=out.topk_weights)
            assert ci.format == CombineInputFormat.DEEPEP_NORMAL
            return ci
        y = expert_rows_padded(self.ys[self.me], self.received[self.me], MAX_TOKENS * self.world)
        weights = out.topk_weights if self.scale == 1.0 else out.topk_weights * self.scale
        return DeepEPLLCombineInput(hidden_states=y, topk_ids=out.topk_ids, topk_weights=weights)

    def check_combine(self, z) -> None:
        assert_equal(f"combine of {self.name}", self.z, z)


def run_dispatcher(ctx, mode_name: str, dtype_name: str, split: bool, calls: int, seed: int = 5) -> list[str]:
    """``calls`` dispatch + combine pairs through MoeEpDispatcher (``dispatch``/``combine``, or the
    ``_a``/``_b`` halves with work between), deepep mode ``mode_name`` (auto: extend and decode
    batches in turn), every output checked bit for bit, LL combines on odd calls weighting with
    other weights than the dispatch's (DeepEP's LL combine takes them). Returns the paths."""
    setup_rank()
    mode = DeepEPMode(mode_name)
    d = dispatcher(ctx, mode, dtype_name, ALIGNMENT)
    paths = []
    for call in range(calls):
        normal = mode.is_normal() or (mode.is_auto() and call % 2 == 0)
        c = Call(ctx, call, seed, normal, dtype_name, ALIGNMENT, combine_weight_scale=0.5 if call % 2 else 1.0)
        step(c.counts, ctx.rank, extend=normal)
        out = _dispatch(d, split, c.xs[ctx.rank], c.topk)
        assert d.last_path == c.path(), (c.name, d.last_path, c.counts)
        paths.append(d.last_path)
        c.check_dispatch(out)
        c.check_combine(_combine(d, split, c.combine_input(out)))
        out.hidden_states.view(torch.uint8).fill_(0xFF)  # the next call must rewrite the rows it reports
    for buf in (d.flat, d.expert):
        if buf is not None:
            buf.check()
    moe_ep_sglang.BUFFERS.close()
    return paths


def run_registered_tbo(ctx, calls: int, seed: int = 9) -> dict:
    """SGLang's plugin loader with MOE_EP_SGLANG=1 installs moe_ep: SGLang's own two-batch-overlap
    dispatcher (``MaybeTboDeepEPDispatcher``, what ``create_moe_dispatcher`` returns for
    ``--moe-a2a-backend deepep``) then holds two MoeEpDispatchers, built from DeepEPDispatcher's
    arguments and SGLang's settings alone; its two micro-batches run interleaved (dispatch A,
    dispatch B, then the receives, then both combines), extend and decode batches in turn, every
    output checked. DeepEP's buffer-mode switch of SGLang's graph runner is harmless."""
    from importlib.metadata import entry_points

    import sglang.srt.batch_overlap.two_batch_overlap as tbo
    import sglang.srt.layers.moe.token_dispatcher.deepep as deepep
    from sglang.srt.plugins import load_plugins

    from moe_ep.integrations import plugins

    found = [ep.value for ep in entry_points(group="sglang.srt.plugins") if ep.name == "moe_ep"]
    assert found == ["moe_ep.integrations.plugins:sglang_plugin"], found
    os.environ[plugins.SGLANG_ENV] = "1"
    load_plugins()
    assert deepep.DeepEPDispatcher is moe_ep_sglang.MoeEpDispatcher
    assert tbo.DeepEPDispatcher is moe_ep_sglang.MoeEpDispatcher
    deepep.DeepEPBuffer.set_dispatch_mode(DeepEPMode.NORMAL)
    deepep.DeepEPBuffer.set_dispatch_mode(DeepEPMode.LOW_LATENCY)  # would clean DeepEP's (absent) buffer
    setup_rank(tbo=True, server_args=True)
    d = tbo.MaybeTboDeepEPDispatcher(group=ctx.group, router_topk=TOPK, permute_fusion=True,
                                     num_experts=EXPERTS_PER_RANK * ctx.world_size, num_local_experts=EXPERTS_PER_RANK,
                                     hidden_size=HIDDEN, params_dtype=torch.bfloat16, deepep_mode=DeepEPMode.AUTO,
                                     async_finish=True, return_recv_hook=True)
    assert len(d._inners) == 2 and all(type(i) is moe_ep_sglang.MoeEpDispatcher for i in d._inners)
    # SGLang's own dtype choice on this machine: fp8 for decode (its default), bf16 for extend (fp8
    # there only with DeepGEMM).
    dtypes = {"normal": d._inners[0].flat.cfg.dispatch_dtype, "low_latency": d._inners[0].expert.cfg.dispatch_dtype}
    names = {k: str(v).removeprefix("torch.") for k, v in dtypes.items()}
    for call in range(calls):
        normal = call % 2 == 0
        dtype_name = names["normal" if normal else "low_latency"]
        a = Call(ctx, 2 * call, seed, normal, dtype_name)
        b = Call(ctx, 2 * call + 1, seed, normal, dtype_name)
        counts = [max(p, q) for p, q in zip(a.counts, b.counts)]
        step(counts, ctx.rank, extend=normal)
        d.dispatch_a(hidden_states=a.xs[ctx.rank], topk_output=a.topk, tbo_subbatch_index=0)
        d.dispatch_a(hidden_states=b.xs[ctx.rank], topk_output=b.topk, tbo_subbatch_index=1)
        out_a = d.dispatch_b(tbo_subbatch_index=0)
        out_b = d.dispatch_b(tbo_subbatch_index=1)
        a.check_dispatch(out_a)  # B's dispatch left A's rows alone
        b.check_dispatch(out_b)
        d.combine_a(combine_input=a.combine_input(out_a), tbo_subbatch_index=0)
        d.combine_a(combine_input=b.combine_input(out_b), tbo_subbatch_index=1)
        a.check_combine(d.combine_b(tbo_subbatch_index=0))
        b.check_combine(d.combine_b(tbo_subbatch_index=1))
    moe_ep_sglang.BUFFERS.close()
    return names


def run_moe(ctx, mode_name: str, dtype_name: str, calls: int, seed: int = 13) -> list[dict]:
    """An MoE layer on SGLang's interface: router -> MoeEpDispatcher.dispatch -> SwiGLU experts in
    torch reading the DEEPEP_NORMAL / DEEPEP_LL output -> its combine input -> combine, against
    the dense MoE. Returns the errors per call."""
    setup_rank()
    mode = DeepEPMode(mode_name)
    d = dispatcher(ctx, mode, dtype_name)
    world, me = ctx.world_size, ctx.rank
    experts = make_experts(world, seed)
    w13, w2 = experts.local(me, EXPERTS_PER_RANK)
    stats = []
    for call in range(calls):
        xs, ids, weights, _ = routed_inputs(call, world, seed, small=call % 2 == 1)
        step([x.shape[0] for x in xs], me, extend=mode.is_normal())
        out = d.dispatch(hidden_states=xs[me], topk_output=topk_output(ids[me], weights[me]))
        x = dequantized(out.hidden_states, out.hidden_states_scale)
        if mode.is_normal():  # rows with local ids: weighted sum over the row's local experts
            acc = torch.zeros(x.shape[0], HIDDEN)
            for e in range(EXPERTS_PER_RANK):
                rows, ks = (out.topk_ids == e).nonzero(as_tuple=True)
                if rows.numel():
                    acc.index_add_(0, rows, swiglu(x[rows], w13[e], w2[e]) * out.topk_weights[rows, ks, None])
            combine_input = DeepEPNormalCombineInput(hidden_states=acc.to(torch.bfloat16), topk_ids=out.topk_ids,
                                                     topk_weights=out.topk_weights)
        else:  # masked layout: rows [0, masked_m[e]) of each expert, unweighted
            y = torch.full(out.hidden_states.shape, float("nan"), dtype=torch.bfloat16)
            for e, n in enumerate(out.masked_m.tolist()):
                y[e, :n] = swiglu(x[e, :n], w13[e], w2[e]).to(torch.bfloat16)
            combine_input = DeepEPLLCombineInput(hidden_states=y, topk_ids=out.topk_ids,
                                                 topk_weights=out.topk_weights)
        z = d.combine(combine_input=combine_input)
        ref = dense_reference(xs[me], ids[me], weights[me], experts)
        stats.append({"call": call, "path": d.last_path, **check_accuracy(f"call {call}", dtype_name, z, ref)})
    moe_ep_sglang.BUFFERS.close()
    return stats
