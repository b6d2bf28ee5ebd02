"""The symmetric heap, device primitives and harness, on real rank processes."""

import os
import signal
import time

import pytest
import torch

from moe_ep.testing import RankError, RankTimeout, run_ranks
from moe_ep.transport import ALIGN, carve
from rank_checks import assert_equal


def _make_heap(ctx, chunk_bytes=0, extra=()):
    from moe_ep.kernels.barrier import barrier_region_bytes
    from moe_ep.kernels.peer_copy import peer_copy_regions
    from moe_ep.transport import SymmetricHeap

    sizes = [("barrier_flags", barrier_region_bytes(ctx.world_size))]
    sizes += peer_copy_regions(ctx.world_size, chunk_bytes) + list(extra)
    return SymmetricHeap(ctx.group, sizes, ctx.device)


def _peer_copy_round_trips(ctx, calls, chunk, parts, pull=False):
    from moe_ep.kernels.barrier import launch_barrier
    from moe_ep.kernels.peer_copy import copy_data_view, launch_peer_copy
    from moe_ep.transport import SyncState

    heap = _make_heap(ctx, chunk * 4)
    sync = SyncState(ctx.rank, ctx.device, timeout_s=60)
    try:
        for call in range(calls):
            # Row d of what rank r sends encodes (r, d, call, position): every int checkable.
            gen = torch.Generator().manual_seed(1000 * call)
            noise = torch.randint(0, 1 << 20, (ctx.world_size, ctx.world_size, chunk), generator=gen,
                                  dtype=torch.int32)
            src = (noise[ctx.rank] + ctx.rank * (1 << 24)).to(ctx.device)
            out = torch.full((ctx.world_size, chunk), -7, dtype=torch.int32, device=ctx.device)
            if pull:  # the rows to send lie in this rank's region; peers read last call's before a barrier
                launch_barrier(heap, sync)
                copy_data_view(heap, src.shape).copy_(src)
            launch_peer_copy(heap, sync, src, out, parts=parts[call % len(parts)], block=256, pull=pull)
            expected = torch.stack([noise[s, ctx.rank] + s * (1 << 24) for s in range(ctx.world_size)])
            assert_equal(f"call {call}", expected, out.cpu())
            if call % 2 and not pull:
                launch_barrier(heap, sync)
        sync.check()
        epochs = sync.counters("peer_copy").cpu().tolist()
    finally:
        heap.close()
    return epochs


def test_peer_copy_round_trips(ranks):
    """Puts, signals, waits and credits over several calls (epochs), every int checked; the
    number of programs per peer changes between calls."""
    chunk = 1000 if ranks.device == "cpu" else 1 << 20
    epochs = ranks.run(_peer_copy_round_trips, 5, chunk, (2, 3, 1))
    assert all(e[:2] == [5, 0] and not any(e[2:]) for e in epochs), epochs


def test_peer_pull_copy_round_trips(ranks):
    """The pull copy (loads from the peers' regions: the pull combine's transfer) over several
    calls, every int checked; the number of programs per peer changes between calls."""
    chunk = 1000 if ranks.device == "cpu" else 1 << 20
    epochs = ranks.run(_peer_copy_round_trips, 4, chunk, (2, 3, 1), True)
    assert all(e[:2] == [4, 0] and not any(e[2:]) for e in epochs), epochs


def _barrier_orders_ranks(ctx, calls):
    from moe_ep.kernels.barrier import launch_barrier
    from moe_ep.transport import SyncState

    heap = _make_heap(ctx)
    sync = SyncState(ctx.rank, ctx.device, timeout_s=60)
    stamps = []
    try:
        for call in range(calls):
            if ctx.rank == call % ctx.world_size:
                time.sleep(0.3)  # the late rank of this call
            entered = time.time()
            launch_barrier(heap, sync)
            if ctx.device.type != "cpu":
                torch.cuda.synchronize()
            stamps.append((entered, time.time()))
        sync.check()
    finally:
        heap.close()
    return stamps


@pytest.mark.cpu_worlds(2, 4)
def test_barrier_waits_for_the_last_rank(ranks):
    calls = 4
    stamps = ranks.run(_barrier_orders_ranks, calls)
    for call in range(calls):
        last_entry = max(s[call][0] for s in stamps)
        for rank, s in enumerate(stamps):
            assert s[call][1] >= last_entry, f"call {call}: rank {rank} left before the last rank entered"


def _one_rank_stays_away(ctx, absent, timeout_s):
    from moe_ep.kernels.barrier import launch_barrier
    from moe_ep.transport import PeerTimeoutError, SyncState

    heap = _make_heap(ctx)
    sync = SyncState(ctx.rank, ctx.device, timeout_s=timeout_s)
    start = time.time()
    outcome = None
    try:
        launch_barrier(heap, sync)  # everyone arrives once
        if ctx.rank != absent:
            try:
                launch_barrier(heap, sync)
                sync.check()
                outcome = "passed"
            except PeerTimeoutError as err:
                outcome = (err.peer, str(err))
            try:
                launch_barrier(heap, sync)
                outcome = (outcome, "usable after timeout")
            except PeerTimeoutError:
                pass
        else:
            time.sleep(timeout_s * 2)
    finally:
        heap.close()
    return outcome, time.time() - start


@pytest.mark.parametrize("device, world_size", [
    ("cpu", 2), ("cpu", 4),
    pytest.param("cuda", 2, marks=pytest.mark.gpu), pytest.param("cuda", 4, marks=pytest.mark.gpu)])
def test_missing_rank_gives_timeout_naming_it(device, world_size):
    if device == "cuda" and torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    absent = world_size - 1
    timeout_s = 2.0
    results = run_ranks(_one_rank_stays_away, world_size, absent, timeout_s, device=device, timeout=120)
    for rank, (outcome, elapsed) in enumerate(results):
        if rank == absent:
            continue
        assert isinstance(outcome, tuple) and outcome[0] == absent, f"rank {rank}: {outcome}"
        assert f"waiting for rank {absent}" in outcome[1]
        assert elapsed < 60, f"rank {rank} took {elapsed:.0f} s to give up"


def _heap_then_die(ctx, victim):
    heap = _make_heap(ctx, 4096)
    heap.view("copy_data", torch.int32).fill_(ctx.rank)
    heap.barrier()
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _moe_ep_segments():
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("moe_ep-"))


def test_killed_rank_leaves_no_shared_memory():
    before = _moe_ep_segments()
    with pytest.raises(RankTimeout, match=r"died"):
        run_ranks(_heap_then_die, 3, 1, timeout=120)
    assert _moe_ep_segments() == before


def _heap_is_shared(ctx):
    heap = _make_heap(ctx, 64, extra=[("odd", 13)])
    try:
        assert heap.offset("odd") % ALIGN == 0
        mine = heap.view("copy_data", torch.int32)
        mine.copy_(torch.arange(mine.numel(), dtype=torch.int32) + ctx.rank * 1000)
        heap.barrier()
        # Read every peer's arena through the address table (CPU ranks can: it is host memory).
        seen = []
        if ctx.device.type == "cpu":
            for peer in range(ctx.world_size):
                addr = int(heap.peer_bases[peer]) + heap.offset("copy_data")
                import ctypes
                buf = (ctypes.c_int32 * mine.numel()).from_address(addr)
                seen.append(list(buf))
        heap.barrier()
        return seen, heap.host_segments
    finally:
        heap.close()


def test_heap_maps_every_peer():
    results = run_ranks(_heap_is_shared, 3)
    n = 64 * 3 // 4
    for rank, (views, segments) in enumerate(results):
        assert views == [list(range(p * 1000, p * 1000 + n)) for p in range(3)], f"rank {rank}"
        assert segments == "memfd", segments  # anonymous: no name in /dev/shm (tests/test_host_heap.py)


def test_carve_aligns_and_rejects_duplicates():
    regions, total = carve([("a", 1), ("b", 300), ("c", 0), ("d", 8)])
    assert [r.offset for r in regions.values()] == [0, 256, 768, 768]
    assert total == 1024
    with pytest.raises(ValueError, match="twice"):
        carve([("a", 1), ("a", 2)])


def _fail_on(ctx, rank):
    if ctx.rank == rank:
        raise ValueError("planted failure")
    return ctx.rank


def _hang_on(ctx, rank):
    if ctx.rank == rank:
        time.sleep(600)
    return ctx.rank


def test_harness_reports_failing_rank_and_kills_hangs():
    with pytest.raises(RankError, match=r"rank 1 failed:(.|\n)*planted failure"):
        run_ranks(_fail_on, 2, 1)
    start = time.time()
    with pytest.raises(RankTimeout, match=r"ranks \[0\] did not finish"):
        run_ranks(_hang_on, 2, 0, timeout=5)
    assert time.time() - start < 60
