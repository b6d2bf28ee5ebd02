"""The dispatch/combine contract as data: a Buffer set-up, calls on it, and the function that runs
a call on every rank and checks every output against ``moe_ep.reference``.

Importable by rank processes (like ep_cases). The randomized test (test_fuzz.py) draws ``Case``
values with hypothesis; the full-capacity and repeatability tests (test_stability.py) write them
out. A case names everything its inputs come from (a seed, the token counts, the routing), so
every rank regenerates every rank's inputs, runs the reference for the whole group and checks
its own outputs alone; a failing case prints as a value that reproduces it.

Checks never stop a rank halfway (a rank that skipped a collective call would leave its peers
waiting): ``run_call`` records each failed check and goes on, and the caller asserts on the list.

Variants: a call's ``variant`` says how it is made and read back: the flat layout, or the expert
layout (``layout="expert"``: checked against ``reference.dispatch_expert`` / ``combine_expert``)
with or without receive hooks, a weighted or unweighted combine, alone or as micro-batch A of two
in flight (the case's next call is B: dispatch A, dispatch B, hooks, combine A, combine B, hooks).
Every variant is a value in ``VARIANTS``, run by ``run_variant``; inputs and their reference stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import moe_ep
import expert_cases
from ep_cases import (check_dispatch, check_part_rows, check_untouched, expert_outputs, fuzz_routing, poison_rows,
                      poisoned_dispatch_output, unaligned)
from moe_ep import reference
from rank_checks import assert_equal


@dataclass(frozen=True)
class Setup:
    """One Buffer: ``EpConfig`` for ``world_size`` ranks (nodes of ``gpus_per_node`` below it take
    the inter-node path)."""

    world_size: int
    hidden: int
    experts_per_rank: int
    topk: int
    max_tokens_per_rank: int
    dtype: str = "bfloat16"  # "bfloat16", "float8_e4m3fn" or "float8_e4m3fnuz"
    mode: str = "ll"  # "ll", "ht" or "auto"
    gpus_per_node: int | None = None
    inter_transport: str = "auto"
    crossover_tokens: int | None = None  # mode "auto": LL up to this shared token count
    ht_parts: int | None = None
    timeout_s: float = 60.0
    layouts: tuple = ("flat",)  # EpConfig.layouts: "expert" among them for expert-layout calls (one node)
    expert_slots: int | None = None  # EpConfig.expert_slots (None: the worst case)

    @property
    def nodes(self) -> int:
        return self.world_size // (self.gpus_per_node or self.world_size)

    def config(self) -> moe_ep.EpConfig:
        extra = {}
        if self.nodes > 1:
            extra.update(gpus_per_node=self.gpus_per_node, inter_transport=self.inter_transport)
        if self.crossover_tokens is not None:
            extra["crossover_tokens"] = self.crossover_tokens
        if self.ht_parts is not None:
            extra["ht_parts"] = self.ht_parts
        return moe_ep.EpConfig(hidden=self.hidden, num_experts=self.experts_per_rank * self.world_size,
                               topk=self.topk, max_tokens_per_rank=self.max_tokens_per_rank,
                               dispatch_dtype=getattr(torch, self.dtype), mode=self.mode, timeout_s=self.timeout_s,
                               layouts=self.layouts, expert_slots=self.expert_slots, **extra)

    def path(self, hint: int | None, layout: str = "flat") -> str:
        """The path a call with ``num_tokens_hint=hint`` in ``layout`` must take."""
        if layout == "expert":
            return "expert"
        cfg = self.config()
        ll = cfg.mode == "ll" or (cfg.mode == "auto" and min(hint or cfg.max_tokens_per_rank,
                                                              cfg.max_tokens_per_rank) <= cfg.ll_tokens)
        if self.nodes > 1:
            return "inter" if ll else "inter_ht"
        return "ll" if ll else "ht"


@dataclass(frozen=True)
class Variant:
    """How a call is made and read back."""

    layout: str = "flat"  # "flat": [capacity, hidden] rows in (source rank, token) order; "expert"
    recv_hook: bool = False  # expert layout: dispatch/combine return a hook that completes the receive
    weighted: bool = False  # expert layout: combine(..., weighted=True)
    two_in_flight: bool = False  # expert layout: this call is micro-batch A, the case's next call B


VARIANTS = (Variant(),) + tuple(Variant("expert", hook, weighted, two) for hook in (False, True)
                                for weighted in (False, True) for two in (False, True))


@dataclass(frozen=True)
class Call:
    """One dispatch + combine pair: its inputs on every rank and how each rank makes it."""

    seed: int
    tokens: tuple  # tokens of each rank, each at most hint (or max_tokens_per_rank)
    routing: str = "uniform"  # one of ep_cases.FUZZ_ROUTINGS
    target: int = 0  # routing "one_rank": the rank every token goes to
    masked: bool = False  # some slots -1, some tokens without an expert
    hint: int | None = None  # num_tokens_hint, the same on every rank
    # Per rank: "fresh", "out" (poisoned outputs passed as out=; the expert layout: the combine's) or
    # "zero_copy" (flat layout only)
    outputs: tuple = ()
    ids_int32: bool = False  # topk_ids as int32 (else int64)
    prequantized: bool = False  # fp8: x passed as (fp8 rows, scales)
    unaligned: bool = False  # the payload one element past a 16-byte boundary
    magnitude: int = 0  # x scaled by 2**magnitude: -133 puts every value in bf16's subnormal range
    variant: Variant = field(default_factory=Variant)


@dataclass(frozen=True)
class Case:
    setup: Setup
    calls: tuple


def call_inputs(setup: Setup, call: Call):
    """Every rank's (x, topk_ids, topk_weights) of ``call``, from its seed."""
    gen = torch.Generator().manual_seed(call.seed)
    num_experts = setup.experts_per_rank * setup.world_size
    xs = [(torch.randn(t, setup.hidden, generator=gen) * (1 + 3 * torch.rand(t, 1, generator=gen))
           * 2.0 ** call.magnitude).to(torch.bfloat16) for t in call.tokens]
    ids = [fuzz_routing(call.routing, t, num_experts, setup.topk, setup.world_size, gen, call.target, call.masked)
           for t in call.tokens]
    weights = [torch.rand(t, setup.topk, generator=gen) for t in call.tokens]
    if call.prequantized:
        xs = [reference.quantize_fp8(x, getattr(torch, setup.dtype)) for x in xs]
    return xs, ids, weights


@dataclass
class CallResult:
    """What one rank saw of one call."""

    path: str
    received: int  # rows this rank received (the reference's count; the expert layout: pairs)
    errors: list  # every failed check, as text
    outputs: dict | None = None  # with keep_outputs: the bytes of every output (valid rows)
    fullest: int = 0  # the expert layout: the most pairs one of this rank's experts received


def run_case(ctx, case: Case, keep_outputs: bool = False) -> list:
    """Every call of ``case`` on one new Buffer; returns this rank's ``CallResult`` per call."""
    buf = moe_ep.Buffer(ctx.group, case.setup.config())
    try:
        results = []
        for group in in_flight(case.calls):
            results += run_variant(ctx, buf, case.setup, group, keep_outputs)
        buf.check()
    finally:
        buf.close()
    return results


def in_flight(calls: tuple) -> list:
    """``calls`` grouped as they are made: alone, or micro-batches A and B (``two_in_flight``)."""
    groups, i = [], 0
    while i < len(calls):
        size = 2 if calls[i].variant.two_in_flight else 1
        group = calls[i:i + size]
        if size == 2 and (len(group) < 2 or group[1].variant.layout != "expert" or group[1].variant.two_in_flight
                          or group[1].variant.recv_hook != group[0].variant.recv_hook):
            raise ValueError(f"call {i} is micro-batch A of two in flight: the next call must be an expert-layout "
                             f"call with the same recv_hook, alone")
        groups.append(group)
        i += size
    return groups


def run_call(ctx, buf, setup: Setup, call: Call, keep_outputs: bool = False) -> CallResult:
    """Make ``call`` on ``buf`` (every rank calls this alike) and check this rank's outputs."""
    return run_variant(ctx, buf, setup, (call,), keep_outputs)[0]


def run_variant(ctx, buf, setup: Setup, calls: tuple, keep_outputs: bool = False) -> list:
    """Make ``calls`` (one, or micro-batches A and B in flight together) as their variant says;
    returns this rank's ``CallResult`` of each, every output checked against the reference."""
    if calls[0].variant.layout == "expert":
        results = _run_expert(ctx, buf, setup, calls, keep_outputs)
    else:
        results = [_run_flat(ctx, buf, setup, calls[0], keep_outputs)]
    for call, result in zip(calls, results):
        want = setup.path(call.hint, call.variant.layout)
        if result.path != want:
            result.errors.append(f"took the {result.path} path, expected {want}")
    return results


def _rank_inputs(ctx, setup: Setup, call: Call, xs, ids, weights) -> tuple:
    """This rank's (x, topk_ids, topk_weights) of ``call`` on its device, as the call passes them."""
    me = ctx.rank
    x = tuple(t.to(ctx.device) for t in xs[me]) if call.prequantized else xs[me].to(ctx.device)
    if call.unaligned:
        x = (unaligned(x[0]), x[1]) if call.prequantized else unaligned(x)
    topk_ids = (ids[me].int() if call.ids_int32 else ids[me]).to(ctx.device)
    return x, topk_ids, weights[me].to(ctx.device)


def _run_flat(ctx, buf, setup: Setup, call: Call, keep_outputs: bool) -> CallResult:
    """A flat-layout dispatch + combine; every output checked against ``reference.dispatch`` /
    ``combine``."""
    me, world = ctx.rank, ctx.world_size
    xs, ids, weights = call_inputs(setup, call)
    expected = reference.dispatch(xs, ids, weights, buf.cfg.num_experts, buf.cfg.dispatch_dtype)
    y_rows = expert_outputs(expected[me], me)
    tokens = [len(i) for i in ids]
    z_expected = reference.combine([expert_outputs(expected[r], r) for r in range(world)], expected, tokens,
                                   setup.gpus_per_node if setup.nodes > 1 else None)[me]
    inputs = _rank_inputs(ctx, setup, call, xs, ids, weights)
    how = call.outputs[me] if call.outputs else "fresh"
    errors: list = []
    out = buf.dispatch(*inputs, out=poisoned_dispatch_output(buf) if how == "out" else None,
                       num_tokens_hint=call.hint, zero_copy=how == "zero_copy")
    path, mine = out.handle.path, expected[me]
    _check(errors, "dispatch", check_dispatch, out, mine, buf.capacity)
    if path == "ht":
        _check(errors, "dispatch", check_part_rows, out, mine, tokens, buf.cfg.ht_parts)
    if how == "out":
        _check(errors, "dispatch", check_untouched, out, mine.num_tokens)
    y = torch.full((buf.capacity, buf.cfg.hidden), float("nan"), dtype=torch.bfloat16)
    y[:mine.num_tokens] = y_rows  # rows past num_tokens stay NaN: combine must never read them
    z_out = torch.full((tokens[me], buf.cfg.hidden), float("nan"), dtype=torch.bfloat16,
                       device=ctx.device) if how == "out" else None
    z = buf.combine(y.to(ctx.device), out.handle, out=z_out)
    _check(errors, "combine", assert_equal, "combine", z_expected, z.cpu())
    kept = output_bytes(out, mine.num_tokens, z) if keep_outputs else None
    if how == "zero_copy":  # the next call must rewrite every row it returns (receive regions included)
        poison_rows(out)
    return CallResult(path, mine.num_tokens, errors, kept)


class _ExpertRun:
    """One expert-layout call on this rank: its inputs, and what ``reference.dispatch_expert`` /
    ``combine_expert`` say its outputs must be."""

    def __init__(self, ctx, buf, setup: Setup, call: Call):
        me, cfg = ctx.rank, buf.cfg
        self.call, self.hook = call, call.variant.recv_hook
        xs, ids, weights = call_inputs(setup, call)
        expected = reference.dispatch_expert(xs, ids, weights, cfg.num_experts, cfg.dispatch_dtype)
        ys = [expert_cases.stand_in_outputs(received, d) for d, received in enumerate(expected)]
        self.expected = expected[me]
        self.inputs = _rank_inputs(ctx, setup, call, xs, ids, weights)
        self.y = expert_cases.expert_major(ys[me], self.expected.tokens_per_expert, cfg.slots(ctx.world_size),
                                           cfg.hidden).to(ctx.device)  # rows past each count NaN: never read
        self.z_expected = reference.combine_expert(ys, expected, ids, weights, call.variant.weighted)[me]
        self.how = call.outputs[me] if call.outputs else "fresh"
        self.z_out = torch.full((len(ids[me]), cfg.hidden), float("nan"), dtype=torch.bfloat16, device=ctx.device) \
            if self.how == "out" else None
        self.errors: list = []

    def dispatch(self, buf):
        """The dispatch: ``(output, hook)`` (hook None without recv_hook)."""
        made = buf.dispatch(*self.inputs, num_tokens_hint=self.call.hint, layout="expert",
                            return_recv_hook=self.hook)
        return made if self.hook else (made, None)

    def combine(self, buf, out):
        made = buf.combine(self.y, out.handle, out=self.z_out, weighted=self.call.variant.weighted,
                           return_recv_hook=self.hook)
        return made if self.hook else (made, None)


def _run_expert(ctx, buf, setup: Setup, calls: tuple, keep_outputs: bool) -> list:
    """Expert-layout calls in flight together (one, or micro-batches A and B): dispatch each, run
    the hooks (with other work before them), check every row of every expert, combine each, run the
    hooks, check the combines; then poison the outputs (the call that reuses their half must
    rewrite every valid row, and may write none past a count: checked from its third call on)."""
    runs = [_ExpertRun(ctx, buf, setup, call) for call in calls]
    made = [run.dispatch(buf) for run in runs]
    if runs[0].hook:
        torch.randn(64, 64, device=ctx.device).cumsum(0)  # other work while the sends are in flight
        for _, hook in made:
            hook()
    outs = [out for out, _ in made]
    for run, out in zip(runs, outs):
        _check(run.errors, "dispatch", expert_cases.check_expert_dispatch, out, run.expected, "")
        if out.handle.call >= 2:  # its half was poisoned after the call before the last
            _check(run.errors, "dispatch", expert_cases.check_expert_untouched, out, run.expected.tokens_per_expert)
    made = [run.combine(buf, out) for run, out in zip(runs, outs)]
    if runs[0].hook:
        for _, hook in made:
            hook()
    results = []
    for run, out, (z, _) in zip(runs, outs, made):
        _check(run.errors, "combine", assert_equal, "combine", run.z_expected, z.cpu())
        kept = expert_cases.output_bytes(out, run.expected.tokens_per_expert, z) if keep_outputs else None
        counts = run.expected.tokens_per_expert
        results.append(CallResult(out.handle.path, int(counts.sum()), run.errors, kept, int(counts.max())))
    for out in outs:
        expert_cases.poison(out)
    return results


def output_bytes(out: moe_ep.DispatchOutput, rows: int, z: torch.Tensor) -> dict:
    """CPU copies of every output of a call: the valid rows of each dispatch output, the counts,
    the handle's tensors combine reads, and the combine's result."""
    tensors = {"x": out.x[:rows], "x_scales": out.x_scales[:rows] if out.x_scales is not None else None,
               "topk_ids": out.topk_ids[:rows], "topk_weights": out.topk_weights[:rows], "src": out.src[:rows],
               "num_tokens": out.num_tokens, "tokens_per_expert": out.tokens_per_expert,
               "send_mask": out.handle.send_mask[:out.handle.num_tokens],
               "part_rows": out.handle.part_rows if out.handle.path == "ht" else None,
               "forwarded_count": out.handle.forwarded_count, "combine": z}
    return {name: t.cpu().contiguous().reshape(-1).view(torch.uint8).clone() for name, t in tensors.items()
            if t is not None}


def _check(errors: list, what: str, check, *args) -> None:
    try:
        check(*args)
    except AssertionError as err:
        errors.append(f"{what}: {err}")
