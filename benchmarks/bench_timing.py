"""How bench_ep times one op (every implementation the same way).

``measure(device, barrier, enqueue, ...)`` runs ``warmup + reps`` replays of one batch:

    barrier(); mark 0; then for i in range(batch): barrier(); enqueue(i); mark i + 1

On GPUs the batch is captured once in a CUDA graph (``graph=True``: GPU time only, no launch
gaps) and the marks are CUDA events recorded inside it (``external=True`` events: event-record
nodes of the graph), read after each replay; with ``graph=False`` (calls that synchronise with the
host) the same sequence runs eagerly. On CPU ranks the marks are the host clock (the calls are
synchronous there). The leading barrier lines the ranks up before mark 0, so a replay's start
skew between ranks is not in any call. Each call's time, mark i + 1 - mark i, is a barrier plus
the op; the barrier alone, measured the same way (``enqueue=None``), is subtracted by the caller.

``Timing.replays``: seconds per call of each timed replay ((last mark - mark 0) / batch): the
median over replays is the headline figure. ``Timing.calls``: seconds of every call of every
timed replay, for p50 / p99 (where events inside a graph cannot time, checked once: the replays
instead, timed whole by events around them, ``Timing.samples = "replays"``).
``Timing.kernel_s``: with ``kineto`` on a GPU, the device time of the op's kernels per call, as
DeepEP's ``bench_kineto`` reports (torch.profiler over a few more replays: the sum of the
durations of every device activity — kernels, memcpy, memset — except the barrier's kernel,
divided by the calls); None where no device profiler runs (CPU ranks).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

KINETO_REPLAYS = 2
BARRIER_KERNEL = "_barrier_kernel"  # moe_ep.kernels.barrier's kernel: not part of any op's kernel time


@dataclass
class Timing:
    replays: list  # seconds per call, one entry per timed replay (barrier included)
    calls: list  # seconds of each call of the timed replays (barrier included)
    kernel_s: float | None = None  # device time of the op's kernels per call (profiler); None: not measured
    kernels_per_call: float | None = None  # device activities (kernels, copies) per call; None: not measured
    samples: str = "calls"  # what ``calls`` holds: "calls", or "replays" where graphs cannot hold timing events


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def percentile(values, q: float):
    """The ``q``-th percentile (0-100) of ``values``, nearest rank (no interpolation)."""
    values = sorted(values)
    return values[min(len(values), max(1, math.ceil(len(values) * q / 100))) - 1]


def kernel_seconds(events, calls: int, exclude: str = BARRIER_KERNEL) -> tuple[float, float]:
    """(device seconds per call, device activities per call) of profiler ``events`` (objects with
    ``device_type``, ``name`` and ``time_range.elapsed_us()``, as torch.profiler's ``events()``)
    over ``calls`` calls, leaving out activities whose name contains ``exclude``."""
    from torch.autograd import DeviceType

    mine = [e for e in events if e.device_type == DeviceType.CUDA and exclude not in e.name]
    return sum(e.time_range.elapsed_us() for e in mine) / 1e6 / calls, len(mine) / calls


def measure(device: torch.device, barrier, enqueue, reps: int, warmup: int, batch: int, graph: bool,
            kineto: bool = False) -> Timing:
    """Time ``enqueue(i)`` (None: nothing, to time the barrier alone) as the module docstring says."""
    def call(i):
        barrier()
        if enqueue is not None:
            enqueue(i)

    if device.type != "cuda":
        replays, calls = [], []
        for r in range(warmup + reps):
            barrier()
            marks = [time.perf_counter()]
            for i in range(batch):
                call(i)
                marks.append(time.perf_counter())
            if r >= warmup:
                replays.append((marks[-1] - marks[0]) / batch)
                calls += [b - a for a, b in zip(marks, marks[1:])]
        return Timing(replays, calls)

    inner = not graph or marks_in_graphs(device)
    marks = [torch.cuda.Event(enable_timing=True, external=graph) for _ in range(batch + 1)]
    outer = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def sequence():
        barrier()
        if inner:
            marks[0].record()
        for i in range(batch):
            call(i)
            if inner:
                marks[i + 1].record()

    if graph:
        call(0)  # compiles and allocates outside the capture
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            sequence()
        run = g.replay
    else:
        run = sequence
    replays, calls = [], []
    for r in range(warmup + reps):
        outer[0].record()
        run()
        outer[1].record()
        torch.cuda.synchronize(device)
        if r >= warmup:
            if inner:
                elapsed = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
                replays.append(sum(elapsed) / batch)
                calls += elapsed
            else:  # the leading barrier counts in every replay, the barrier's own timing's too
                replays.append(outer[0].elapsed_time(outer[1]) / 1e3 / batch)
    timing = Timing(replays, calls or replays, samples="calls" if inner else "replays")
    if kineto and enqueue is not None:
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(KINETO_REPLAYS):
                    run()
                torch.cuda.synchronize(device)
            timing.kernel_s, timing.kernels_per_call = kernel_seconds(prof.events(), KINETO_REPLAYS * batch)
        except Exception as err:  # noqa: BLE001 — no profiler here: the figure stays None, said once
            _warn_once(f"kernel time not measured: torch.profiler failed: {type(err).__name__}: {err}")
    return timing


_WARNED: set = set()
_MARKS_IN_GRAPHS: dict = {}


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr, flush=True)


def marks_in_graphs(device: torch.device) -> bool:
    """Whether CUDA events recorded inside a CUDA graph (``external=True``) time its replays here
    (checked once per device and process); if not, ``measure`` times whole replays and its
    percentiles are over replays (``Timing.samples``), and says so once on stderr."""
    if device not in _MARKS_IN_GRAPHS:
        try:
            events = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(2)]
            value = torch.zeros(1, device=device)
            value.add_(1)
            torch.cuda.synchronize(device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                events[0].record()
                value.add_(1)
                events[1].record()
            g.replay()
            torch.cuda.synchronize(device)
            _MARKS_IN_GRAPHS[device] = events[0].elapsed_time(events[1]) >= 0
        except Exception as err:  # noqa: BLE001
            _warn_once(f"events inside CUDA graphs do not time here ({type(err).__name__}: {err}): "
                       f"p50/p99 are over replays, not calls")
            _MARKS_IN_GRAPHS[device] = False
    return _MARKS_IN_GRAPHS[device]
