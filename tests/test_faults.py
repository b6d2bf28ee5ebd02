"""Faults and unusual call orders: a rank that stops calling, bad input, handles in flight.

(A rank killed with SIGKILL leaving no shared memory is tested in test_transport.py; one killed in
the middle of a dispatch or combine in test_peer_death.py.)
"""

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist

from ep_cases import CPU_SHAPE, GPU_SHAPE, check_dispatch, expert_outputs, make_inputs, poisoned_dispatch_output
from moe_ep.testing import run_ranks
from rank_checks import assert_equal

TIMEOUT_S = 2.0


def _buffer(ctx, shape, dtype_name: str, timeout_s: float = 60.0, check_inputs: bool = False, **extra):
    import moe_ep

    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * ctx.world_size,
                          topk=shape.topk, max_tokens_per_rank=shape.max_tokens_per_rank,
                          dispatch_dtype=getattr(torch, dtype_name), timeout_s=timeout_s, **extra)
    return moe_ep.Buffer(ctx.group, cfg, check_inputs=check_inputs)


class _Call:
    """One call's inputs on this rank and what the reference says every output must be.
    With ``hint``, every rank sends at most ``hint`` tokens and passes it as num_tokens_hint."""

    def __init__(self, ctx, buf, call: int, kind: str, shape, seed: int, hint: int | None = None):
        from moe_ep import reference

        me, world = ctx.rank, ctx.world_size
        self.hint = hint
        if hint is not None:
            shape = dataclasses.replace(shape, max_tokens_per_rank=hint)
        xs, ids, weights = make_inputs(call, kind, shape, world, seed)
        self.name = f"call {call} ({kind})"
        self.x, self.ids, self.weights = xs[me].to(ctx.device), ids[me].to(ctx.device), weights[me].to(ctx.device)
        expected = reference.dispatch(xs, ids, weights, buf.cfg.num_experts, buf.cfg.dispatch_dtype)
        self.expected = expected[me]
        ys = [expert_outputs(expected[r], r) for r in range(world)]
        self.y = torch.full((buf.capacity, shape.hidden), float("nan"), dtype=torch.bfloat16)
        self.y[:self.expected.num_tokens] = ys[me]  # rows past num_tokens stay NaN: never read
        self.y = self.y.to(ctx.device)
        self.z_expected = reference.combine(ys, expected, [len(i) for i in ids])[me]
        self.capacity = buf.capacity

    def dispatch(self, buf):
        return buf.dispatch(self.x, self.ids, self.weights, out=poisoned_dispatch_output(buf),
                            num_tokens_hint=self.hint)

    def check_dispatch(self, out) -> None:
        check_dispatch(out, self.expected, self.capacity)

    def check_combine(self, z) -> None:
        assert_equal(f"combine of {self.name}", self.z_expected, z.cpu())


# -- (a) a rank that stops calling ----------------------------------------------------------------

def _one_rank_stops(ctx, absent: int, op: str, timeout_s: float):
    """Two good calls, then rank ``absent`` stops calling ``op`` and sits in a host barrier until
    the others have given up; returns (error or None, seconds to the error, refused afterwards)."""
    import moe_ep

    shape = CPU_SHAPE if ctx.device.type == "cpu" else GPU_SHAPE
    buf = _buffer(ctx, shape, "bfloat16", timeout_s)
    outcome = None
    try:
        for call in range(2):
            c = _Call(ctx, buf, call, "uniform", shape, seed=3)
            out = c.dispatch(buf)
            c.check_dispatch(out)
            c.check_combine(buf.combine(c.y, out.handle))
        last = _Call(ctx, buf, 2, "uniform", shape, seed=3)
        if op == "combine":  # every rank dispatches; the absent rank then skips the combine
            out = last.dispatch(buf)
            last.check_dispatch(out)
        if ctx.rank == absent:
            dist.barrier(group=ctx.group)  # released once every other rank has given up
            return None
        start = time.monotonic()
        try:
            if op == "dispatch":
                last.dispatch(buf)
            else:
                buf.combine(last.y, out.handle)
            buf.check()  # GPUs: the error shows here (or at the next call)
        except moe_ep.PeerTimeoutError as err:
            outcome = err
        elapsed = time.monotonic() - start
        try:
            last.dispatch(buf)
            refused = False
        except moe_ep.PeerTimeoutError:
            refused = True
        dist.barrier(group=ctx.group)
        return (outcome.peer, outcome.phase, str(outcome)) if outcome else None, elapsed, refused
    finally:
        buf.close()


def _stop_params():
    # Every case pays a fresh group and a timeout (10-20 s on 2 CPU cores): CPU ranks run the
    # dispatch case at both sizes and the combine case at 2 ranks; GPUs run all four.
    cpu = [("cpu", 2, "dispatch"), ("cpu", 4, "dispatch"), ("cpu", 2, "combine")]
    gpu = [pytest.param("cuda", w, op, marks=pytest.mark.gpu) for w in (2, 4) for op in ("dispatch", "combine")]
    return cpu + gpu


@pytest.mark.parametrize("device, world_size, op", _stop_params())
def test_rank_that_stops_calling_is_named(device, world_size, op):
    """Every other rank raises PeerTimeoutError naming the missing rank, within a bounded time,
    and its Buffer refuses further calls (the ranks' epochs no longer agree)."""
    if device == "cuda" and torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    absent = world_size // 2  # a middle rank: ranks below and above it must both name it
    results = run_ranks(_one_rank_stops, world_size, absent, op, TIMEOUT_S, device=device, timeout=180)
    for rank, result in enumerate(results):
        if rank == absent:
            continue
        error, elapsed, refused = result
        assert error is not None, f"rank {rank}: {op} without rank {absent} raised nothing"
        peer, phase, message = error
        assert peer == absent and f"waiting for rank {absent}" in message, f"rank {rank}: {message}"
        assert op in phase, f"rank {rank}: timed out in {phase}, expected a {op} phase"
        # The wait is a poll count sized for timeout_s (moe_ep._platform.max_polls), so the time
        # is approximate: each CPU poll sleeps 1 ms or more (at least a quarter of timeout_s in
        # all), and a generous multiple bounds it from above on a loaded 2-core machine.
        assert elapsed < 15 * TIMEOUT_S, f"rank {rank} took {elapsed:.1f} s to give up ({op})"
        if device == "cpu":
            assert elapsed > 0.2 * TIMEOUT_S, f"rank {rank} gave up after {elapsed:.2f} s ({op})"
        assert refused, f"rank {rank}: the Buffer accepted a call after a timeout"


# -- (b) bad input leaves the Buffer correct ----------------------------------------------------

def _bad_input_then_correct(ctx, shape, dtype_name: str):
    """Refused calls launch nothing: afterwards (and in between) results match the reference.
    (Expert ids checked on the host: ``check_inputs``; the kernels' own check: test_bad_input.py.)"""
    buf = _buffer(ctx, shape, dtype_name, check_inputs=True)
    num_experts = buf.cfg.num_experts
    dev = ctx.device
    try:
        # Every rank makes the same bad calls, then a good pair.
        c = _Call(ctx, buf, 0, "uniform", shape, seed=11)
        bad_ids = c.ids.clone()
        if bad_ids.numel():
            bad_ids[-1, 0] = num_experts
        else:  # this rank sends no token: a one-token call with a bad id is refused all the same
            bad_ids = torch.full((1, shape.topk), num_experts, dtype=torch.int64, device=dev)
        one_x = torch.randn(bad_ids.shape[0], shape.hidden, device=dev).to(torch.bfloat16)
        one_w = torch.rand(bad_ids.shape[0], shape.topk, device=dev)
        with pytest.raises(ValueError, match="topk_ids must lie in"):
            buf.dispatch(c.x if c.ids.numel() else one_x, bad_ids, c.weights if c.ids.numel() else one_w)
        with pytest.raises(ValueError, match="topk_ids must lie in"):
            buf.dispatch(one_x, torch.full_like(bad_ids, -2), one_w)
        with pytest.raises(TypeError, match="x must be"):
            buf.dispatch(c.x.float(), c.ids, c.weights)
        out = c.dispatch(buf)
        c.check_dispatch(out)
        # A bad dispatch and a bad combine while that handle is in flight, then its combine.
        with pytest.raises(ValueError, match="topk_ids must lie in"):
            buf.dispatch(one_x, bad_ids, one_w)
        with pytest.raises(ValueError, match="y must have shape"):
            buf.combine(c.y[:1], out.handle)
        with pytest.raises(TypeError, match="y must be"):
            buf.combine(c.y.float(), out.handle)
        c.check_dispatch(out)
        c.check_combine(buf.combine(c.y, out.handle))
        # Only rank 0 is refused while the others already wait in the kernel for its rows; it
        # calls again with good input and every rank gets the right results.
        c = _Call(ctx, buf, 1, "masked", shape, seed=11)
        if ctx.rank == 0:
            with pytest.raises(ValueError, match="topk_ids must lie in"):
                buf.dispatch(one_x, bad_ids, one_w)
        out = c.dispatch(buf)
        c.check_dispatch(out)
        c.check_combine(buf.combine(c.y, out.handle))
        # And the next pair is right too.
        c = _Call(ctx, buf, 2, "skewed", shape, seed=11)
        out = c.dispatch(buf)
        c.check_dispatch(out)
        c.check_combine(buf.combine(c.y, out.handle))
        buf.check()
    finally:
        buf.close()
    return True


def test_bad_input_leaves_buffer_correct(ranks):
    """fp8 dispatch (the input checks do not depend on the dtype; fp8 has the most outputs)."""
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_bad_input_then_correct, shape, "float8_e4m3fn"))


# -- (c) two dispatch handles in flight ----------------------------------------------------------

def _two_micro_batches(ctx, shape, dtype_name: str, order: str, paths: tuple, rounds: int):
    """Dispatch A, dispatch B, then combine them in ``order``; ``rounds`` times on one Buffer.
    A and B differ in routing and token counts and take the ``paths`` ("ll" or "ht") given (mode
    "auto": "ll" sends at most crossover_tokens per rank, "ht" up to max_tokens_per_rank); both
    outputs are checked after both dispatches."""
    crossover = shape.max_tokens_per_rank // 2
    hints = {"ll": crossover, "ht": shape.max_tokens_per_rank}
    buf = _buffer(ctx, shape, dtype_name, mode="auto", crossover_tokens=crossover)
    try:
        for r in range(rounds):
            a = _Call(ctx, buf, 2 * r, "uniform", shape, seed=17, hint=hints[paths[0]])
            b = _Call(ctx, buf, 2 * r + 1, "skewed" if r % 2 == 0 else "masked", shape, seed=17,
                      hint=hints[paths[1]])
            out_a = a.dispatch(buf)
            out_b = b.dispatch(buf)
            assert (out_a.handle.path, out_b.handle.path) == paths, (out_a.handle.path, out_b.handle.path)
            a.check_dispatch(out_a)  # B's dispatch left A's outputs alone
            b.check_dispatch(out_b)
            first, second = ((b, out_b), (a, out_a)) if order == "B-before-A" else ((a, out_a), (b, out_b))
            z_first = buf.combine(first[0].y, first[1].handle)
            z_second = buf.combine(second[0].y, second[1].handle)
            first[0].check_combine(z_first)
            second[0].check_combine(z_second)
        buf.check()
    finally:
        buf.close()
    return True


@pytest.mark.parametrize("order, paths, dtype", [
    pytest.param("B-before-A", ("ll", "ll"), "float8_e4m3fn", id="ll-fp8-B-before-A"),
    pytest.param("A-before-B", ("ll", "ll"), "bfloat16", id="ll-bf16-A-before-B"),
    pytest.param("B-before-A", ("ht", "ht"), "float8_e4m3fn", id="ht-fp8-B-before-A"),
    pytest.param("B-before-A", ("ll", "ht"), "bfloat16", id="ll-ht-bf16-B-before-A"),
])
def test_two_handles_in_flight(ranks, order, paths, dtype):
    """Two micro-batches in flight (dispatch A, dispatch B, then both combines), twice on one
    Buffer, on each path and with A and B on different paths."""
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_two_micro_batches, shape, dtype, order, paths, 2))
