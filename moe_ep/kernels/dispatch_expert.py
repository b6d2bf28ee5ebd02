"""Expert-major dispatch: every (token, expert) pair written straight into its final row.

The outputs are the receive regions themselves (``Buffer.dispatch(..., layout="expert")``):
``x [experts_per_rank, slots, hidden]``, rows ``[0, tokens_per_expert[e])`` of expert e valid, in
order of source rank, then token, then k — the activation format of grouped/masked expert GEMMs
(DeepEP's low-latency dispatch, vLLM's BatchedExperts, SGLang's DEEPEP_LL). No row is copied
after it lands: every sender knows the exact row of each of its pairs before it sends one,
because the ranks first exchange their pair counts per expert.

Protocol (regions ``ex_dispatch_*`` in ``moe_ep.regions``; R = world size, E = experts, h = the
half of every double-buffered region, chosen by the host and alternating call by call; e = the
call's epoch, counted on the device):
  Send programs ``[0, send_programs)``. Program 0 counts this rank's pairs per global expert
  (ids outside [-1, E) are recorded as a bad call and treated as -1), stores the counts into
  ``counts[h, rank, :]`` on every rank and signals ``count_signal[h, rank] = e`` there. Every send
  program then waits until every rank has signalled its counts, so each knows, for each of its
  pairs (t, k) with expert x on rank d, its row on d: the pairs of lower ranks for x, plus this
  rank's pairs for x before (t, k). It stores the token's payload (quantised once per chunk),
  scales, (rank, t), the weight and k into that row of every pair on every destination, and
  arrives on a counter; the last arriver signals ``signal[h, rank] = e`` to every rank. Program 0
  also writes this rank's ``tokens_per_expert`` (each capped at ``slots``; every rank sees every
  count, so each records the same overflow as a bad call, and no sender writes a pair past
  ``slots``) and the source side's copy of ``topk_ids`` / ``topk_weights`` for the combine.
  The receive program (one; in the same launch after the send programs, or alone as the hook of
  ``return_recv_hook``) waits until every rank's ``signal[h, ·]`` holds e. After it, the rows are
  in place.
Why half h is never overwritten while in use: a sender stores into half h of call e + 2 (or of
the next call, when the host hands out the same half again, as a replayed graph does) only after
the receiver has published its counts of that call, i.e. after the receiver itself issued that
call — after, in its stream, everything it did with the rows of call e. So the outputs of a call
stay valid until this rank's dispatch that reuses their half (two dispatches may be in flight).
The count exchange puts every rank in step once per call; the signals carry epochs and only grow,
so nothing is reset between calls (CUDA-graph replays included). Sends have lower program ids
than the receive program and wait only for other ranks' program 0, which waits for no one before
it publishes: no deadlock in the interpreter or on a GPU whose grid is not all resident.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep import _platform
from moe_ep.kernels.dispatch import _check_ids, _expert_histogram, _load_token_chunk, _send_lane, _valid_ids
from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.numerics import E4M3FN, E4M3FNUZ, fp8_format
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (HALF_EPOCHS, INPUT_SLOTS_OVERFLOW,
                                         PHASE_DISPATCH_COUNTS, PHASE_DISPATCH_RECV, SEND_ARRIVALS, _announce_call,
                                         _arrive, _launch_epoch, _mask_if, _peer_ptr, _record_input_error, _row,
                                         _signal_peers, _wait_peers)

# Which programs a launch holds (the RECV_HOOK launch is the receive program alone).
PHASE_ALL = tl.constexpr(0)  # send programs, then the receive program
PHASE_SEND = tl.constexpr(1)  # send programs only (return_recv_hook)
PHASE_RECV = tl.constexpr(2)  # the receive program only (the hook)


@triton.jit
def _publish_counts(topk_ids_ptr, peer_bases_ptr, counts_offset, count_signal_offset, status_ptr, rank, world_size,
                    num_tokens, num_experts, epoch, offs_r, mask_r, TOPK: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_ALL_E: tl.constexpr):
    """Count this rank's pairs per global expert, store the counts into ``counts[rank, :]`` of every
    rank and signal them; record the first id outside [-1, num_experts) as a bad call."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < TOPK
    hist = tl.zeros([BLOCK_ALL_E], tl.int32)
    for start in range(0, num_tokens, BLOCK_T):
        _check_ids(topk_ids_ptr, start, num_tokens, num_experts, status_ptr, epoch, offs_k, mask_k, TOPK, BLOCK_T)
        offs_t = start + tl.arange(0, BLOCK_T)
        mask = (offs_t < num_tokens)[:, None] & mask_k[None, :]
        ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOPK + offs_k[None, :], mask=mask, other=-1).to(tl.int32)
        hist += _expert_histogram(_valid_ids(ids, num_experts), BLOCK_ALL_E)
    offs_e = tl.arange(0, BLOCK_ALL_E)
    for d in range(0, world_size):
        tl.store(_peer_ptr(peer_bases_ptr, d, counts_offset, tl.int32) + rank * num_experts + offs_e, hist,
                 mask=offs_e < num_experts)
    _signal_peers(peer_bases_ptr, count_signal_offset, rank, offs_r, mask_r, epoch)


@triton.jit
def _expert_totals(peer_bases_ptr, counts_offset, out_tokens_per_expert_ptr, status_ptr, rank, world_size,
                  num_experts, slots, epoch, offs_r, mask_r, EXPERTS_PER_RANK: tl.constexpr,
                  BLOCK_ALL_E: tl.constexpr):
    """tokens_per_expert of this rank's experts (each capped at ``slots``), and the first expert of
    any rank with more pairs than ``slots`` recorded as a bad call (every rank records it alike)."""
    offs_e = tl.arange(0, BLOCK_ALL_E)
    mask_e = offs_e < num_experts
    counts = tl.load(_peer_ptr(peer_bases_ptr, rank, counts_offset, tl.int32) + offs_r[:, None] * num_experts
                     + offs_e[None, :], mask=mask_r[:, None] & mask_e[None, :], other=0, volatile=True)
    totals = tl.sum(counts, axis=0)  # [BLOCK_ALL_E] pairs per global expert
    mine = (offs_e >= rank * EXPERTS_PER_RANK) & (offs_e < (rank + 1) * EXPERTS_PER_RANK)
    tl.store(out_tokens_per_expert_ptr + offs_e - rank * EXPERTS_PER_RANK, tl.minimum(totals, slots), mask=mine)
    over = mask_e & (totals > slots)
    if tl.max(over.to(tl.int32)) > 0:
        expert = tl.min(tl.where(over, offs_e, BLOCK_ALL_E))
        _record_input_error(status_ptr, INPUT_SLOTS_OVERFLOW, expert, tl.sum(tl.where(offs_e == expert, totals, 0)),
                            epoch)


@triton.jit
def _pair_slots(topk_ids_ptr, t, ids, peer_bases_ptr, counts_offset, rank, num_experts, offs_r, offs_k, mask_k,
                TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_K]`` slot of each pair (t, k) (``ids``: its valid ids, -1 none) within its expert:
    the pairs of lower ranks for that expert, then this rank's earlier pairs (tokens before t, then
    k before k in t)."""
    valid = ids >= 0
    lower = (offs_r < rank)[:, None] & valid[None, :]  # [BLOCK_R, BLOCK_K]
    slot = tl.sum(tl.load(_peer_ptr(peer_bases_ptr, rank, counts_offset, tl.int32) + offs_r[:, None] * num_experts
                          + tl.maximum(ids, 0)[None, :], mask=lower, other=0, volatile=True), axis=0)
    for start in range(0, t, BLOCK_T):  # the pairs of this rank's tokens before t
        offs_t = start + tl.arange(0, BLOCK_T)
        earlier = tl.load(topk_ids_ptr + offs_t[:, None] * TOPK + offs_k[None, :],
                          mask=(offs_t < t)[:, None] & mask_k[None, :], other=-1).to(tl.int32)  # [BLOCK_T, BLOCK_K]
        earlier = _valid_ids(earlier, num_experts)
        same = (earlier[:, :, None] == ids[None, None, :]) & (earlier[:, :, None] >= 0)  # [BLOCK_T, BLOCK_K, BLOCK_K]
        slot += tl.sum(tl.sum(same.to(tl.int32), axis=0), axis=0)
    before = (ids[:, None] == ids[None, :]) & (offs_k[:, None] < offs_k[None, :]) & valid[:, None]  # k' < k in t
    return slot + tl.sum(before.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=("num_tokens", "num_experts", "slots", "send_programs", "token_parts", "num_programs",
                               "half", "call_word"))
def _dispatch_expert_kernel(
        x_ptr, x_scales_ptr, topk_ids_ptr, topk_weights_ptr, out_tokens_per_expert_ptr, pair_ids_ptr,
        pair_weights_ptr, peer_bases_ptr, x_offset, scales_offset, src_offset, weights_offset, slot_offset,
        counts_offset, count_signal_offset, signal_offset, announce_offset, call_word, counters_ptr, status_ptr,
        rank, world_size, num_tokens, num_experts, slots, half, max_polls,
        HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr, NUM_SCALES: tl.constexpr,
        QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, send_programs, token_parts,
        num_programs,
        PHASE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_ALL_E: tl.constexpr, ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    # x [num_tokens, HIDDEN] bf16, or fp8 with x_scales [num_tokens, NUM_SCALES] when X_FP8
    # topk_ids / topk_weights [num_tokens, TOPK]; out_tokens_per_expert [EXPERTS_PER_RANK] int32
    # pair_ids / pair_weights [num_tokens, TOPK] int32 / float32: this rank's pairs, for the combine
    # regions: this call's half h (offsets chosen by the launcher); rows of EXPERTS_PER_RANK x slots
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    epoch = _half_launch_epoch(counters_ptr, half, PHASE)
    if pid < send_programs and PHASE != PHASE_RECV:
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < TOPK
        if pid == 0:  # this call's number and path, for peers that wait on this rank (see _wait_peers)
            _announce_call(peer_bases_ptr, announce_offset, rank, offs_r, mask_r, call_word)
            _publish_counts(topk_ids_ptr, peer_bases_ptr, counts_offset, count_signal_offset, status_ptr, rank,
                            world_size, num_tokens, num_experts, epoch, offs_r, mask_r, TOPK, BLOCK_T, BLOCK_K,
                            BLOCK_ALL_E)
        _wait_peers(peer_bases_ptr, count_signal_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                    PHASE_DISPATCH_COUNTS, max_polls, announce_offset, call_word, BLOCK_R)
        if pid == 0:
            _expert_totals(peer_bases_ptr, counts_offset, out_tokens_per_expert_ptr, status_ptr, rank, world_size,
                          num_experts, slots, epoch, offs_r, mask_r, EXPERTS_PER_RANK, BLOCK_ALL_E)
        lanes, lane, part = _send_lane(pid, send_programs, token_parts)  # lane sends t = lane (mod lanes)
        for t in range(lane, num_tokens, lanes):
            ids = _valid_ids(tl.load(topk_ids_ptr + t * TOPK + offs_k, mask=mask_k, other=-1).to(tl.int32),
                             num_experts)  # [BLOCK_K]
            weights = tl.load(topk_weights_ptr + t * TOPK + offs_k, mask=mask_k, other=0.0)
            slot = _pair_slots(topk_ids_ptr, t, ids, peer_bases_ptr, counts_offset, rank, num_experts, offs_r, offs_k,
                               mask_k, TOPK, BLOCK_T, BLOCK_K)
            send = (ids >= 0) & (slot < slots)  # [BLOCK_K] pairs that get a row
            dst = tl.maximum(ids, 0) // EXPERTS_PER_RANK
            row = (tl.maximum(ids, 0) % EXPERTS_PER_RANK).to(tl.int64) * slots + slot  # in dst's [E_l * slots]
            if part == 0:  # the pair's (source rank, token), weight and k; this rank's copy of its pairs
                ptr_src = _peer_ptr(peer_bases_ptr, dst, src_offset, tl.int32) + row * 2
                tl.store(ptr_src, tl.zeros_like(slot) + rank, mask=send)
                tl.store(ptr_src + 1, tl.zeros_like(slot) + t, mask=send)
                tl.store(_peer_ptr(peer_bases_ptr, dst, weights_offset, tl.float32) + row, weights, mask=send)
                tl.store(_peer_ptr(peer_bases_ptr, dst, slot_offset, tl.int32) + row, offs_k, mask=send)
                tl.store(pair_ids_ptr + t * TOPK + offs_k, tl.where(send, ids, -1), mask=mask_k)
                tl.store(pair_weights_ptr + t * TOPK + offs_k, weights, mask=mask_k)
            for start in range(part * BLOCK_H, HIDDEN, token_parts * BLOCK_H):
                values, scales, offs_h, mask_h, offs_s, mask_s = _load_token_chunk(
                    x_ptr, x_scales_ptr, t, start, HIDDEN, NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE, BLOCK_H,
                    ALIGNED)
                for k in range(0, TOPK):
                    if tl.sum(tl.where(offs_k == k, send.to(tl.int32), 0)) > 0:
                        dst_k = tl.sum(tl.where(offs_k == k, dst, 0))
                        row_k = tl.sum(tl.where(offs_k == k, row, 0))
                        tl.store(_row(_peer_ptr(peer_bases_ptr, dst_k, x_offset, OUT_DTYPE), row_k, HIDDEN, ALIGNED)
                                 + offs_h, values, mask=mask_h)
                        if NUM_SCALES > 0:
                            tl.store(_peer_ptr(peer_bases_ptr, dst_k, scales_offset, tl.float32) + row_k * NUM_SCALES
                                     + offs_s, scales, mask=mask_s)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r * 0, offs_r == 0, send_programs)
        _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r, _mask_if(mask_r, tl.max(last.to(tl.int32)) > 0),
                      epoch)
    elif PHASE != PHASE_SEND:  # the receive program: every rank's rows of this call have landed
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                    PHASE_DISPATCH_RECV, max_polls, announce_offset, call_word, BLOCK_R)
    if PHASE != PHASE_RECV:
        _finish_half_launch(counters_ptr, epoch, half, num_programs)


@triton.jit
def _half_launch_epoch(counters_ptr, half, PHASE: tl.constexpr):
    """The epoch of a launch over host-alternated halves: in the hook's launch (PHASE_RECV) the
    one its send launch recorded for ``half``, else the next call's (``_launch_epoch``)."""
    if PHASE == PHASE_RECV:
        epoch = tl.load(counters_ptr + HALF_EPOCHS + half, volatile=True)
    else:
        epoch = _launch_epoch(counters_ptr)
    return epoch


@triton.jit
def _finish_half_launch(counters_ptr, epoch, half, num_programs):
    """``_finish_launch`` of a launch over host-alternated halves: the last program also records
    ``epoch`` as the call that used ``half`` last (the hook's launch and the next call of that half
    read it)."""
    arrived = tl.atomic_add(counters_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if arrived == num_programs - 1:
        tl.atomic_xchg(counters_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(counters_ptr + HALF_EPOCHS + half, epoch, sem="relaxed", scope="gpu")
        tl.atomic_xchg(counters_ptr, epoch, sem="release", scope="gpu")


_OFFSETS = ("x_offset", "scales_offset", "src_offset", "weights_offset", "slot_offset", "counts_offset",
            "count_signal_offset", "signal_offset", "announce_offset")
_launch_dispatch_expert = Launcher(_dispatch_expert_kernel)
register(_dispatch_expert_kernel,
         {**{name: "i32" for name in ("rank", "world_size", "num_tokens", "num_experts", "slots", "half", "max_polls",
                                      "send_programs", "token_parts", "num_programs", "call_word")},
          **{name: "i64" for name in _OFFSETS},
          "x_ptr": "*bf16", "x_scales_ptr": "*fp32", "topk_ids_ptr": "*i64", "topk_weights_ptr": "*fp32",
          "out_tokens_per_expert_ptr": "*i32", "pair_ids_ptr": "*i32", "pair_weights_ptr": "*fp32",
          "peer_bases_ptr": "*i64", "counters_ptr": "*i32", "status_ptr": "*i32"},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "NUM_SCALES": 56, "QUANTIZE": True, "X_FP8": False,
          "FP8_FORMAT": E4M3FN.value, "PHASE": 0, "BLOCK_T": 32, "BLOCK_H": 1024, "BLOCK_R": 4, "BLOCK_K": 8, "BLOCK_ALL_E": 256, "ALIGNED": True,
          "OUT_DTYPE": tl.float8e4nv})
register(_dispatch_expert_kernel, {**KERNELS[-1].signature, "topk_ids_ptr": "*i32"},
         {**KERNELS[-1].constexprs, "PHASE": 1})  # send only (return_recv_hook), int32 ids
register(_dispatch_expert_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "PHASE": 2})  # the hook
register(_dispatch_expert_kernel, {**KERNELS[-3].signature, "x_ptr": "*fp8e4b8"},
         {**KERNELS[-3].constexprs, "QUANTIZE": False, "X_FP8": True, "FP8_FORMAT": E4M3FNUZ.value,
          "OUT_DTYPE": tl.float8e4b8})  # MI300X's fp8, pre-quantised input


def launch_dispatch_expert(heap, sync, cfg, params, x, x_scales, topk_ids, topk_weights, out, half: int,
                           phase: int, call_word: int) -> None:
    """The expert-layout dispatch of this rank's tokens (``phase``: PHASE_ALL, PHASE_SEND or
    PHASE_RECV, the hook's launch) into half ``half`` of the ``ex_dispatch_*`` regions, whose views
    ``out`` (an ``ExpertDispatchOutput``) holds; its handle gets this rank's pairs for the combine.
    ``call_word``: the call's number and path (``SyncState.call_word``; the hook's launch passes its
    send launch's).

    ``x`` [T, hidden] bf16, or fp8 with ``x_scales`` [T, hidden // 128] float32;
    ``topk_ids`` [T, topk] int32/int64 (-1: no expert); ``topk_weights`` [T, topk] float32.
    Inputs are validated by the caller (``Buffer``)."""
    prequantized = x_scales is not None
    value_bytes = 1 if cfg.fp8 else 2

    def make():
        world = heap.world_size
        experts = cfg.experts_per_rank(world)
        slots = cfg.slots(world)
        pairs = experts * slots  # rows of one half
        send_programs = params.send_programs if phase != PHASE_RECV.value else 0
        return dict(
            x_offset=heap.offset("ex_dispatch_x") + half * pairs * cfg.hidden * value_bytes,
            scales_offset=heap.offset("ex_dispatch_scales") + half * pairs * cfg.num_scales * 4,
            src_offset=heap.offset("ex_dispatch_src") + half * pairs * 8,
            weights_offset=heap.offset("ex_dispatch_topk_weights") + half * pairs * 4,
            slot_offset=heap.offset("ex_dispatch_topk_slot") + half * pairs * 4,
            counts_offset=heap.offset("ex_dispatch_counts") + half * world * cfg.num_experts * 4,
            count_signal_offset=heap.offset("ex_dispatch_count_signal") + half * world * 4,
            signal_offset=heap.offset("ex_dispatch_signal") + half * world * 4,
            announce_offset=heap.offset("dispatch_calls"),
            peer_bases_ptr=heap.peer_bases, counters_ptr=sync.counters("dispatch_expert"), status_ptr=sync.status,
            rank=heap.rank, world_size=world, num_experts=cfg.num_experts, slots=slots, half=half,
            max_polls=sync.max_polls, HIDDEN=cfg.hidden, TOPK=cfg.topk, EXPERTS_PER_RANK=experts,
            NUM_SCALES=cfg.num_scales, QUANTIZE=cfg.fp8 and not prequantized, X_FP8=prequantized,
            FP8_FORMAT=fp8_format(cfg.dispatch_dtype), send_programs=send_programs, token_parts=params.token_parts,
            num_programs=send_programs + (1 if phase != PHASE_SEND.value else 0), PHASE=phase,
            BLOCK_T=min(params.block_t, 32), BLOCK_H=params.block_h, BLOCK_R=triton.next_power_of_2(world),
            BLOCK_K=triton.next_power_of_2(cfg.topk), BLOCK_ALL_E=triton.next_power_of_2(cfg.num_experts),
            OUT_DTYPE=_platform.kernel_dtype(cfg.dispatch_dtype), num_warps=params.num_warps)

    static = static_args(heap, ("dispatch_expert", id(sync), cfg, params, half, phase, prequantized), make)
    handle = out.handle
    sync.before_launch()
    _launch_dispatch_expert.launch(
        (static["num_programs"],), static, x_ptr=_platform.kernel_arg(x),
        x_scales_ptr=x_scales if prequantized else topk_weights, topk_ids_ptr=topk_ids, topk_weights_ptr=topk_weights,
        out_tokens_per_expert_ptr=out.tokens_per_expert, pair_ids_ptr=handle.pair_ids,
        pair_weights_ptr=handle.pair_weights, num_tokens=x.shape[0], call_word=call_word,
        ALIGNED=(cfg.hidden * value_bytes) % 16 == 0 and x.data_ptr() % 16 == 0)
    sync.after_launch()
