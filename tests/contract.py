"""The dispatch/combine contract as data: a Buffer set-up, calls on it, and the function that runs
a call on every rank and checks every output against ``moe_ep.reference``.

Importable by rank processes (like ep_cases). The randomized test (test_fuzz.py) draws ``Case``
values with hypothesis; the full-capacity and repeatability tests (test_stability.py) write them
out. A case names everything its inputs come from (a seed, the token counts, the routing), so
every rank regenerates every rank's inputs, runs the reference for the whole group and checks
its own outputs alone; a failing case prints as a value that reproduces it.

Checks never stop a rank halfway (a rank that skipped a collective call would leave its peers
waiting): ``run_call`` records each failed check and goes on, and the caller asserts on the list.

Variants: a call's ``variant`` says how it is made and read back; today the flat layout without
receive hooks. Another (``layout="expert"``, ``recv_hook=True``) is one more value in
``VARIANTS`` and its branch in ``run_variant``; inputs, reference and checks of the rows stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import moe_ep
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
    dtype: str = "bfloat16"  # "bfloat16" or "float8_e4m3fn"
    mode: str = "ll"  # "ll", "ht" or "auto"
    gpus_per_node: int | None = None
    inter_transport: str = "auto"
    crossover_tokens: int | None = None  # mode "auto": LL up to this shared token count
    ht_parts: int | None = None
    timeout_s: float = 60.0

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
                               **extra)

    def path(self, hint: int | None) -> str:
        """The path a call with ``num_tokens_hint=hint`` must take."""
        cfg = self.config()
        ll = cfg.mode == "ll" or (cfg.mode == "auto" and min(hint or cfg.max_tokens_per_rank,
                                                              cfg.max_tokens_per_rank) <= cfg.ll_tokens)
        if self.nodes > 1:
            return "inter" if ll else "inter_ht"
        return "ll" if ll else "ht"


@dataclass(frozen=True)
class Variant:
    """How a call is made and read back."""

    layout: str = "flat"  # "flat": [capacity, hidden] rows in (source rank, token) order
    recv_hook: bool = False  # dispatch/combine return a hook that completes the receive


VARIANTS = (Variant(),)


@dataclass(frozen=True)
class Call:
    """One dispatch + combine pair: its inputs on every rank and how each rank makes it."""

    seed: int
    tokens: tuple  # tokens of each rank, each at most hint (or max_tokens_per_rank)
    routing: str = "uniform"  # one of ep_cases.FUZZ_ROUTINGS
    target: int = 0  # routing "one_rank": the rank every token goes to
    masked: bool = False  # some slots -1, some tokens without an expert
    hint: int | None = None  # num_tokens_hint, the same on every rank
    outputs: tuple = ()  # per rank: "fresh", "out" (poisoned outputs passed as out=) or "zero_copy"
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
    received: int  # rows this rank received (the reference's count)
    errors: list  # every failed check, as text
    outputs: dict | None = None  # with keep_outputs: the bytes of every output (valid rows)


def run_case(ctx, case: Case, keep_outputs: bool = False) -> list:
    """Every call of ``case`` on one new Buffer; returns this rank's ``CallResult`` per call."""
    buf = moe_ep.Buffer(ctx.group, case.setup.config())
    try:
        results = [run_call(ctx, buf, case.setup, call, keep_outputs) for call in case.calls]
        buf.check()
    finally:
        buf.close()
    return results


def run_call(ctx, buf, setup: Setup, call: Call, keep_outputs: bool = False) -> CallResult:
    """Make ``call`` on ``buf`` (every rank calls this alike) and check this rank's outputs."""
    me, world = ctx.rank, ctx.world_size
    xs, ids, weights = call_inputs(setup, call)
    expected = reference.dispatch(xs, ids, weights, buf.cfg.num_experts, buf.cfg.dispatch_dtype)
    ys = [expert_outputs(expected[r], r) for r in range(world)]
    tokens = [len(i) for i in ids]
    z_expected = reference.combine(ys, expected, tokens, setup.gpus_per_node if setup.nodes > 1 else None)[me]
    x = tuple(t.to(ctx.device) for t in xs[me]) if call.prequantized else xs[me].to(ctx.device)
    if call.unaligned:
        x = (unaligned(x[0]), x[1]) if call.prequantized else unaligned(x)
    topk_ids = (ids[me].int() if call.ids_int32 else ids[me]).to(ctx.device)
    inputs = (x, topk_ids, weights[me].to(ctx.device))
    result = run_variant(ctx, buf, call, inputs, expected, tokens, ys[me], z_expected, keep_outputs)
    if result.path != setup.path(call.hint):
        result.errors.append(f"took the {result.path} path, expected {setup.path(call.hint)}")
    return result


def run_variant(ctx, buf, call: Call, inputs, expected: list, tokens: list, y_rows: torch.Tensor,
                z_expected: torch.Tensor, keep_outputs: bool) -> CallResult:
    """Dispatch ``inputs`` and combine ``y_rows`` (this rank's expert outputs, one per received
    row) as ``call.variant`` says; every output checked against the reference (``expected``: every
    rank's ``RankDispatch``; ``z_expected``: this rank's combine)."""
    if call.variant != Variant():
        raise NotImplementedError(f"no runner for {call.variant} yet")
    me = ctx.rank
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
