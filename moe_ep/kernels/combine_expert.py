"""Expert-major combine: expert outputs ``[experts_per_rank, slots, hidden]`` back to their tokens.

Protocol (regions ``ex_combine_*`` and the dispatch's ``ex_dispatch_src`` / ``ex_dispatch_topk_slot``
in ``moe_ep.regions``; R = world size, c = the half of the combine regions, chosen by the host and
alternating call by call; h = the half of the dispatch this combine answers; e = the call's epoch):
  Send programs ``[0, send_programs)`` first wait until every rank's credit
  (``credit[d]``, written by rank d) holds the epoch of the previous call that used half c: d has
  summed what it received then. They walk this rank's valid rows (expert x, rows
  ``[0, tokens_per_expert[x])``), ``rows`` at a time and program i taking the i-th of them in turn,
  rank r starting about r + 1 R-ths into the list so that the ranks start on different experts;
  each row, the output of pair (t, k) of source rank s (``src`` and ``topk_slot`` of the dispatch),
  is stored into row ``[c, t, k]`` of ``combine_x`` on s. Each program arrives on a counter; the
  last one signals ``signal[c, rank] = e`` to every rank.
  Reduce programs (after the send programs in the same launch, or alone as the hook of
  ``return_recv_hook``) wait until every rank has signalled e, then each sums its share of this
  rank's tokens: over k = 0 .. topk - 1 in order, skipping k whose pair went nowhere, the float32
  ``w[t, k] * y`` (WEIGHTED; the product rounded first: compiled without fp fusion) or ``y``, then
  rounds to bfloat16 — the order of ``moe_ep.reference.combine_expert``, so results are bitwise
  reproducible. The last reduce program gives every rank its credit (``credit[rank] = e``).
A token's pairs land in distinct rows ([t, k]), so no two ranks write one row. Sends come before
waits in program order, and a send program waits only for credits of earlier calls: no deadlock
in the interpreter or on a GPU whose grid is not all resident.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep.kernels.combine import _rotated
from moe_ep.kernels.dispatch_expert import PHASE_RECV, PHASE_SEND, _finish_half_launch, _half_launch_epoch
from moe_ep.kernels.numerics import _to_bf16
from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (HALF_EPOCHS, PHASE_COMBINE_CREDIT, PHASE_COMBINE_RECV, RECV_ARRIVALS,
                                         SEND_ARRIVALS, _arrive, _mask_if, _peer_ptr, _row,
                                         _signal_peers, _wait_peers)


@triton.jit(do_not_specialize=("num_tokens", "slots", "half", "send_programs", "reduce_programs", "num_programs"))
def _combine_expert_kernel(
        y_ptr, tokens_per_expert_ptr, pair_ids_ptr, pair_weights_ptr, out_ptr, peer_bases_ptr, src_offset,
        slot_offset, x_offset, signal_offset, credit_offset, counters_ptr, status_ptr,
        rank, world_size, num_tokens, slots, half, max_polls,
        HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr, WEIGHTED: tl.constexpr,
        send_programs, reduce_programs, num_programs, PHASE: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ALIGNED: tl.constexpr):
    # y [EXPERTS_PER_RANK, slots, HIDDEN] bf16; tokens_per_expert [EXPERTS_PER_RANK] int32 (the dispatch's)
    # pair_ids / pair_weights [num_tokens, TOPK] int32 / float32 (this rank's pairs, -1: none)
    # out [num_tokens, HIDDEN] bf16; regions: this call's halves (offsets chosen by the launcher)
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    epoch = _half_launch_epoch(counters_ptr, half, PHASE)
    if pid < send_programs and PHASE != PHASE_RECV:
        previous = tl.load(counters_ptr + HALF_EPOCHS + half, volatile=True)  # the last call of this half
        _wait_peers(peer_bases_ptr, credit_offset, status_ptr, rank, offs_r, offs_r, mask_r, previous, epoch,
                    PHASE_COMBINE_CREDIT, max_polls, 0, 0, BLOCK_R)
        offs_e = tl.arange(0, BLOCK_E)
        counts = tl.load(tokens_per_expert_ptr + offs_e, mask=offs_e < EXPERTS_PER_RANK, other=0)  # [BLOCK_E]
        ends = tl.cumsum(counts, axis=0)
        total = tl.sum(counts, axis=0)
        offs_rows = tl.arange(0, ROWS)
        for start_n in range(pid * ROWS, total, send_programs * ROWS):
            n = start_n + offs_rows
            mask_rows = n < total
            n = _rotated(n, total, rank, world_size)
            expert = tl.sum((ends[None, :] <= n[:, None]).to(tl.int32), axis=1)  # [ROWS]
            first = tl.sum(tl.where(offs_e[None, :] == expert[:, None], ends - counts, 0), axis=1)
            row = expert.to(tl.int64) * slots + (n - first)  # [ROWS] in [EXPERTS_PER_RANK * slots]
            ptr_src = _peer_ptr(peer_bases_ptr, rank, src_offset, tl.int32) + row * 2
            src_rank = tl.load(ptr_src, mask=mask_rows, other=0)
            token = tl.load(ptr_src + 1, mask=mask_rows, other=0)
            k = tl.load(_peer_ptr(peer_bases_ptr, rank, slot_offset, tl.int32) + row, mask=mask_rows, other=0)
            ptr_dst = _row(_peer_ptr(peer_bases_ptr, src_rank, x_offset, tl.bfloat16), token * TOPK + k, HIDDEN,
                           ALIGNED)
            ptr_y = _row(y_ptr, row, HIDDEN, ALIGNED)
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask = mask_rows[:, None] & (offs_h < HIDDEN)[None, :]
                tl.store(ptr_dst[:, None] + offs_h[None, :], tl.load(ptr_y[:, None] + offs_h[None, :], mask=mask),
                         mask=mask)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r * 0, offs_r == 0, send_programs)
        _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r, _mask_if(mask_r, tl.max(last.to(tl.int32)) > 0),
                      epoch)
    elif PHASE != PHASE_SEND:
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                    PHASE_COMBINE_RECV, max_polls, 0, 0, BLOCK_R)
        base = _peer_ptr(peer_bases_ptr, rank, x_offset, tl.bfloat16)  # [num_tokens * TOPK, HIDDEN] received
        for t in range(pid - send_programs, num_tokens, reduce_programs):
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < HIDDEN
                acc = tl.zeros([BLOCK_H], tl.float32)
                for k in range(0, TOPK):
                    if tl.load(pair_ids_ptr + t * TOPK + k) >= 0:
                        part = tl.load(_row(base, t * TOPK + k, HIDDEN, ALIGNED) + offs_h, mask=mask_h,
                                       other=0.0).to(tl.float32)
                        if WEIGHTED:
                            part = part * tl.load(pair_weights_ptr + t * TOPK + k)
                        acc += part
                tl.store(out_ptr + tl.cast(t, tl.int64) * HIDDEN + offs_h, _to_bf16(acc), mask=mask_h)
        last = _arrive(counters_ptr + RECV_ARRIVALS + offs_r * 0, offs_r == 0, reduce_programs)
        _signal_peers(peer_bases_ptr, credit_offset, rank, offs_r, _mask_if(mask_r, tl.max(last.to(tl.int32)) > 0),
                      epoch)
    if PHASE != PHASE_RECV:
        _finish_half_launch(counters_ptr, epoch, half, num_programs)


# Compiled without fp fusion: w * y and the sum round separately, as torch (the reference) does.
_OPTIONS = {"enable_fp_fusion": False}
_launch_combine_expert = Launcher(_combine_expert_kernel)
register(_combine_expert_kernel,
         {**{name: "i32" for name in ("rank", "world_size", "num_tokens", "slots", "half", "max_polls",
                                      "send_programs", "reduce_programs", "num_programs")},
          **{name: "i64" for name in ("src_offset", "slot_offset", "x_offset", "signal_offset", "credit_offset")},
          "y_ptr": "*bf16", "tokens_per_expert_ptr": "*i32", "pair_ids_ptr": "*i32", "pair_weights_ptr": "*fp32",
          "out_ptr": "*bf16", "peer_bases_ptr": "*i64", "counters_ptr": "*i32", "status_ptr": "*i32"},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "WEIGHTED": True, "PHASE": 0, "ROWS": 1,
          "BLOCK_H": 2048, "BLOCK_R": 4, "BLOCK_E": 64, "ALIGNED": True}, options=_OPTIONS)
register(_combine_expert_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "PHASE": 1, "WEIGHTED": False},
         options=_OPTIONS)  # send only (return_recv_hook)
register(_combine_expert_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "PHASE": 2}, options=_OPTIONS)


def launch_combine_expert(heap, sync, cfg, params, y, handle, out, half: int, weighted: bool, phase: int) -> None:
    """Send ``y`` ([experts_per_rank, slots, hidden] bf16, the dispatch's rows) back and sum into
    ``out`` ([handle.num_tokens, hidden] bf16) through half ``half`` of the ``ex_combine_*`` regions
    (``phase``: PHASE_ALL, PHASE_SEND or PHASE_RECV, the hook's launch). Inputs are validated by
    the caller (``Buffer``)."""
    def make():
        world = heap.world_size
        experts = cfg.experts_per_rank(world)
        pairs = experts * cfg.slots(world)  # rows of one half of the dispatch's regions
        return dict(
            peer_bases_ptr=heap.peer_bases, src_offset=heap.offset("ex_dispatch_src") + handle.half * pairs * 8,
            slot_offset=heap.offset("ex_dispatch_topk_slot") + handle.half * pairs * 4,
            x_offset=heap.offset("ex_combine_x") + half * cfg.expert_tokens * cfg.topk * cfg.hidden * 2,
            signal_offset=heap.offset("ex_combine_signal") + half * world * 4,
            credit_offset=heap.offset("ex_combine_credit"), counters_ptr=sync.counters("combine_expert"),
            status_ptr=sync.status, rank=heap.rank, world_size=world, slots=cfg.slots(world), half=half,
            max_polls=sync.max_polls, HIDDEN=cfg.hidden, TOPK=cfg.topk, EXPERTS_PER_RANK=experts, WEIGHTED=weighted,
            PHASE=phase, ROWS=params.rows, BLOCK_H=params.block_h, BLOCK_R=triton.next_power_of_2(world),
            BLOCK_E=triton.next_power_of_2(experts), num_warps=params.num_warps, options=_OPTIONS)

    static = static_args(heap, ("combine_expert", id(sync), cfg, params, handle.half, half, weighted, phase), make)
    send_programs = params.send_programs if phase != PHASE_RECV.value else 0
    reduce_programs = max(1, min(params.reduce_programs, handle.num_tokens))
    num_programs = send_programs + (reduce_programs if phase != PHASE_SEND.value else 0)
    sync.before_launch()
    _launch_combine_expert.launch(
        (num_programs,), static, y_ptr=y, tokens_per_expert_ptr=handle.tokens_per_expert,
        pair_ids_ptr=handle.pair_ids, pair_weights_ptr=handle.pair_weights, out_ptr=out, num_tokens=handle.num_tokens,
        send_programs=send_programs, reduce_programs=reduce_programs, num_programs=num_programs,
        ALIGNED=cfg.hidden % 8 == 0 and y.data_ptr() % 16 == 0)
    sync.after_launch()
