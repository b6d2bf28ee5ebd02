"""Peer copy: every rank sends one equal-sized chunk to every rank (an all-to-all of bytes).

It is the plainest use of the transport — stores into peers' arenas, a signal, a wait — and
so both the transport's round-trip test and the benchmark's peer-to-peer limit.

Protocol (regions on every rank; R = world size, P = PARTS programs per peer and side):
  copy_data    [R, chunk] int32   row ``src`` written only by ``src``
  copy_signal  [R] int32          slot ``src``: epoch, once all of src's row has landed
  copy_credit  [R] int32          slot ``dst``: epoch of the last call whose row dst consumed
Programs ``[0, R*P)`` send part ``p`` of row ``dst``: wait for dst's credit of the previous call,
store, arrive; the last of the P parts signals dst. Programs ``[R*P, 2*R*P)`` receive part ``p``
of row ``src``: wait for src's signal, copy the part out (COPY_OUT), arrive; the last part
gives src its credit. Sends have lower program ids than waits, so a launch cannot deadlock in
the interpreter or on a GPU whose grid is not all resident.
PULL (the same regions, loads instead of stores): each rank's own ``copy_data`` row d holds what
rank d gets. Program 0 waits for every rank's credit of the previous call (it has read this
rank's rows), then tells every rank that this rank's rows are in place (``copy_signal[rank]``).
Programs ``[0, R*P)`` wait for peer p's signal, load part ``p`` of row ``rank`` of p's
``copy_data`` and store it into row p of ``out``; the last part gives p its credit. The
pull-based combine (``kernels/combine.py``) moves its bytes this way.
"""

import torch
import triton
import triton.language as tl

from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (PHASE_COPY_CREDIT, PHASE_COPY_RECV, RECV_ARRIVALS,
                                         SEND_ARRIVALS, _arrive, _finish_launch, _launch_epoch,
                                         _peer_ptr, _row, _signal_peers, _wait_peers)


@triton.jit
def _copy_part(ptr_src, ptr_dst, part, part_len, chunk, BLOCK: tl.constexpr):
    """Copy values [part * part_len, (part + 1) * part_len) of a chunk-long row, BLOCK at a time."""
    for start in range(part * part_len, tl.minimum((part + 1) * part_len, chunk), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < chunk
        tl.store(ptr_dst + offs, tl.load(ptr_src + offs, mask=mask), mask=mask)


@triton.jit
def _peer_copy_kernel(src_ptr, out_ptr, peer_bases_ptr, data_offset, signal_offset, credit_offset,
                      counters_ptr, status_ptr, rank, world_size, chunk, max_polls,
                      PARTS: tl.constexpr, BLOCK: tl.constexpr, COPY_OUT: tl.constexpr,
                      NUM_PROGRAMS: tl.constexpr, ALIGNED: tl.constexpr, PULL: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    # src_ptr: [R, chunk] int32, row d goes to rank d; out_ptr: [R, chunk] int32, row s from rank s
    # ALIGNED: chunk is a multiple of 4 (16-byte rows), declared on every row pointer (vector copies
    # also need Triton to know chunk's divisibility: it does for a multiple of 16)
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    part_len = tl.cdiv(tl.cdiv(chunk, PARTS), BLOCK) * BLOCK
    sending = pid < world_size * PARTS
    peer = tl.where(sending, pid, pid - world_size * PARTS) // PARTS
    part = pid % PARTS
    offs_one = tl.arange(0, 1) + peer  # [1]: the peer, as a block for the flag helpers
    mask_one = offs_one < world_size
    if PULL:
        if pid == 0:
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < world_size
            _wait_peers(peer_bases_ptr, credit_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch - 1, epoch,
                        PHASE_COPY_CREDIT, max_polls, 0, 0, BLOCK_R)
            _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r, mask_r, epoch)
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_one, offs_one, mask_one, epoch,
                    epoch, PHASE_COPY_RECV, max_polls, 0, 0, 1)
        _copy_part(_row(_peer_ptr(peer_bases_ptr, peer, data_offset, tl.int32), rank, chunk, ALIGNED),
                   _row(out_ptr, peer, chunk, ALIGNED), part, part_len, chunk, BLOCK)
        last = _arrive(counters_ptr + RECV_ARRIVALS + offs_one, mask_one, PARTS)
        _signal_peers(peer_bases_ptr, credit_offset, rank, offs_one, last, epoch)
    elif sending:
        _wait_peers(peer_bases_ptr, credit_offset, status_ptr, rank, offs_one, offs_one, mask_one, epoch - 1,
                    epoch, PHASE_COPY_CREDIT, max_polls, 0, 0, 1)
        _copy_part(_row(src_ptr, peer, chunk, ALIGNED),
                   _row(_peer_ptr(peer_bases_ptr, peer, data_offset, tl.int32), rank, chunk, ALIGNED), part,
                   part_len, chunk, BLOCK)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_one, mask_one, PARTS)
        _signal_peers(peer_bases_ptr, signal_offset, rank, offs_one, last, epoch)
    else:
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_one, offs_one, mask_one, epoch,
                    epoch, PHASE_COPY_RECV, max_polls, 0, 0, 1)
        if COPY_OUT:
            _copy_part(_row(_peer_ptr(peer_bases_ptr, rank, data_offset, tl.int32), peer, chunk, ALIGNED),
                       _row(out_ptr, peer, chunk, ALIGNED), part, part_len, chunk, BLOCK)
        last = _arrive(counters_ptr + RECV_ARRIVALS + offs_one, mask_one, PARTS)
        _signal_peers(peer_bases_ptr, credit_offset, rank, offs_one, last, epoch)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, NUM_PROGRAMS)


_launch_peer_copy = Launcher(_peer_copy_kernel)
register(_peer_copy_kernel,
         {"src_ptr": "*i32", "out_ptr": "*i32", "peer_bases_ptr": "*i64", "data_offset": "i64",
          "signal_offset": "i64", "credit_offset": "i64", "counters_ptr": "*i32", "status_ptr": "*i32",
          "rank": "i32", "world_size": "i32", "chunk": "i32", "max_polls": "i32"},
         {"PARTS": 4, "BLOCK": 1024, "COPY_OUT": True, "NUM_PROGRAMS": 32, "ALIGNED": True, "PULL": False,
          "BLOCK_R": 4}, divisible=("chunk",))
register(_peer_copy_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "PULL": True,
                                                     "NUM_PROGRAMS": 16}, divisible=("chunk",))


def peer_copy_regions(world_size: int, chunk_bytes: int) -> list[tuple[str, int]]:
    """(name, bytes) of the regions ``launch_peer_copy`` needs for chunks of ``chunk_bytes``."""
    return [("copy_data", world_size * chunk_bytes), ("copy_signal", 4 * world_size),
            ("copy_credit", 4 * world_size)]


def copy_data_view(heap, shape) -> torch.Tensor:
    """This rank's ``copy_data`` region as [world_size, chunk] int32 rows (a pull copy's source)."""
    return heap.view("copy_data", torch.int32)[:shape[0] * shape[1]].view(shape)


def launch_peer_copy(heap, sync, src, out=None, parts: int = 4, block: int = 2048,
                     num_warps: int = 4, pull: bool = False) -> None:
    """Send row d of ``src`` ([world_size, chunk] int32) to rank d; rank s's row lands in row s of
    ``out`` (same shape). With ``out=None`` the bytes stay in the receive region (benchmarks).
    ``pull``: every rank loads its rows from the peers' regions instead; each rank's rows to send
    must already lie in its own region (``copy_data_view``; rewrite it only once the peers have
    read the previous call's: after a barrier), and ``src`` only gives the shape (and receives
    the rows when ``out`` is None)."""
    world = heap.world_size
    chunk, copy_out = src.shape[1], out is not None

    def make():
        num_programs = (1 if pull else 2) * world * parts
        return dict(
            peer_bases_ptr=heap.peer_bases, data_offset=heap.offset("copy_data"),
            signal_offset=heap.offset("copy_signal"), credit_offset=heap.offset("copy_credit"),
            counters_ptr=sync.counters("peer_copy"), status_ptr=sync.status, rank=heap.rank, world_size=world,
            chunk=chunk, max_polls=sync.max_polls, PARTS=parts, BLOCK=block, COPY_OUT=copy_out,
            NUM_PROGRAMS=num_programs, num_warps=num_warps, PULL=pull, BLOCK_R=triton.next_power_of_2(world))

    static = static_args(heap, ("peer_copy", id(sync), chunk, copy_out, parts, block, num_warps, pull), make)
    sync.before_launch()
    _launch_peer_copy.launch(
        (static["NUM_PROGRAMS"],), static, src_ptr=src, out_ptr=src if out is None else out,
        ALIGNED=chunk % 4 == 0 and src.data_ptr() % 16 == 0 and (out is None or out.data_ptr() % 16 == 0))
    sync.after_launch()
