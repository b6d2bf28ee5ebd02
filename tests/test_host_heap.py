"""The host heap's shared memory (CPU ranks): anonymous segments by default, named files where
asked for; a directory too small for the heap is refused on every rank before anything is
written; no segment outlives a rank killed while the heap is being built."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_ep.testing import RankError, RankPool, RankTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
PEER_DIED = r"died|rank 0 failed(.|\n)*Connection (closed|reset) by peer"  # the harness saw it, or gloo did


def _segments(directory="/dev/shm"):
    return sorted(f for f in os.listdir(directory) if f.startswith("moe_ep-"))


def _build_and_share(ctx, nbytes):
    """A heap of ``nbytes`` per rank: each rank fills its arena, then reads every peer's (the
    anonymous segments' case: tests/test_transport.py::test_heap_maps_every_peer)."""
    import ctypes

    from moe_ep.transport import SymmetricHeap

    heap = SymmetricHeap(ctx.group, [("data", nbytes)], ctx.device)
    try:
        mine = heap.view("data", torch.int32)
        mine.copy_(torch.arange(mine.numel(), dtype=torch.int32) * 7 + ctx.rank)
        heap.barrier()
        sums = [sum((ctypes.c_int32 * mine.numel()).from_address(int(heap.peer_bases[peer])))
                for peer in range(ctx.world_size)]
        heap.barrier()
        return heap.host_segments, sums
    finally:
        heap.close()


def _killed_while_building(ctx, victim, point):
    """Build a heap; rank ``victim`` kills itself at ``point`` of the construction."""
    import mmap

    import torch.distributed as dist

    from moe_ep.transport import SymmetricHeap

    if ctx.rank == victim:
        # The exchanges: (named segments: free space,) allocation outcomes, segments, mapping outcomes.
        first = 2 if os.environ.get("MOE_EP_SHM_DIR") else 1
        patched, module, nth = {"created": ("all_gather_object", dist, first),  # reserved, unpublished
                                "mapping": ("mmap", mmap, 2),  # own segment mapped, not yet a peer's
                                "mapped": ("all_gather_object", dist, first + 2)}[point]  # all mapped
        original, calls = getattr(module, patched), []

        def die_at_nth_call(*args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(module, patched, die_at_nth_call)
    SymmetricHeap(ctx.group, [("data", 1 << 16)], ctx.device)
    time.sleep(120)


def _named_by(pids, directory="/dev/shm"):
    """Segments in ``directory`` named by one of these processes (moe_ep-<namespace>-<pid>-...);
    other users of the machine may come and go there meanwhile."""
    return [f for f in _segments(directory) if f.split("-")[2:3] in ([str(pid)] for pid in pids)]


def test_killed_rank_leaves_no_segment(tmp_path):
    """Killed at points of the construction: anonymous segments leave nothing anywhere (they
    have no name); named ones (here in tmp_path) are removed by the next named heap built there."""
    pids = []
    for directory, point in ((None, "mapping"), (str(tmp_path), "created"), (str(tmp_path), "mapping"),
                             (str(tmp_path), "mapped")):
        with RankPool(2, env={"MOE_EP_SHM_DIR": directory}) as pool:
            pids += pool.pids
            with pytest.raises((RankTimeout, RankError), match=PEER_DIED):
                pool.run(_killed_while_building, 1, point, timeout=120)
        assert _named_by(pids) == [], (directory, point)
        if directory and point == "created":
            assert _named_by(pool.pids, tmp_path), "the dead rank's named file (the next named heap removes it)"
    assert _segments(tmp_path)  # what the killed constructions left
    numel = 5000
    with RankPool(2, env={"MOE_EP_SHM_DIR": str(tmp_path)}) as pool:
        results = pool.run(_build_and_share, numel * 4)
        pids += pool.pids
    assert results == [(str(tmp_path), [sum(i * 7 + peer for i in range(numel)) for peer in range(2)])] * 2
    assert _segments(tmp_path) == [] and _named_by(pids) == []


def test_small_shared_memory_is_refused_on_every_rank(tmp_path):
    """A real 1 MiB tmpfs (mounted in a private mount namespace) as the segments' directory."""
    if shutil.which("unshare") is None or \
            subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces to mount a small tmpfs")
    mount = tmp_path / "shm"
    mount.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{mount}" && exec '
                           f'"{sys.executable}" "{os.path.join(HERE, "host_heap_space_check.py")}" "{mount}"'],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout.splitlines(), proc.stdout[-3000:] + proc.stderr[-3000:]
