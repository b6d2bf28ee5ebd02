"""Combine: send expert outputs back to their tokens' ranks and sum them there.

One kernel serves both paths. LL: regions double-buffered like the LL dispatch (call e uses half
e % 2; see kernels/dispatch.py for why that is safe). HT (CREDITS): single-buffered regions with
credits, and more programs.
Protocol (regions in ``moe_ep.regions``; R = world size, M = the path's capacity per source):
  The tokens of each rank form P ranges (HT: ``cfg.ht_parts``; LL: 1): range q of a
  rank with T tokens starts at token min(q * cdiv(T, P), T). The dispatch recorded where each
  source's ranges start among the received rows (``handle.part_rows``; rows hold source-major,
  then increasing tokens). Programs come as P groups, [send q | reduce q] for q = 0 .. P - 1
  (``reduce_delay`` 2: each reduce group one send group later, [send 0] [send 1 | reduce 0] ...
  [reduce P - 1], so waiting reducers hold no slot the next range's senders could take):
  Send programs of range q (HT: after every rank's credit of the previous HT call) store the
  received rows of range q of every source, ``rows`` adjacent ones at once and program i taking
  the i-th ``rows`` of them in turn, into row ``[rank, token]`` of ``combine_x`` on the source
  rank, (source, token) being ``src`` of the row. Each arrives on range q's counter; the last one
  signals range q to every rank (``signal[q, rank] = epoch``), whether or not it sent it anything.
  Rank r takes the rows from about where source r + 1's begin, wrapping around, so that the
  ranks send to different ranks at a time.
  Reduce programs of range q wait for range q's signal from every rank, then for each token t of
  this rank's range q (one in reduce_programs each) add, in float32 and in rank order, row
  ``[d, t]`` of ``combine_x`` for every rank d the token was dispatched to (``send_mask[t]`` bit d),
  and round to bfloat16. So the sums of range q run while later ranges are being sent. (HT: the
  last reduce program of all gives every rank its credit.) Waits are only for programs of lower
  ids, on every rank: no deadlock in the interpreter or on a GPU whose grid is not all resident.
Rows of ``y`` past ``num_recv_tokens`` are never read. A token dispatched nowhere gets zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep.kernels.numerics import _to_bf16
from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (PHASE_COMBINE_CREDIT, PHASE_COMBINE_RECV, RECV_ARRIVALS, SEND_ARRIVALS,
                                         _arrive, _finish_launch, _launch_epoch, _mask_if, _peer_ptr, _row,
                                         _signal_peers, _wait_peers)


@triton.jit
def _rotated(n, total, rank, world_size):
    """The n-th row (0 <= n < total) a send program of ``rank`` takes from a source-major list of
    ``total`` rows to send back. Every rank starting at the top would send to rank 0 first, then to
    rank 1, ... (all into one rank's links at a time; run 15: EP4's send phase 612 us against a
    495 us copy). Rank r starts total * (r + 1) / R rows in, about where the rows of source r + 1
    begin, and wraps around: the ranks send to different ranks at a time."""
    rotate = (total * (rank + 1)) // world_size
    return tl.where(n + rotate >= total, n + rotate - total, n + rotate)


# Token and program counts are runtime values, unspecialised: every token count and bucket
# shares one compiled kernel (no compilation storm as batch sizes vary).
@triton.jit(do_not_specialize=("num_tokens", "send_programs", "reduce_programs", "num_programs", "reduce_delay"))
def _combine_kernel(y_ptr, src_ptr, num_recv_ptr, send_mask_ptr, part_rows_ptr, out_ptr,
                    peer_bases_ptr, x_offset, signal_offset, credit_offset, counters_ptr, status_ptr,
                    rank, world_size, num_tokens, max_tokens, max_polls,
                    HIDDEN: tl.constexpr, CREDITS: tl.constexpr, send_programs,
                    reduce_programs, num_programs, reduce_delay, BLOCK_H: tl.constexpr,
                    BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, PARTS: tl.constexpr):
    # y [R * M, HIDDEN] bf16; src [R * M, 2] int32; num_recv [1] int32; send_mask [num_tokens] int64
    # part_rows [R, PARTS + 1] int32 (PARTS > 1); out [num_tokens, HIDDEN] bf16
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    if not CREDITS:  # this call's half of the double-buffered regions
        x_offset += (world_size * max_tokens).to(tl.int64) * HIDDEN * 2 * (epoch % 2)
        signal_offset += (epoch % 2) * world_size * 4
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    group = send_programs + reduce_programs
    if reduce_delay == 1:  # [send 0 | reduce 0] [send 1 | reduce 1] ...
        q = pid // group  # the token range
        local = pid % group  # < send_programs: a sender, else a reducer
    else:  # [send 0] [send 1 | reduce 0] [send 2 | reduce 1] ... [reduce P - 1]
        k = tl.maximum(pid - send_programs, 0) // group
        r = tl.maximum(pid - send_programs, 0) % group
        first, tail = pid < send_programs, k >= PARTS - 1
        q = tl.where(first, 0, tl.where(tail, PARTS - 1, tl.where(r < send_programs, k + 1, k)))
        local = tl.where(first, pid, tl.where(tail, send_programs + r, r))
    signal_offset += q * world_size * 4
    if local < send_programs:
        if CREDITS:
            _wait_peers(peer_bases_ptr, credit_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch - 1, epoch,
                        PHASE_COMBINE_CREDIT, max_polls, 0, 0, BLOCK_R)
        if PARTS > 1:  # range q of every source: rows [first[s], first[s] + lens[s])
            first = tl.load(part_rows_ptr + offs_r * (PARTS + 1) + q, mask=mask_r, other=0)
            lens = tl.load(part_rows_ptr + offs_r * (PARTS + 1) + q + 1, mask=mask_r, other=0) - first
        else:
            first = tl.zeros([BLOCK_R], tl.int32)
            lens = tl.where(offs_r == 0, tl.load(num_recv_ptr), 0)
        ends = tl.cumsum(lens, axis=0)
        total = tl.sum(lens, axis=0)
        shift = first - ends + lens  # row = n + shift[s] for the n-th row of the ranges taken in turn
        offs_rows = tl.arange(0, ROWS)
        for start_n in range(local * ROWS, total, send_programs * ROWS):  # ROWS rows at once
            n = start_n + offs_rows
            mask_rows = n < total
            n = _rotated(n, total, rank, world_size)
            seg = tl.sum((ends[None, :] <= n[:, None]).to(tl.int32), axis=1)
            rows = n + tl.sum(tl.where(offs_r[None, :] == seg[:, None], shift[None, :], 0), axis=1)
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
        # One arrival counter per range (lane 0), then range q's signal to every rank.
        last = _arrive(counters_ptr + SEND_ARRIVALS + q + offs_r * 0, offs_r == 0, send_programs)
        _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r,
                      _mask_if(mask_r, tl.max(last.to(tl.int32), axis=0) > 0), epoch)
    else:
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                    PHASE_COMBINE_RECV, max_polls, 0, 0, BLOCK_R)
        base = _peer_ptr(peer_bases_ptr, rank, x_offset, tl.bfloat16)
        per_range = tl.cdiv(num_tokens, PARTS)
        for t in range(q * per_range + local - send_programs, tl.minimum((q + 1) * per_range, num_tokens),
                       reduce_programs):
            sent_to = tl.load(send_mask_ptr + t)
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < HIDDEN
                acc = tl.zeros([BLOCK_H], tl.float32)
                for d in range(0, world_size):
                    sent = ((sent_to >> d) & 1) != 0
                    part = tl.load(_row(base, d * max_tokens + t, HIDDEN, ALIGNED) + offs_h,
                                   mask=_mask_if(mask_h, sent), other=0.0)
                    acc += part.to(tl.float32)
                tl.store(out_ptr + tl.cast(t, tl.int64) * HIDDEN + offs_h, _to_bf16(acc), mask=mask_h)
        if CREDITS:
            last = _arrive(counters_ptr + RECV_ARRIVALS + offs_r, mask_r, reduce_programs * PARTS)
            _signal_peers(peer_bases_ptr, credit_offset, rank, offs_r, last, epoch)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, num_programs)


_launch_combine = Launcher(_combine_kernel)
register(_combine_kernel,
         {**{name: "i32" for name in ("send_programs", "reduce_programs", "num_programs",
                                      "reduce_delay")},
          "y_ptr": "*bf16", "src_ptr": "*i32", "num_recv_ptr": "*i32", "send_mask_ptr": "*i64", "part_rows_ptr": "*i32",
          "out_ptr": "*bf16",
          "peer_bases_ptr": "*i64", "x_offset": "i64", "signal_offset": "i64", "credit_offset": "i64",
          "counters_ptr": "*i32", "status_ptr": "*i32", "rank": "i32", "world_size": "i32",
          "num_tokens": "i32", "max_tokens": "i32", "max_polls": "i32"},
         {"HIDDEN": 7168, "CREDITS": False, "BLOCK_H": 2048, "BLOCK_R": 4, "ALIGNED": True, "ROWS": 1, "PARTS": 1})
register(_combine_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "CREDITS": True, "PARTS": 4})  # HT
register(_combine_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "ROWS": 2})  # rows moved in pairs


def launch_combine(heap, sync, cfg, params, path, y, handle, out) -> None:
    """Send ``y`` ([capacity, hidden] bf16, rows as dispatched) back and sum into ``out``
    ([handle.num_tokens, hidden] bf16) over the ``path`` ("ll" or "ht") of the dispatch.
    Inputs are validated by the caller (``Buffer``). HT: the programs of ``params`` are split
    evenly over the ``cfg.ht_parts`` token ranges."""
    def make():
        ht = path == "ht"
        parts = cfg.ht_parts if ht else 1
        prefix = f"{path}_combine_"
        send_programs = max(1, params.send_programs // parts)
        reduce_programs = max(1, params.reduce_programs // parts)
        return dict(
            peer_bases_ptr=heap.peer_bases, x_offset=heap.offset(prefix + "x"),
            signal_offset=heap.offset(prefix + "signal"), credit_offset=heap.offset(prefix + "credit") if ht else 0,
            counters_ptr=sync.counters(f"combine_{path}"), status_ptr=sync.status, rank=heap.rank,
            world_size=heap.world_size, max_tokens=cfg.ht_tokens if ht else cfg.ll_tokens, max_polls=sync.max_polls,
            HIDDEN=cfg.hidden, CREDITS=ht, send_programs=send_programs, reduce_programs=reduce_programs,
            num_programs=parts * (send_programs + reduce_programs),
            reduce_delay=params.reduce_delay if parts > 1 else 1, BLOCK_H=params.block_h,
            BLOCK_R=triton.next_power_of_2(heap.world_size),
            ALIGNED=cfg.hidden % 8 == 0, ROWS=params.rows, PARTS=parts,  # bf16 rows of 16-byte multiples
            num_warps=params.num_warps)

    static = static_args(heap, ("combine", id(sync), cfg, params, path), make)
    sync.before_launch()
    _launch_combine.launch(
        (static["num_programs"],), static, y_ptr=y, src_ptr=handle.src, num_recv_ptr=handle.num_recv_tokens,
        send_mask_ptr=handle.send_mask, part_rows_ptr=handle.part_rows if path == "ht" else handle.src, out_ptr=out,
        num_tokens=handle.num_tokens)
    sync.after_launch()
