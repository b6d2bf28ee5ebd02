"""Peer copy: every rank sends one equal-sized chunk to every rank (an all-to-all of bytes).

It is the plainest use of the transport — stores into peers' arenas, a signal, a wait — and
so both the transport's round-trip test and the benchmark's peer-to-peer limit.

Protocol (regions on every rank; R = world size, P = PARTS):
  copy_data    [R, chunk] int32   row ``src`` written only by ``src``
  copy_signal  [R, MAX_PARTS]     slot ``[src, p]``: epoch after src's part ``p`` of the row landed
  copy_credit  [R, MAX_PARTS]     slot ``[dst, q]``: epoch of the last call dst consumed (see
                                  ``_acquire_region``)
Programs ``[0, R*P)`` send (dst, part); programs ``[R*P, 2*R*P)`` receive (src, part): wait for
the signal, copy the part out (when COPY_OUT), then release the region to ``src``. Sends have
lower program ids than waits, so the launch cannot deadlock in the interpreter or on a GPU
whose grid is not all resident.
"""

import triton
import triton.language as tl

from moe_ep.kernels.registry import register
from moe_ep.transport.primitives import (MAX_PARTS, PHASE_COPY_CREDIT, PHASE_COPY_RECV,
                                         _acquire_region, _check_wait, _finish_launch,
                                         _launch_epoch, _peer_ptr, _release_region, _signal,
                                         _wait_geq)


@triton.jit
def _peer_copy_kernel(src_ptr, out_ptr, peer_bases_ptr, data_offset, signal_offset, credit_offset,
                      counters_ptr, status_ptr, rank, world_size, chunk, max_polls,
                      PARTS: tl.constexpr, BLOCK: tl.constexpr, COPY_OUT: tl.constexpr,
                      NUM_PROGRAMS: tl.constexpr):
    # src_ptr: [R, chunk] int32, row d goes to rank d; out_ptr: [R, chunk] int32, row s from rank s
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    part_len = tl.cdiv(tl.cdiv(chunk, PARTS), BLOCK) * BLOCK
    if pid < world_size * PARTS:
        dst_rank = pid // PARTS
        part = pid % PARTS
        _acquire_region(peer_bases_ptr, credit_offset, status_ptr, rank, dst_rank, epoch,
                        PHASE_COPY_CREDIT, max_polls)
        ptr_dst = _peer_ptr(peer_bases_ptr, dst_rank, data_offset, tl.int32) + rank * chunk
        for start in range(part * part_len, tl.minimum((part + 1) * part_len, chunk), BLOCK):
            offs = start + tl.arange(0, BLOCK)  # [BLOCK]
            mask = offs < chunk
            values = tl.load(src_ptr + dst_rank * chunk + offs, mask=mask)
            tl.store(ptr_dst + offs, values, mask=mask)
        tl.debug_barrier()
        _signal(_peer_ptr(peer_bases_ptr, dst_rank, signal_offset, tl.int32) + rank * MAX_PARTS + part,
                epoch)
    else:
        src_rank = (pid - world_size * PARTS) // PARTS
        part = (pid - world_size * PARTS) % PARTS
        ptr_signal = _peer_ptr(peer_bases_ptr, rank, signal_offset, tl.int32) + src_rank * MAX_PARTS + part
        offs_one = tl.arange(0, 1)
        _, missing = _wait_geq(ptr_signal + offs_one, epoch, offs_one < 1, max_polls, 1)
        _check_wait(status_ptr, tl.where(missing >= 0, src_rank, -1), PHASE_COPY_RECV, epoch)
        tl.debug_barrier()
        if COPY_OUT:
            ptr_src = _peer_ptr(peer_bases_ptr, rank, data_offset, tl.int32) + src_rank * chunk
            for start in range(part * part_len, tl.minimum((part + 1) * part_len, chunk), BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < chunk
                tl.store(out_ptr + src_rank * chunk + offs, tl.load(ptr_src + offs, mask=mask), mask=mask)
        _release_region(peer_bases_ptr, credit_offset, rank, src_rank, epoch, part, PARTS)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, NUM_PROGRAMS)


register(_peer_copy_kernel,
         {"src_ptr": "*i32", "out_ptr": "*i32", "peer_bases_ptr": "*i64", "data_offset": "i64",
          "signal_offset": "i64", "credit_offset": "i64", "counters_ptr": "*i32", "status_ptr": "*i32",
          "rank": "i32", "world_size": "i32", "chunk": "i32", "max_polls": "i32"},
         {"PARTS": 4, "BLOCK": 1024, "COPY_OUT": True, "NUM_PROGRAMS": 32})


def peer_copy_regions(world_size: int, chunk_bytes: int) -> list[tuple[str, int]]:
    """(name, bytes) of the regions ``launch_peer_copy`` needs for chunks of ``chunk_bytes``."""
    flags = world_size * MAX_PARTS.value * 4
    return [("copy_data", world_size * chunk_bytes), ("copy_signal", flags), ("copy_credit", flags)]


def launch_peer_copy(heap, sync, src, out=None, parts: int = 4, block: int = 2048) -> None:
    """Send row d of ``src`` ([world_size, chunk] int32) to rank d; rank s's row lands in row s of
    ``out`` (same shape). With ``out=None`` the bytes stay in the receive region (benchmarks)."""
    world = heap.world_size
    chunk = src.shape[1]
    sync.before_launch()
    num_programs = 2 * world * parts
    _peer_copy_kernel[(num_programs,)](
        src_ptr=src, out_ptr=src if out is None else out, peer_bases_ptr=heap.peer_bases,
        data_offset=heap.offset("copy_data"), signal_offset=heap.offset("copy_signal"),
        credit_offset=heap.offset("copy_credit"), counters_ptr=sync.counters("peer_copy"),
        status_ptr=sync.status, rank=heap.rank, world_size=world, chunk=chunk,
        max_polls=sync.max_polls, PARTS=parts, BLOCK=block, COPY_OUT=out is not None,
        NUM_PROGRAMS=num_programs)
    sync.after_launch()
