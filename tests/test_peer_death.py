"""A peer killed (SIGKILL) in the middle of a dispatch or a combine, on the LL and HT paths and in
the expert layout (its calls with receive hooks, run right after each call).

Every survivor must raise ``moe_ep.PeerTimeoutError`` naming the dead rank within about
``timeout_s`` (on CPU ranks: one wait spends its poll budget, counted), its Buffer must
refuse the next call with that error, ``close()`` must return at once (no collective with a
dead rank), and no /dev/shm segment of the heap may be left.

Where the victim dies. On CPU ranks the kernels run in Triton's interpreter, as Python, one
program after another: the victim traces its own calls (``sys.settrace``) during the fatal op
and SIGKILLs itself when a program enters ``_signal_peers`` (moe_ep.transport.primitives) for
the first time. That is deterministic: the victim has done the op's work up to its first
signal (LL: every row stored into its peers' receive regions; HT dispatch: the stage kernel,
and its layout announcement stored on every peer; expert-layout dispatch: its pair counts stored
on every peer, so a survivor's send launch gives up waiting for them; combine: its rows sent
back, and in the expert layout a survivor's hook gives up), and no peer has been told. On GPUs
the kernels do not run as Python: the victim enqueues the op and kills itself as soon as the
launch returns, while its kernel runs or waits, so how much of the op it finished is not fixed;
a survivor then raises in that op or, if the victim's part of it landed, in the next one, which
the test makes.
"""

import os
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import GPU_SHARED, gpus_for
from contract import Call, Setup, call_inputs
from ep_cases import CPU_SHAPE, GPU_SHAPE, expert_outputs
from moe_ep.testing import RankDied, RankPool

TIMEOUT_S = 3.0


def _heap_segments() -> list:
    """The host heap's segments this process has mapped (every rank's arena): anonymous memfd
    files ("/memfd:moe_ep-r<rank>"), or named files in /dev/shm, unlinked once all ranks have
    mapped them (moe_ep.transport.heap)."""
    with open("/proc/self/maps") as maps:
        names = {line.split(None, 5)[5].strip().removesuffix(" (deleted)") for line in maps
                 if len(line.split(None, 5)) == 6 and ("/dev/shm/moe_ep-" in line or "/memfd:moe_ep-" in line)}
    return sorted(names)


def _die_at_first_signal() -> None:
    """From now on, SIGKILL this process when a kernel program calls ``_signal_peers`` (CPU ranks:
    the interpreter runs kernels as Python), or right away (GPU ranks: after the launch)."""
    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_signal_peers":
            os.kill(os.getpid(), signal.SIGKILL)
        return None

    sys.settrace(tracer)


def _dispatch(buf, inputs, layout: str):
    """A dispatch; in the expert layout with a receive hook, called at once."""
    if layout == "flat":
        return buf.dispatch(*inputs)
    out, hook = buf.dispatch(*inputs, layout="expert", return_recv_hook=True)
    hook()
    return out


def _combine(buf, y, out, layout: str):
    """A combine; in the expert layout weighted, with a receive hook, called at once."""
    if layout == "flat":
        return buf.combine(y, out.handle)
    z, hook = buf.combine(y, out.handle, weighted=True, return_recv_hook=True)
    hook()
    return z


def _killed_mid_call(ctx, setup: Setup, victim: int, op: str):
    """One good dispatch + combine, then the victim dies in the next ``op``; survivors report
    (peer, phase, message) of their error, the seconds to it, the polls of its waits, the error
    of a further call, the seconds close() took and the heap's /dev/shm files."""
    import moe_ep
    from moe_ep import reference

    buf = moe_ep.Buffer(ctx.group, setup.config())
    layout = setup.layouts[0]
    segments = _heap_segments() if ctx.device.type == "cpu" else []
    me, world = ctx.rank, ctx.world_size
    for seed in (1, 2):  # a whole pair first: the fatal call is not the Buffer's first (epochs, credits)
        call = Call(seed=seed, tokens=tuple(4 - r % 2 for r in range(world)))
        xs, ids, weights = call_inputs(setup, call)
        if layout == "flat":
            expected = reference.dispatch(xs, ids, weights, buf.cfg.num_experts, buf.cfg.dispatch_dtype)
            y = torch.zeros(buf.capacity, setup.hidden, dtype=torch.bfloat16)
            y[:expected[me].num_tokens] = expert_outputs(expected[me], me)
        else:  # what the experts send back does not matter here
            y = torch.randn(buf.experts_per_rank, buf.cfg.slots(world), setup.hidden).to(torch.bfloat16)
        inputs = (xs[me].to(ctx.device), ids[me].to(ctx.device), weights[me].to(ctx.device))
        y = y.to(ctx.device)
        if seed == 1:  # every op starts together: no legitimate wait nears the short timeout_s
            dist.barrier(group=ctx.group)
            out = _dispatch(buf, inputs, layout)
            dist.barrier(group=ctx.group)
            _combine(buf, y, out, layout)
            buf.check()
    dist.barrier(group=ctx.group)
    if me == victim:
        if op == "combine":
            out = _dispatch(buf, inputs, layout)
        _die_at_first_signal()
        if op == "dispatch":
            _dispatch(buf, inputs, layout)
        else:
            _combine(buf, y, out, layout)
        if ctx.device.type != "cpu":
            os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError(f"the victim finished its {op}")
    polls = _count_polls() if ctx.device.type == "cpu" else None
    error = None
    start = time.monotonic()
    try:
        out = _dispatch(buf, inputs, layout)
        if op == "combine" or ctx.device.type != "cpu":
            _combine(buf, y, out, layout)
        buf.check()
        if ctx.device.type != "cpu":  # the victim's part of the op may have landed: the next call
            _dispatch(buf, inputs, layout)
            buf.check()
    except moe_ep.PeerTimeoutError as err:
        error = (err.peer, err.phase, str(err))
    elapsed = time.monotonic() - start
    polls = (polls, buf.sync.max_polls) if polls is not None else None
    try:
        _dispatch(buf, inputs, layout)
        refused = None
    except moe_ep.PeerTimeoutError as err:
        refused = str(err)
    start = time.monotonic()
    buf.close()
    return error, elapsed, polls, refused, time.monotonic() - start, segments


def _count_polls() -> list:
    """From now on count each wait's polls (CPU ranks: a wait pauses in ``_platform.yield_cpu``
    before each poll after its first; a wait's loop is ``_wait_geq``); returns the list of counts,
    one per wait that polled."""
    from moe_ep import _platform

    counts, pause, current = [], _platform.yield_cpu, [None]

    def counted():
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "_wait_geq":
            frame = frame.f_back
        if frame is not current[0]:  # a new wait (the last one's frame is kept: no id is reused)
            current[0] = frame
            counts.append(0)
        counts[-1] += 1
        pause()

    _platform.yield_cpu = counted
    return counts


def _params():
    cases = [("cpu", 3, path, op) for path in ("ll", "ht", "expert") for op in ("dispatch", "combine")]
    gpu = [pytest.param("cuda", 4, path, op, marks=pytest.mark.gpu)
           for path in ("ll", "ht", "expert") for op in ("dispatch", "combine")]
    return [pytest.param(*c, id=f"{c[0]}{c[1]}-{c[2]}-{c[3]}") for c in cases] + gpu


@pytest.mark.parametrize("device, world_size, path, op", _params())
def test_peer_killed_mid_call(device, world_size, path, op):
    """A middle rank dies (ranks below and above it must both name it): every survivor raises
    PeerTimeoutError naming it within a bounded time, refuses the next call, closes at once, and
    no heap segment is left in /dev/shm."""
    if device == "cuda" and not gpus_for(world_size):
        pytest.skip(f"needs {world_size} GPUs")
    victim = world_size // 2
    shape = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    setup = Setup(world_size=world_size, hidden=shape.hidden, experts_per_rank=shape.num_experts_per_rank,
                  topk=shape.topk, max_tokens_per_rank=shape.max_tokens_per_rank, dtype="float8_e4m3fn",
                  mode="ll" if path == "expert" else path, timeout_s=TIMEOUT_S,
                  layouts=("expert",) if path == "expert" else ("flat",))
    pool = RankPool(world_size, device, share_device=GPU_SHARED and device == "cuda")
    results = pool.run(_killed_mid_call, setup, victim, op, timeout=300, may_die=(victim,))
    assert pool.closed
    assert results[victim] == RankDied(victim, -signal.SIGKILL), results[victim]
    survivors = [r for r in range(world_size) if r != victim]
    errors = {r: results[r][0] for r in survivors}
    assert all(errors.values()), f"no error after rank {victim} died in its {op}: {errors}"
    # A survivor names the rank it waited for in vain. On CPU ranks programs run in order, and the
    # first wait to give up is one for the victim; on GPUs a survivor may first give up on another
    # survivor that is itself blocked by the victim (HT: its sends wait for every announcement).
    for rank, (peer, _, message) in errors.items():
        assert f"waiting for rank {peer}" in message and peer != rank, f"rank {rank}: {message}"
        assert peer == victim or device != "cpu", f"rank {rank}: {message}"
    assert any(peer == victim for peer, _, _ in errors.values()), f"no survivor named rank {victim}: {errors}"
    for rank in survivors:
        (_, phase, _), elapsed, polls, refused, close_seconds, segments = results[rank]
        if device == "cpu":
            assert op in phase, f"rank {rank}: timed out in {phase}, expected a {op} phase"
            # One wait spent its whole poll budget (a poll's time varies with the machine's load,
            # the count does not): a wait that begins after the first timeout gives up at once.
            per_wait, budget = polls
            gave_up = [p for p in per_wait if p >= budget]
            assert len(gave_up) == 1, f"rank {rank}: {len(gave_up)} waits spent their {budget} polls ({per_wait})"
        # On GPUs the budget is sized from an estimated poll rate (moe_ep._platform.max_polls).
        bound = 15 * TIMEOUT_S if device == "cpu" else 5 * TIMEOUT_S
        assert elapsed < bound, f"rank {rank} took {elapsed:.1f} s to give up"
        assert refused is not None and "cannot be used after this" in refused, f"rank {rank}: {refused}"
        assert close_seconds < 5, f"rank {rank}: close() took {close_seconds:.1f} s"
        if device == "cpu":
            assert len(segments) == world_size, f"rank {rank} mapped {segments}"
            left = [s for s in segments if s.startswith("/dev/shm/") and os.path.exists(s)]
            assert not left, f"segments left in /dev/shm: {left}"
        waits = f", polls of the waits {polls[0]}" if polls else ""
        print(f"rank {rank}: {op} gave up after {elapsed:.1f} s{waits} ({phase}), close {close_seconds:.2f} s")
