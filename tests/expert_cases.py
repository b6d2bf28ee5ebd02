"""The expert layout's calls and checks, importable by rank processes (see tests/test_expert.py).

Every rank draws every rank's inputs from one seed, runs ``moe_ep.reference.dispatch_expert`` /
``combine_expert`` for the whole group and checks its own outputs alone, bit for bit.
"""

from __future__ import annotations

import torch

import moe_ep
from ep_cases import make_inputs
from moe_ep import reference
from rank_checks import assert_equal

POISON_INT = -7777


def expert_config(ctx, shape, dtype_name: str, expert_slots: int | None = None, **extra) -> moe_ep.EpConfig:
    return moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * ctx.world_size,
                           topk=shape.topk, max_tokens_per_rank=shape.max_tokens_per_rank,
                           dispatch_dtype=getattr(torch, dtype_name), mode="ll", layouts=("flat", "expert"),
                           expert_slots=expert_slots, **extra)


def expert_inputs(call: int, kind: str, shape, world: int, seed: int):
    """Every rank's (x, topk_ids, topk_weights) for ``kind``: those of ``make_inputs`` (one rank sends
    nothing, one its maximum), or "full_expert": every token of every rank names global expert 0,
    every rank sending max_tokens_per_rank (expert 0 gets max_tokens_per_rank * world pairs, the
    default slots), or "duplicates": some tokens name one expert twice."""
    gen = torch.Generator().manual_seed(seed * 31 + call)
    if kind == "full_expert":
        tokens, num_experts = shape.max_tokens_per_rank, shape.num_experts_per_rank * world
        xs = [torch.randn(tokens, shape.hidden, generator=gen).to(torch.bfloat16) for _ in range(world)]
        ids = [torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64),
                                       1 + torch.randperm(num_experts - 1, generator=gen)[:shape.topk - 1]])
                            for _ in range(tokens)]) for _ in range(world)]
        weights = [torch.rand(tokens, shape.topk, generator=gen) for _ in range(world)]
        return xs, ids, weights
    xs, ids, weights = make_inputs(call, "uniform" if kind == "duplicates" else kind, shape, world, seed)
    if kind == "duplicates":
        for rank_ids in ids:
            if len(rank_ids) and shape.topk > 1:
                twice = torch.rand(len(rank_ids), generator=gen) < 0.5
                rank_ids[twice, 1] = rank_ids[twice, 0]
    return xs, ids, weights


class ExpertCall:
    """One call's inputs on this rank and what the reference says every output must be."""

    def __init__(self, ctx, buf: moe_ep.Buffer, call: int, kind: str, shape, seed: int, prequantized: bool = False,
                 weighted: bool = True):
        world, me = ctx.world_size, ctx.rank
        cfg = buf.cfg
        xs, ids, weights = expert_inputs(call, kind, shape, world, seed)
        if prequantized:
            xs = [reference.quantize_fp8(x, cfg.dispatch_dtype) for x in xs]
        self.name = f"call {call} ({kind})"
        self.x = tuple(t.to(ctx.device) for t in xs[me]) if prequantized else xs[me].to(ctx.device)
        self.ids = (ids[me] if call % 2 else ids[me].int()).to(ctx.device)
        self.weights = weights[me].to(ctx.device)
        expected = reference.dispatch_expert(xs, ids, weights, cfg.num_experts, cfg.dispatch_dtype)
        self.expected = expected[me]
        # Stand-in experts: the row's dequantised values times (rank + 1) * (expert + 1).
        ys = []
        for d, received in enumerate(expected):
            x = received.x.float() if received.x_scales is None else reference.dequantize_fp8(received.x,
                                                                                            received.x_scales)
            scale = torch.repeat_interleave(torch.arange(1, len(received.tokens_per_expert) + 1, dtype=torch.float32),
                                            received.tokens_per_expert.long())
            ys.append((x * (d + 1) * scale[:, None]).to(torch.bfloat16))
        slots = cfg.slots(world)
        y = torch.full((buf.experts_per_rank, slots, cfg.hidden), float("nan"), dtype=torch.bfloat16)
        for e in range(buf.experts_per_rank):  # rows past each expert's count stay NaN: never read
            rows = ys[me][self.expected.rows(e)][:slots]  # (a call that overflows the slots is an error)
            y[e, :len(rows)] = rows
        self.y = y.to(ctx.device)
        self.weighted = weighted
        self.z_expected = reference.combine_expert(ys, expected, ids, weights, weighted)[me]

    def dispatch(self, buf, hook: bool = False):
        return buf.dispatch(self.x, self.ids, self.weights, layout="expert", return_recv_hook=hook)

    def check_dispatch(self, out: moe_ep.ExpertDispatchOutput) -> int:
        """Every valid row of every expert bit-exact; returns the rows received."""
        exp = self.expected
        assert_equal(f"tokens_per_expert of {self.name}", exp.tokens_per_expert, out.tokens_per_expert.cpu())
        for e in range(len(exp.tokens_per_expert)):
            n, rows = int(exp.tokens_per_expert[e]), exp.rows(e)
            assert_equal(f"x of expert {e}, {self.name}", exp.x[rows].view(torch.uint8),
                         out.x[e, :n].cpu().view(torch.uint8))
            if exp.x_scales is not None:
                assert_equal(f"x_scales of expert {e}, {self.name}", exp.x_scales[rows], out.x_scales[e, :n].cpu())
            assert_equal(f"src of expert {e}, {self.name}", exp.src[rows], out.src[e, :n].cpu())
            assert_equal(f"topk_weights of expert {e}, {self.name}", exp.topk_weights[rows],
                         out.topk_weights[e, :n].cpu())
        return int(exp.tokens_per_expert.sum())

    def combine(self, buf, handle, hook: bool = False):
        return buf.combine(self.y, handle, weighted=self.weighted, return_recv_hook=hook)

    def check_combine(self, z) -> None:
        assert_equal(f"combine of {self.name}", self.z_expected, z.cpu())


def poison(out: moe_ep.ExpertDispatchOutput) -> None:
    """The output views set to values no dispatch writes: the call that reuses them must rewrite
    every valid row."""
    out.x.view(torch.uint8).fill_(0xFF)
    if out.x_scales is not None:
        out.x_scales.fill_(float("nan"))
    out.topk_weights.fill_(float("nan"))
    out.src.fill_(POISON_INT)
    out.tokens_per_expert.fill_(POISON_INT)


def run_expert_calls(ctx, shape, dtype_name: str, kind: str, calls: int, hooks: bool = False,
                     prequantized: bool = False, seed: int = 0) -> int:
    """``calls`` dispatch + combine pairs in the expert layout on one Buffer (weighted and
    unweighted combines in turn, int32 and int64 ids in turn), outputs poisoned after use, every
    row checked; with ``hooks`` every call returns at once and real work runs before the hook.
    Returns the pairs this rank received."""
    buf = moe_ep.Buffer(ctx.group, expert_config(ctx, shape, dtype_name))
    received = 0
    try:
        for call in range(calls):
            c = ExpertCall(ctx, buf, call, kind, shape, seed, prequantized, weighted=call % 2 == 0)
            if hooks:
                out, hook = c.dispatch(buf, hook=True)
                busy = torch.randn(64, 64, device=ctx.device) @ torch.randn(64, 64, device=ctx.device)
                hook()
                assert torch.isfinite(busy).all()
            else:
                out = c.dispatch(buf)
            received += c.check_dispatch(out)
            if hooks:
                z, hook = c.combine(buf, out.handle, hook=True)
                hook()
            else:
                z = c.combine(buf, out.handle)
            c.check_combine(z)
            poison(out)
        buf.check()
    finally:
        buf.close()
    return received


def run_two_micro_batches(ctx, shape, dtype_name: str, rounds: int, seed: int = 5) -> bool:
    """Two-batch overlap: dispatch A, dispatch B (hooks), work, hook A, hook B, combine A, combine
    B (hooks), hook A, hook B; ``rounds`` times on one Buffer, every output checked."""
    buf = moe_ep.Buffer(ctx.group, expert_config(ctx, shape, dtype_name))
    try:
        for r in range(rounds):
            a = ExpertCall(ctx, buf, 2 * r, "uniform", shape, seed)
            b = ExpertCall(ctx, buf, 2 * r + 1, "masked", shape, seed, weighted=False)
            out_a, hook_a = a.dispatch(buf, hook=True)
            out_b, hook_b = b.dispatch(buf, hook=True)
            torch.randn(32, 32, device=ctx.device).cumsum(0)
            hook_a()
            hook_b()
            a.check_dispatch(out_a)  # B's dispatch left A's rows alone
            b.check_dispatch(out_b)
            z_a, hook_a = a.combine(buf, out_a.handle, hook=True)
            z_b, hook_b = b.combine(buf, out_b.handle, hook=True)
            hook_a()
            hook_b()
            a.check_combine(z_a)
            b.check_combine(z_b)
            poison(out_a)
            poison(out_b)
        buf.check()
    finally:
        buf.close()
    return True
