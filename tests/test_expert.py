"""The expert-major layout (dispatch(..., layout="expert"), weighted combine, receive hooks)
against moe_ep.reference, on real rank processes (CPU at worlds 2, 3 and 4, and -m gpu)."""

import dataclasses

import pytest
import torch

from ep_cases import CPU_SHAPE, GPU_SHAPE
from expert_cases import ExpertCall, expert_config, poison, run_expert_calls, run_two_micro_batches

CASES = [
    # dtype, routing, hooks, prequantized
    pytest.param("float8_e4m3fn", "uniform", False, False, id="fp8-uniform"),
    pytest.param("bfloat16", "masked", True, False, id="bf16-masked-ids-hooks"),
    pytest.param("float8_e4m3fn", "duplicates", True, True, id="fp8-prequantized-duplicate-ids-hooks"),
    pytest.param("bfloat16", "full_expert", False, False, id="bf16-full-expert"),
    pytest.param("float8_e4m3fn", "to_rank0", False, False, id="fp8-others-receive-nothing"),
    pytest.param("float8_e4m3fnuz", "masked", True, False, id="fnuz-masked-ids-hooks"),
]


@pytest.mark.parametrize("dtype, kind, hooks, prequantized", CASES)
def test_expert_layout_matches_reference(ranks_odd, dtype, kind, hooks, prequantized):
    """Three dispatch + combine pairs on one Buffer (a rank sending nothing and one its maximum,
    weighted and unweighted combines, int32 and int64 ids), every row of every expert bit-exact,
    outputs poisoned between uses."""
    shape = CPU_SHAPE if ranks_odd.device == "cpu" else GPU_SHAPE
    received = ranks_odd.run(run_expert_calls, shape, dtype, kind, 3, hooks, prequantized)
    if kind == "to_rank0":
        assert received[0] > 0 and not any(received[1:]), received
    else:
        assert all(r > 0 for r in received), received


def test_two_micro_batches_in_flight(ranks):
    """Dispatch A, dispatch B, hooks, combine A, combine B, hooks: twice on one Buffer."""
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(run_two_micro_batches, shape, "float8_e4m3fn", 2))


def _overflow_then_good_call(ctx, shape):
    """Every token of every rank names expert 0 and one more: with expert_slots = half of that, the
    call records the overflow on every rank (BadCallError at the next check, no row written past
    the slots), and the Buffer stays usable: a call that fits is right afterwards."""
    import moe_ep

    buf = moe_ep.Buffer(ctx.group, expert_config(ctx, shape, "bfloat16",
                                                 expert_slots=shape.max_tokens_per_rank * ctx.world_size // 2))
    try:
        full = ExpertCall(ctx, buf, 0, "full_expert", shape, seed=1)
        pairs = shape.max_tokens_per_rank * ctx.world_size
        with pytest.raises(moe_ep.BadCallError, match=f"expert 0 got {pairs} .* pairs, more than the {pairs // 2} slots"):
            full.dispatch(buf)  # CPU ranks: raised here; GPUs: at the check
            buf.check()
        buf.check()  # raised once
        fits = ExpertCall(ctx, buf, 1, "uniform", shape, seed=1)
        out = fits.dispatch(buf)
        fits.check_dispatch(out)
        fits.check_combine(fits.combine(buf, out.handle))
        buf.check()
    finally:
        buf.close()
    return True


def test_overflowing_an_expert_is_an_error_on_every_rank(ranks):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_overflow_then_good_call, shape))


def _misuse_is_refused(ctx, shape):
    """Calls the expert layout cannot serve are refused before any launch, and the Buffer stays usable."""
    import moe_ep

    cfg = expert_config(ctx, shape, "float8_e4m3fn")
    buf = moe_ep.Buffer(ctx.group, cfg)
    flat_only = moe_ep.Buffer(ctx.group, dataclasses.replace(cfg, layouts=("flat",)))
    try:
        c = ExpertCall(ctx, buf, 0, "uniform", shape, seed=2)
        slots = buf.cfg.slots(ctx.world_size)
        with pytest.raises(ValueError, match="layout 'expert' is not among"):
            flat_only.dispatch(c.x, c.ids, c.weights, layout="expert")
        with pytest.raises(ValueError, match="no out and no zero_copy"):
            buf.dispatch(c.x, c.ids, c.weights, layout="expert", zero_copy=True)
        with pytest.raises(ValueError, match="return_recv_hook needs layout='expert'"):
            buf.dispatch(c.x, c.ids, c.weights, return_recv_hook=True)
        with pytest.raises(ValueError, match="more than the expert layout takes"):
            buf.dispatch(torch.zeros(shape.max_tokens_per_rank + 1, shape.hidden, dtype=torch.bfloat16,
                                     device=ctx.device),
                         torch.zeros(shape.max_tokens_per_rank + 1, shape.topk, dtype=torch.int64, device=ctx.device),
                         torch.zeros(shape.max_tokens_per_rank + 1, shape.topk, device=ctx.device), layout="expert")
        out, hook = c.dispatch(buf, hook=True)
        with pytest.raises(RuntimeError, match="before the dispatch's receive hook ran"):
            c.combine(buf, out.handle)
        hook()
        with pytest.raises(RuntimeError, match="already called"):
            hook()
        c.check_dispatch(out)
        with pytest.raises(ValueError, match="y must have shape"):
            buf.combine(torch.zeros(buf.experts_per_rank, slots + 1, shape.hidden, dtype=torch.bfloat16,
                                    device=ctx.device), out.handle)
        flat = buf.dispatch(c.x, c.ids, c.weights)
        with pytest.raises(ValueError, match="weighted and return_recv_hook combine the expert layout"):
            buf.combine(torch.zeros(buf.capacity, shape.hidden, dtype=torch.bfloat16, device=ctx.device),
                        flat.handle, weighted=True)
        buf.combine(torch.zeros(buf.capacity, shape.hidden, dtype=torch.bfloat16, device=ctx.device), flat.handle)
        c.check_combine(c.combine(buf, out.handle))
        # A handle whose half two later dispatches reused is stale.
        a, b = (ExpertCall(ctx, buf, i, "uniform", shape, seed=2) for i in (1, 2))
        out_a, out_b = a.dispatch(buf), b.dispatch(buf)
        with pytest.raises(ValueError, match="stale handle"):
            c.combine(buf, out.handle)
        a.check_dispatch(out_a)
        b.check_dispatch(out_b)
        poison(out_a)
        # A hook left uncalled blocks the dispatch after next (its half would be reused under it).
        out_a, hook = a.dispatch(buf, hook=True)
        b.dispatch(buf)
        with pytest.raises(RuntimeError, match="has not run"):
            b.dispatch(buf)
        hook()
        a.check_dispatch(out_a)
        last = ExpertCall(ctx, buf, 3, "masked", shape, seed=2)
        out = last.dispatch(buf)
        last.check_dispatch(out)
        last.check_combine(last.combine(buf, out.handle))
        buf.check()
    finally:
        buf.close()
        flat_only.close()
    return True


def test_misuse_is_refused_and_buffer_stays_usable(ranks):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_misuse_is_refused, shape))
