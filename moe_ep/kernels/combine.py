"""Combine: send expert outputs back to their tokens' ranks and sum them there.

One kernel serves both paths. LL: regions double-buffered like the LL dispatch (call e uses half
e % 2; see kernels/dispatch.py for why that is safe). HT (CREDITS): single-buffered regions with
credits, and more programs.
Protocol (regions in ``moe_ep.regions``; R = world size, M = the path's capacity per source):
  Send programs ``[0, send_programs)`` (HT: after every rank's credit of the previous HT call)
  store each valid received row i ((i // rows) % send_programs == pid: ``rows`` adjacent rows at
  once) of ``y`` into row ``[rank, token]`` of ``combine_x`` on its source rank, where
  (source, token) = ``src[i]``. Each
  arrives on the send counter; the last one signals every rank (``signal[rank] = epoch``),
  whether or not it sent it anything.
  Reduce programs wait for every rank's signal, then for each token t of this rank
  (t % reduce_programs == pid) add, in float32 and in rank order, row ``[d, t]`` of
  ``combine_x`` for every rank d the token was dispatched to (``send_mask[t]`` bit d), and round
  to bfloat16. (HT: the last reduce program gives every rank its credit.)
Rows of ``y`` past ``num_recv_tokens`` are never read. A token dispatched nowhere gets zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep.kernels.numerics import _to_bf16
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (PHASE_COMBINE_CREDIT, PHASE_COMBINE_RECV, RECV_ARRIVALS,
                                         SEND_ARRIVALS, _arrive, _finish_launch, _launch_epoch, _peer_ptr, _row,
                                         _signal_peers, _wait_peers)


# Token and program counts are runtime values, unspecialised: every token count and bucket
# shares one compiled kernel (no compilation storm as batch sizes vary).
@triton.jit(do_not_specialize=("num_tokens", "send_programs", "reduce_programs", "num_programs"))
def _combine_kernel(y_ptr, src_ptr, num_recv_ptr, send_mask_ptr, out_ptr,
                    peer_bases_ptr, x_offset, signal_offset, credit_offset, counters_ptr, status_ptr,
                    rank, world_size, num_tokens, max_tokens, max_polls,
                    HIDDEN: tl.constexpr, CREDITS: tl.constexpr, send_programs,
                    reduce_programs, num_programs, BLOCK_H: tl.constexpr,
                    BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    # y [R * M, HIDDEN] bf16; src [R * M, 2] int32; num_recv [1] int32; send_mask [num_tokens] int64
    # out [num_tokens, HIDDEN] bf16
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    if not CREDITS:  # this call's half of the double-buffered regions
        x_offset += (world_size * max_tokens).to(tl.int64) * HIDDEN * 2 * (epoch % 2)
        signal_offset += (epoch % 2) * world_size * 4
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    if pid < send_programs:
        if CREDITS:
            _wait_peers(peer_bases_ptr, credit_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch - 1, epoch,
                        PHASE_COMBINE_CREDIT, max_polls, BLOCK_R)
        num_recv = tl.load(num_recv_ptr)
        offs_rows = tl.arange(0, ROWS)
        for first in range(pid * ROWS, num_recv, send_programs * ROWS):  # ROWS adjacent rows in flight
            rows = first + offs_rows
            mask_rows = rows < num_recv
            src_rank = tl.load(src_ptr + 2 * rows, mask=mask_rows, other=0)
            token = tl.load(src_ptr + 2 * rows + 1, mask=mask_rows, other=0)
            ptr_dst = _row(_peer_ptr(peer_bases_ptr, src_rank, x_offset, tl.bfloat16), rank * max_tokens + token,
                           HIDDEN, ALIGNED)
            ptr_y = y_ptr + rows.to(tl.int64) * HIDDEN
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask = mask_rows[:, None] & (offs_h < HIDDEN)[None, :]
                tl.store(ptr_dst[:, None] + offs_h[None, :], tl.load(ptr_y[:, None] + offs_h[None, :], mask=mask),
                         mask=mask)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r, mask_r, send_programs)
        _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r, last, epoch)
    else:
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                    PHASE_COMBINE_RECV, max_polls, BLOCK_R)
        base = _peer_ptr(peer_bases_ptr, rank, x_offset, tl.bfloat16)
        for t in range(pid - send_programs, num_tokens, reduce_programs):
            sent_to = tl.load(send_mask_ptr + t)
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < HIDDEN
                acc = tl.zeros([BLOCK_H], tl.float32)
                for d in range(0, world_size):
                    sent = ((sent_to >> d) & 1) != 0
                    part = tl.load(_row(base, d * max_tokens + t, HIDDEN, ALIGNED) + offs_h, mask=mask_h & sent,
                                   other=0.0)
                    acc += part.to(tl.float32)
                tl.store(out_ptr + tl.cast(t, tl.int64) * HIDDEN + offs_h, _to_bf16(acc), mask=mask_h)
        if CREDITS:
            last = _arrive(counters_ptr + RECV_ARRIVALS + offs_r, mask_r, reduce_programs)
            _signal_peers(peer_bases_ptr, credit_offset, rank, offs_r, last, epoch)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, num_programs)


register(_combine_kernel,
         {**{name: "i32" for name in ("send_programs", "reduce_programs", "num_programs")},
          "y_ptr": "*bf16", "src_ptr": "*i32", "num_recv_ptr": "*i32", "send_mask_ptr": "*i64", "out_ptr": "*bf16",
          "peer_bases_ptr": "*i64", "x_offset": "i64", "signal_offset": "i64", "credit_offset": "i64",
          "counters_ptr": "*i32", "status_ptr": "*i32", "rank": "i32", "world_size": "i32",
          "num_tokens": "i32", "max_tokens": "i32", "max_polls": "i32"},
         {"HIDDEN": 7168, "CREDITS": False, "BLOCK_H": 2048, "BLOCK_R": 4, "ALIGNED": True, "ROWS": 1})
register(_combine_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "CREDITS": True})  # the HT configuration
register(_combine_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "ROWS": 2})  # rows moved in pairs


def launch_combine(heap, sync, cfg, params, path, y, handle, out) -> None:
    """Send ``y`` ([capacity, hidden] bf16, rows as dispatched) back and sum into ``out``
    ([handle.num_tokens, hidden] bf16) over the ``path`` ("ll" or "ht") of the dispatch.
    Inputs are validated by the caller (``Buffer``)."""
    ht = path == "ht"
    prefix = f"{path}_combine_"
    num_programs = params.send_programs + params.reduce_programs
    sync.before_launch()
    _combine_kernel[(num_programs,)](
        y_ptr=y, src_ptr=handle.src, num_recv_ptr=handle.num_recv_tokens, send_mask_ptr=handle.send_mask,
        out_ptr=out, peer_bases_ptr=heap.peer_bases, x_offset=heap.offset(prefix + "x"),
        signal_offset=heap.offset(prefix + "signal"), credit_offset=heap.offset(prefix + "credit") if ht else 0,
        counters_ptr=sync.counters(f"combine_{path}"), status_ptr=sync.status, rank=heap.rank,
        world_size=heap.world_size, num_tokens=handle.num_tokens,
        max_tokens=cfg.ht_tokens if ht else cfg.ll_tokens, max_polls=sync.max_polls, HIDDEN=cfg.hidden,
        CREDITS=ht, send_programs=params.send_programs, reduce_programs=params.reduce_programs,
        num_programs=num_programs, BLOCK_H=params.block_h, BLOCK_R=triton.next_power_of_2(heap.world_size),
        ALIGNED=cfg.hidden % 8 == 0, ROWS=params.rows, num_warps=params.num_warps)  # bf16 rows of 16-byte multiples
    sync.after_launch()
