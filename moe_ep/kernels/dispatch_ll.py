"""Low-latency dispatch: one launch packs, quantises, sends and lays out the tokens.

Protocol (regions in ``moe_ep.regions``; R = world size, M = max_tokens_per_rank). Every LL
region is double-buffered: call e uses half ``e % 2``.
  Send programs ``[0, SEND_PROGRAMS)``. Each computes the routing prefix sum over all of this
  rank's tokens (so token t's slot on rank d is the number of earlier tokens bound for d), then
  for each of its tokens (t % SEND_PROGRAMS == pid) loads the row once, quantises it to fp8
  (when asked), and stores payload, scales, local expert ids, weights and the token index
  straight into row ``[rank, slot]`` of every destination's receive regions. It then arrives on
  the per-destination counter; the last sender of each destination stores the row count in
  ``dispatch_count[rank]`` there and signals ``dispatch_signal[rank]`` with the epoch.
  Receive programs, RECV_PARTS per source rank s. Each waits for the signals of sources
  ``0..s`` (its output offset is the sum of their counts) and copies its share of s's rows,
  contiguous in the receive region, into the compact outputs.
  One more program waits for every source and writes ``num_tokens`` and ``tokens_per_expert``.
Reuse without a handshake: half e % 2 is written again by call e + 2, which a sender starts only
after its call e + 1 received from every rank, i.e. after every rank finished call e (stream
order) and so read its half. Outputs are in source-rank order, then token order:
deterministic. Sends have lower program ids than waits, so the launch cannot deadlock in the
interpreter or on a GPU whose grid is not all resident.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep.kernels.common import _copy_span
from moe_ep.kernels.numerics import _quantize_fp8
from moe_ep.kernels.registry import register
from moe_ep.transport.primitives import (PHASE_DISPATCH_RECV, SEND_ARRIVALS, _arrive, _finish_launch,
                                         _launch_epoch, _peer_ptr, _signal_peers, _wait_peers)


@triton.jit
def _send_token(t, rank, is_dst, slot, ids, x_ptr, x_scales_ptr, topk_weights_ptr, send_mask_ptr,
                peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                world_size, max_tokens, experts_per_rank, offs_r, mask_r, offs_k, mask_k,
                HIDDEN: tl.constexpr, TOPK: tl.constexpr, NUM_SCALES: tl.constexpr,
                QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, OUT_DTYPE: tl.constexpr,
                BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr):
    """Store token t into row ``[rank, slot[d]]`` of every destination d where ``is_dst[d]``."""
    mask_d = mask_r & (is_dst > 0)  # [BLOCK_R]
    row = (rank * max_tokens + slot).to(tl.int64)  # [BLOCK_R] row index in each destination
    # Expert ids local to each destination (-1 elsewhere) and their weights (0 elsewhere).
    local = ids[None, :] - offs_r[:, None] * experts_per_rank  # [BLOCK_R, BLOCK_K]
    here = (ids[None, :] >= 0) & (local >= 0) & (local < experts_per_rank)
    weights = tl.load(topk_weights_ptr + t * TOPK + offs_k, mask=mask_k, other=0.0)  # [BLOCK_K]
    mask_rk = mask_d[:, None] & mask_k[None, :]
    ptr_ids = _peer_ptr(peer_bases_ptr, offs_r, ids_offset, tl.int32)[:, None] + row[:, None] * TOPK + offs_k[None, :]
    tl.store(ptr_ids, tl.where(here, local, -1), mask=mask_rk)
    ptr_w = _peer_ptr(peer_bases_ptr, offs_r, weights_offset, tl.float32)[:, None] + row[:, None] * TOPK + offs_k[None, :]
    tl.store(ptr_w, tl.where(here, weights[None, :], 0.0), mask=mask_rk)
    tl.store(_peer_ptr(peer_bases_ptr, offs_r, src_offset, tl.int32) + row, tl.zeros_like(slot) + t, mask=mask_d)
    tl.store(send_mask_ptr + t, tl.sum(tl.where(mask_d, (tl.zeros_like(row) + 1) << offs_r.to(tl.int64), 0), axis=0))
    # Payload, BLOCK_H values at a time: loaded (and quantised) once, stored to each destination.
    for start in range(0, HIDDEN, BLOCK_H):
        offs_h = start + tl.arange(0, BLOCK_H)
        mask_h = offs_h < HIDDEN
        offs_s = start // 128 + tl.arange(0, BLOCK_H // 128)
        mask_s = offs_s < NUM_SCALES
        if QUANTIZE:
            values, scales = _quantize_fp8(tl.load(x_ptr + t * HIDDEN + offs_h, mask=mask_h, other=0.0).to(tl.float32),
                                           BLOCK_H)  # [BLOCK_H] fp8, [BLOCK_H // 128] float32
        else:
            values = tl.load(x_ptr + t * HIDDEN + offs_h, mask=mask_h)
            if X_FP8:
                scales = tl.load(x_scales_ptr + t * NUM_SCALES + offs_s, mask=mask_s, other=0.0)
        for d in range(0, world_size):
            if tl.sum(tl.where(offs_r == d, mask_d.to(tl.int32), 0), axis=0) > 0:
                row_d = tl.sum(tl.where(offs_r == d, row, 0), axis=0)
                ptr_x = _peer_ptr(peer_bases_ptr, d, x_offset, OUT_DTYPE) + row_d * HIDDEN
                if ALIGNED:
                    ptr_x = tl.multiple_of(ptr_x, 16)
                tl.store(ptr_x + offs_h, values, mask=mask_h)
                if NUM_SCALES > 0:
                    ptr_s = _peer_ptr(peer_bases_ptr, d, scales_offset, tl.float32) + row_d * NUM_SCALES
                    tl.store(ptr_s + offs_s, scales, mask=mask_s)


@triton.jit
def _receive_source(src_rank, part, count, out_row, rank, peer_bases_ptr,
                    x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                    out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
                    max_tokens, RECV_PARTS, HIDDEN: tl.constexpr, TOPK: tl.constexpr,
                    NUM_SCALES: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_COPY: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """Copy part ``part`` of the ``count`` rows received from ``src_rank`` (contiguous in the
    receive region) to output rows ``[out_row, out_row + count)``: one flat copy per field."""
    first = (src_rank * max_tokens).to(tl.int64)
    out_row = out_row.to(tl.int64)
    _copy_span(_peer_ptr(peer_bases_ptr, rank, x_offset, OUT_DTYPE) + first * HIDDEN, out_x_ptr + out_row * HIDDEN,
               count * HIDDEN, part, RECV_PARTS, BLOCK_COPY, ALIGNED)
    if NUM_SCALES > 0:
        _copy_span(_peer_ptr(peer_bases_ptr, rank, scales_offset, tl.float32) + first * NUM_SCALES,
                   out_scales_ptr + out_row * NUM_SCALES, count * NUM_SCALES, part, RECV_PARTS, BLOCK_COPY, False)
    _copy_span(_peer_ptr(peer_bases_ptr, rank, ids_offset, tl.int32) + first * TOPK, out_topk_ids_ptr + out_row * TOPK,
               count * TOPK, part, RECV_PARTS, BLOCK_COPY, False)
    _copy_span(_peer_ptr(peer_bases_ptr, rank, weights_offset, tl.float32) + first * TOPK,
               out_topk_weights_ptr + out_row * TOPK, count * TOPK, part, RECV_PARTS, BLOCK_COPY, False)
    # src: (src_rank, token) pairs, rows split between the parts.
    per_part = tl.cdiv(count, RECV_PARTS)
    base_src = _peer_ptr(peer_bases_ptr, rank, src_offset, tl.int32) + first
    for block in range(part * per_part, tl.minimum((part + 1) * per_part, count), BLOCK_COPY // 2):
        offs = block + tl.arange(0, BLOCK_COPY // 2)
        mask = offs < tl.minimum((part + 1) * per_part, count)
        token = tl.load(base_src + offs, mask=mask)
        tl.store(out_src_ptr + (out_row + offs) * 2, tl.zeros_like(token) + src_rank, mask=mask)
        tl.store(out_src_ptr + (out_row + offs) * 2 + 1, token, mask=mask)


@triton.jit
def _dispatch_ll_kernel(
        x_ptr, x_scales_ptr, topk_ids_ptr, topk_weights_ptr,
        out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
        out_num_tokens_ptr, out_tokens_per_expert_ptr, send_mask_ptr,
        peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
        count_offset, signal_offset, counters_ptr, status_ptr,
        rank, world_size, num_tokens, max_tokens, max_polls,
        HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr,
        NUM_SCALES: tl.constexpr, QUANTIZE: tl.constexpr, X_FP8: tl.constexpr,
        SEND_PROGRAMS: tl.constexpr, RECV_PARTS: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_COPY: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, ALIGNED: tl.constexpr):
    # x [num_tokens, HIDDEN] bf16 (or fp8 with x_scales [num_tokens, NUM_SCALES] when X_FP8)
    # topk_ids / topk_weights [num_tokens, TOPK]; outputs [R * max_tokens, ...]; send_mask [num_tokens] int64
    OUT_DTYPE: tl.constexpr = out_x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    # This call's half of every double-buffered region.
    rows_per_half = (world_size * max_tokens).to(tl.int64) * (epoch % 2)
    x_offset += rows_per_half * HIDDEN * (OUT_DTYPE.primitive_bitwidth // 8)
    scales_offset += rows_per_half * NUM_SCALES * 4
    ids_offset += rows_per_half * TOPK * 4
    weights_offset += rows_per_half * TOPK * 4
    src_offset += rows_per_half * 4
    count_offset += (epoch % 2) * world_size * 4
    signal_offset += (epoch % 2) * world_size * 4
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < TOPK
    if pid < SEND_PROGRAMS:
        carry = tl.zeros([BLOCK_R], tl.int32)  # tokens of earlier chunks bound for each rank
        for chunk in range(0, num_tokens, BLOCK_T):
            offs_t = chunk + tl.arange(0, BLOCK_T)
            mask_t = offs_t < num_tokens
            ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOPK + offs_k[None, :],
                          mask=mask_t[:, None] & mask_k[None, :], other=-1).to(tl.int32)  # [BLOCK_T, BLOCK_K]
            dst = tl.where(ids >= 0, ids // EXPERTS_PER_RANK, -1)
            is_dst = tl.max((dst[:, :, None] == offs_r[None, None, :]).to(tl.int32), axis=1)  # [BLOCK_T, BLOCK_R]
            slots = tl.cumsum(is_dst, axis=0) - is_dst + carry[None, :]  # [BLOCK_T, BLOCK_R]
            first = chunk + (pid - chunk % SEND_PROGRAMS + SEND_PROGRAMS) % SEND_PROGRAMS
            for t in range(first, tl.minimum(chunk + BLOCK_T, num_tokens), SEND_PROGRAMS):
                sel = (offs_t == t)[:, None]
                _send_token(t, rank, tl.sum(tl.where(sel, is_dst, 0), axis=0), tl.sum(tl.where(sel, slots, 0), axis=0),
                            tl.sum(tl.where(sel, ids, 0), axis=0), x_ptr, x_scales_ptr, topk_weights_ptr,
                            send_mask_ptr, peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset,
                            src_offset, world_size, max_tokens, EXPERTS_PER_RANK, offs_r, mask_r, offs_k, mask_k,
                            HIDDEN, TOPK, NUM_SCALES, QUANTIZE, X_FP8, OUT_DTYPE, BLOCK_H, ALIGNED)
            carry += tl.sum(is_dst, axis=0)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r, mask_r, SEND_PROGRAMS)
        tl.store(_peer_ptr(peer_bases_ptr, offs_r, count_offset + rank * 4, tl.int32), carry, mask=last)
        _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r, last, epoch)
    else:
        j = pid - SEND_PROGRAMS
        meta = j == world_size * RECV_PARTS  # the program that writes num_tokens / tokens_per_expert
        src_rank = tl.where(meta, world_size - 1, j // RECV_PARTS)
        part = j % RECV_PARTS
        mask_wait = mask_r & (offs_r <= src_rank)
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, mask_wait, epoch, epoch,
                    PHASE_DISPATCH_RECV, max_polls, BLOCK_R)
        counts = tl.load(_peer_ptr(peer_bases_ptr, rank, count_offset, tl.int32) + offs_r, mask=mask_wait,
                         other=0, volatile=True)  # [BLOCK_R] rows from each source
        if meta:
            tl.store(out_num_tokens_ptr, tl.sum(counts, axis=0))
            offs_e = tl.arange(0, BLOCK_E)
            hist = tl.zeros([BLOCK_E], tl.int32)
            base_ids = _peer_ptr(peer_bases_ptr, rank, ids_offset, tl.int32)
            for s in range(0, world_size):
                count_s = tl.sum(tl.where(offs_r == s, counts, 0), axis=0)
                for start in range(0, count_s, BLOCK_T):
                    offs_t = start + tl.arange(0, BLOCK_T)
                    mask_tk = (offs_t < count_s)[:, None] & mask_k[None, :]
                    ids = tl.load(base_ids + (s * max_tokens + offs_t)[:, None] * TOPK + offs_k[None, :],
                                  mask=mask_tk, other=-1)  # [BLOCK_T, BLOCK_K]
                    flat = tl.reshape(ids, (BLOCK_T * BLOCK_K,))
                    hist += tl.histogram(tl.maximum(flat, 0), BLOCK_E, mask=flat >= 0).to(tl.int32)
            tl.store(out_tokens_per_expert_ptr + offs_e, hist, mask=offs_e < EXPERTS_PER_RANK)
        else:
            offset = tl.sum(tl.where(offs_r < src_rank, counts, 0), axis=0)
            count = tl.sum(tl.where(offs_r == src_rank, counts, 0), axis=0)
            _receive_source(src_rank, part, count, offset, rank, peer_bases_ptr, x_offset, scales_offset,
                            ids_offset, weights_offset, src_offset, out_x_ptr, out_scales_ptr, out_topk_ids_ptr,
                            out_topk_weights_ptr, out_src_ptr, max_tokens, RECV_PARTS, HIDDEN, TOPK, NUM_SCALES,
                            OUT_DTYPE, BLOCK_COPY, ALIGNED)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, NUM_PROGRAMS)


_POINTERS = ("x_ptr", "x_scales_ptr", "topk_ids_ptr", "topk_weights_ptr", "out_x_ptr", "out_scales_ptr",
             "out_topk_ids_ptr", "out_topk_weights_ptr", "out_src_ptr", "out_num_tokens_ptr",
             "out_tokens_per_expert_ptr", "send_mask_ptr", "peer_bases_ptr", "counters_ptr", "status_ptr")
_POINTER_TYPES = ("*bf16", "*fp32", "*i64", "*fp32", "*fp8e4nv", "*fp32", "*i32", "*fp32", "*i32", "*i32",
                  "*i32", "*i64", "*i64", "*i32", "*i32")
register(_dispatch_ll_kernel,
         {**dict(zip(_POINTERS, _POINTER_TYPES)),
          **{name: "i64" for name in ("x_offset", "scales_offset", "ids_offset", "weights_offset", "src_offset",
                                      "count_offset", "signal_offset")},
          **{name: "i32" for name in ("rank", "world_size", "num_tokens", "max_tokens", "max_polls")}},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "NUM_SCALES": 56, "QUANTIZE": True, "X_FP8": False,
          "SEND_PROGRAMS": 64, "RECV_PARTS": 8, "NUM_PROGRAMS": 64 + 4 * 8 + 1, "BLOCK_T": 128, "BLOCK_H": 8192,
          "BLOCK_COPY": 8192, "BLOCK_R": 4, "BLOCK_K": 8, "BLOCK_E": 64, "ALIGNED": True})


def launch_dispatch_ll(heap, sync, cfg, params, x, x_scales, topk_ids, topk_weights, out) -> None:
    """Launch the LL dispatch of this rank's tokens into ``out`` (a ``DispatchOutput``).

    ``x`` [T, hidden] bf16, or fp8 with ``x_scales`` [T, hidden // 128] float32;
    ``topk_ids`` [T, topk] int32/int64 (-1: no expert); ``topk_weights`` [T, topk] float32.
    Inputs are validated by the caller (``Buffer``).
    """
    world = heap.world_size
    num_tokens = x.shape[0]
    experts_per_rank = cfg.experts_per_rank(world)
    x_fp8 = x_scales is not None
    num_programs = params.send_programs + world * params.recv_parts + 1
    sync.before_launch()
    _dispatch_ll_kernel[(num_programs,)](
        x_ptr=x, x_scales_ptr=x_scales if x_scales is not None else out.topk_weights,
        topk_ids_ptr=topk_ids, topk_weights_ptr=topk_weights,
        out_x_ptr=out.x, out_scales_ptr=out.x_scales if out.x_scales is not None else out.topk_weights,
        out_topk_ids_ptr=out.topk_ids, out_topk_weights_ptr=out.topk_weights, out_src_ptr=out.src,
        out_num_tokens_ptr=out.num_tokens, out_tokens_per_expert_ptr=out.tokens_per_expert,
        send_mask_ptr=out.handle.send_mask, peer_bases_ptr=heap.peer_bases,
        x_offset=heap.offset("dispatch_x"), scales_offset=heap.offset("dispatch_scales"),
        ids_offset=heap.offset("dispatch_topk_ids"), weights_offset=heap.offset("dispatch_topk_weights"),
        src_offset=heap.offset("dispatch_src_token"), count_offset=heap.offset("dispatch_count"),
        signal_offset=heap.offset("dispatch_signal"),
        counters_ptr=sync.counters("dispatch"), status_ptr=sync.status,
        rank=heap.rank, world_size=world, num_tokens=num_tokens, max_tokens=cfg.max_tokens_per_rank,
        max_polls=sync.max_polls,
        HIDDEN=cfg.hidden, TOPK=cfg.topk, EXPERTS_PER_RANK=experts_per_rank, NUM_SCALES=cfg.num_scales,
        QUANTIZE=cfg.fp8 and not x_fp8, X_FP8=x_fp8,
        SEND_PROGRAMS=params.send_programs, RECV_PARTS=params.recv_parts, NUM_PROGRAMS=num_programs,
        BLOCK_T=params.block_t, BLOCK_H=params.block_h, BLOCK_COPY=params.block_copy,
        BLOCK_R=triton.next_power_of_2(world), ALIGNED=(cfg.hidden * out.x.element_size()) % 16 == 0,
        BLOCK_K=triton.next_power_of_2(cfg.topk), BLOCK_E=triton.next_power_of_2(experts_per_rank),
        num_warps=params.num_warps)
    sync.after_launch()
