"""Timing of collective calls, shared by the benchmark and the tuner.

Every timed call is preceded by a device barrier (so rank skew is not counted). On GPUs a batch
of calls is captured in a CUDA graph and its replays are timed with CUDA events: GPU time only,
no host launch gaps. Calls that synchronise with the host (the NCCL path) run eagerly; on the
CPU the host clock times synchronous calls.
"""

from __future__ import annotations

import time

import torch

from moe_ep.kernels.barrier import barrier_region_bytes, launch_barrier
from moe_ep.transport import SymmetricHeap, SyncState


class DeviceBarrier:
    """A device-side barrier over ``group`` on its own small heap (plus ``extra`` regions), on the
    device's default heap backend or ``backend``."""

    def __init__(self, group, rank: int, world_size: int, device: torch.device, extra=(), backend=None):
        self.heap = SymmetricHeap(group, [("barrier_flags", barrier_region_bytes(world_size))] + list(extra), device,
                                  backend)
        self.sync = SyncState(rank, device, timeout_s=120)

    def __call__(self) -> None:
        launch_barrier(self.heap, self.sync)

    def close(self) -> None:
        self.heap.barrier()
        self.heap.close()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def batch_seconds(device: torch.device, enqueue, reps: int, warmup: int, graph: bool, batch: int) -> list:
    """One entry per rep: the time of one ``enqueue(i)``, measured over ``batch`` back-to-back
    calls — a CUDA-graph replay when ``graph`` (GPU time only), else eagerly."""
    if device.type != "cuda":
        times = []
        for _ in range(warmup + reps):
            t0 = time.perf_counter()
            for i in range(batch):
                enqueue(i)
            times.append((time.perf_counter() - t0) / batch)
        return times[warmup:]
    if graph:
        enqueue(0)  # compiles and allocates outside the capture
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(batch):
                enqueue(i)
        run = g.replay
    else:
        def run():
            for i in range(batch):
                enqueue(i)
    pairs = []
    for _ in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 / batch for s, e in pairs[warmup:]]


def host_seconds(device: torch.device, fn, calls: int = 5) -> float:
    """Median host time of an eager call (Python, checks, launch), each after a synchronisation."""
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return median(times)
