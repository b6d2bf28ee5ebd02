"""Dispatch: send each token to the ranks that hold its experts, lay the rows out compactly.

This file holds the LL (low latency) dispatch kernel, the pieces the other dispatch kernels share
(routing, sending a token, laying received rows out), and the HT stage kernel:
  LL: one launch. Every send program computes the routing prefix sum itself and quantises its
     own tokens while sending them. LL regions are double-buffered (call e uses half e % 2), so
     no handshake is needed between calls.
  HT stage (``_dispatch_stage_kernel``): the whole GPU computes the routing layout once (each
     token's slot on each destination, the counts, send_mask, the rows of each token range) and
     quantises every token once into a local staging buffer, for the HT dispatch
     (``kernels/dispatch_ht.py``) and the inter-node path's HT variant (``kernels/internode.py``).

LL protocol (regions in ``moe_ep.regions``; R = world size, M = ``cfg.ll_tokens``):
  Send programs ``[0, send_programs)``. For each of its tokens (t % send_programs == pid) a
  program loads the row once and stores payload, scales, local expert ids, weights and the token
  index straight into row ``[rank, slot]`` of every destination's receive regions, slot being
  the number of earlier tokens bound there. It then arrives on the per-destination counter; the
  last sender of each destination stores the row count in ``count[rank]`` there, and the
  destination's slice of this rank's tokens per expert in ``expert_counts[rank, :]`` (every
  send program counts all tokens while it lays them out), then signals ``signal[rank]`` with
  the epoch.
  Receive programs, recv_parts per source rank s. Each waits for the signals of sources
  ``0..s`` (its output offset is the sum of their counts) and copies its share of s's rows,
  contiguous in the receive region, into the compact outputs.
  One more program waits for every source and writes ``num_tokens`` and ``tokens_per_expert``
  (the sum over sources of ``expert_counts``).
Why LL needs no handshake: half e % 2 is written again by LL call e + 2, which a sender starts
only after its call e + 1 received from every rank, i.e. after every rank finished call e
(stream order) and so read its half. Each path counts its own epochs.
Outputs are in source-rank order, then token order: deterministic. Sends have lower program
ids than waits, and senders wait for no one in the call, so a launch cannot deadlock in the
interpreter or on a GPU whose grid is not all resident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from moe_ep import _platform
from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.numerics import E4M3FN, E4M3FNUZ, _quantize_fp8, fp8_format
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (INPUT_BAD_EXPERT_ID, PHASE_DISPATCH_RECV, SEND_ARRIVALS, _announce_call,
                                         _arrive, _copy_span, _finish_launch, _launch_epoch, _mask_if, _peer_ptr,
                                         _record_input_error, _row, _signal_peers, _wait_peers)


@triton.jit
def _bits(mask_r, offs_r):
    """``[BLOCK_R]`` bools -> one int64 with bit r set where ``mask_r[r]``."""
    return tl.sum(tl.where(mask_r, tl.full(offs_r.shape, 1, tl.int64) << offs_r.to(tl.int64), 0), axis=0)


@triton.jit
def _valid_ids(ids, num_experts):
    """Expert ids with every id outside [0, num_experts) set to -1 (none): the kernels route no
    pair of an id out of range (the program that checks the ids records it: ``_check_ids``)."""
    return tl.where((ids >= 0) & (ids < num_experts), ids, -1)


@triton.jit
def _check_ids(topk_ids_ptr, start, num_tokens, num_experts, status_ptr, epoch, offs_k, mask_k, TOPK: tl.constexpr,
               BLOCK_T: tl.constexpr):
    """Record the first id of tokens ``[start, start + BLOCK_T)`` outside [-1, num_experts) as a bad
    call (``moe_ep.BadCallError`` at the host's next check), with its token."""
    offs_t = start + tl.arange(0, BLOCK_T)
    mask = (offs_t < num_tokens)[:, None] & mask_k[None, :]
    ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOPK + offs_k[None, :], mask=mask, other=-1)
    bad = mask & ((ids < -1) | (ids >= num_experts))  # [BLOCK_T, BLOCK_K]
    if tl.max(bad.to(tl.int32)) > 0:
        at = offs_t[:, None] * TOPK + offs_k[None, :]  # [BLOCK_T, BLOCK_K] position of each id
        first = tl.min(tl.where(bad, at, 2**31 - 1))
        value = tl.sum(tl.where(at == first, ids, 0)).to(tl.int32)  # (int64 ids: the low 32 bits)
        _record_input_error(status_ptr, INPUT_BAD_EXPERT_ID, value, first // TOPK, epoch)


@triton.jit
def _route_block(topk_ids_ptr, start, num_tokens, offs_r, offs_k, mask_k, TOPK: tl.constexpr,
                 EXPERTS_PER_RANK: tl.constexpr, BLOCK_T: tl.constexpr, num_experts):
    """Tokens ``[start, start + BLOCK_T)``: returns (offs_t, ids [BLOCK_T, BLOCK_K] int32 with -1
    past the end and for ids outside [0, num_experts), is_dst [BLOCK_T, BLOCK_R] int32: 1 where a
    rank holds one of the token's experts)."""
    offs_t = start + tl.arange(0, BLOCK_T)
    ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOPK + offs_k[None, :],
                  mask=(offs_t < num_tokens)[:, None] & mask_k[None, :], other=-1).to(tl.int32)
    ids = _valid_ids(ids, num_experts)
    dst = tl.where(ids >= 0, ids // EXPERTS_PER_RANK, -1)
    is_dst = tl.max((dst[:, :, None] == offs_r[None, None, :]).to(tl.int32), axis=1)
    return offs_t, ids, is_dst


@triton.jit
def _route_counts(topk_ids_ptr, start, num_tokens, offs_r, offs_k, mask_k, TOPK: tl.constexpr,
                  EXPERTS_PER_RANK: tl.constexpr, BLOCK_T: tl.constexpr, num_experts):
    """``_route_block``'s is_dst for tokens ``[start, min(start + BLOCK_T, num_tokens))``, for sums
    over large blocks: a token's destinations as one OR-reduced word (no [BLOCK_T, BLOCK_K,
    BLOCK_R] tile). (Not for a tl.cumsum: Triton 3.6 fails to lower a scan over this layout
    when the ids are int32.)"""
    offs_t = start + tl.arange(0, BLOCK_T)
    ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOPK + offs_k[None, :],
                  mask=(offs_t < num_tokens)[:, None] & mask_k[None, :], other=-1).to(tl.int32)
    ids = _valid_ids(ids, num_experts)
    one_hot = tl.where(ids >= 0, tl.full(ids.shape, 1, tl.int64) << (tl.maximum(ids, 0) // EXPERTS_PER_RANK), 0)
    bits = tl.reduce(one_hot, 1, _bit_or)  # [BLOCK_T] int64: bit d set where rank d holds an expert
    return ((bits[:, None] >> offs_r[None, :].to(tl.int64)) & 1).to(tl.int32)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _staged_histogram(block_hist_ptr, num_tokens, NUM_EXPERTS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_ALL_E: tl.constexpr):
    """The stage kernel's per-block counts (``HtStaging.block_hist``) summed: ``[BLOCK_ALL_E]``
    (token, k) pairs per global expert of this rank's ``num_tokens`` tokens."""
    offs_e = tl.arange(0, BLOCK_ALL_E)
    offs_b = tl.arange(0, 16)
    blocks = tl.cdiv(num_tokens, BLOCK_T)
    hist = tl.zeros([BLOCK_ALL_E], tl.int32)
    for first in range(0, blocks, 16):
        rows = first + offs_b
        hist += tl.sum(tl.load(block_hist_ptr + rows[:, None] * NUM_EXPERTS + offs_e[None, :],
                               mask=(rows < blocks)[:, None] & (offs_e < NUM_EXPERTS)[None, :], other=0), axis=0)
    return hist


@triton.jit
def _send_lane(pid, send_programs, token_parts):
    """token_parts send programs share each token (a lane), each its part of the token's chunks:
    (lanes, this program's lane, its part)."""
    return send_programs // token_parts, pid // token_parts, pid % token_parts


@triton.jit
def _publish_expert_counts(peer_bases_ptr, expert_counts_offset, rank, hist, last, world_size,
                           EXPERTS_PER_RANK: tl.constexpr):
    """Store, for each destination d where ``last[d]``, its slice of ``hist`` (this rank's
    tokens per global expert, ``[BLOCK_ALL_E]``) into ``expert_counts[rank, :]`` on d."""
    offs_all = tl.arange(0, hist.shape[0])
    for d in range(0, world_size):
        if tl.sum(tl.where(tl.arange(0, last.shape[0]) == d, last.to(tl.int32), 0), axis=0) > 0:
            local = offs_all - d * EXPERTS_PER_RANK
            ptr = _peer_ptr(peer_bases_ptr, d, expert_counts_offset, tl.int32) + rank * EXPERTS_PER_RANK + local
            tl.store(ptr, hist, mask=(local >= 0) & (local < EXPERTS_PER_RANK))


@triton.jit
def _expert_histogram(ids, BLOCK_ALL_E: tl.constexpr):
    """``[BLOCK_T, BLOCK_K]`` global expert ids (-1: none) -> ``[BLOCK_ALL_E]`` counts per expert."""
    flat = tl.reshape(ids, (ids.shape[0] * ids.shape[1],))
    return tl.histogram(tl.maximum(flat, 0), BLOCK_ALL_E, mask=flat >= 0).to(tl.int32)


@triton.jit
def _nodes_hit(is_dst, offs_r, offs_n, my_node, GPUS_PER_NODE: tl.constexpr, NUM_NODES: tl.constexpr):
    """``[BLOCK_T, BLOCK_R]`` destination flags -> ``[BLOCK_T, BLOCK_N]`` int32: 1 where a node
    other than ``my_node`` holds one of the token's experts."""
    node_of = (offs_r // GPUS_PER_NODE)[None, :, None] == offs_n[None, None, :]  # [1, BLOCK_R, BLOCK_N]
    is_node = tl.max(((is_dst[:, :, None] > 0) & node_of).to(tl.int32), axis=1)
    return tl.where(((offs_n < NUM_NODES) & (offs_n != my_node))[None, :], is_node, 0)


@triton.jit
def _token_range(q, num_tokens, RANGES: tl.constexpr):
    """Tokens ``[lo, hi)`` of range q of the RANGES ranges of a rank's ``num_tokens`` tokens
    (range q starts at token min(q * cdiv(num_tokens, RANGES), num_tokens)); q may be a vector."""
    per_range = tl.cdiv(num_tokens, RANGES)
    return tl.minimum(q * per_range, num_tokens), tl.minimum((q + 1) * per_range, num_tokens)


@triton.jit
def _store_range_rows(range_rows_ptr, first, offs_t, is_dst, carry, last_block, num_tokens, offs_r, mask_r,
                      RANGES: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token block ``offs_t`` (from token ``first``; ``is_dst`` [BLOCK_T, BLOCK_R], ``carry``
    [BLOCK_R] the rows bound for each rank ahead of the block): store ``range_rows[d, q]``
    (row-major [R, RANGES + 1]), the rows bound for rank d ahead of range q's first token, for
    each range q that starts in the block, and (``last_block``) for every boundary at the end,
    q = RANGES included. (From is_dst, not from its prefix sum: a reduction of the scan's result
    changes its layout, which Triton 3.6 then fails to lower for int32 ids.)"""
    for q in tl.static_range(RANGES + 1):
        start, _ = _token_range(q, num_tokens, RANGES)  # the range's first token
        rows = carry + tl.sum(tl.where((offs_t < start)[:, None], is_dst, 0), axis=0)  # [BLOCK_R]
        here = ((first <= start) & (start < first + BLOCK_T) & (start < num_tokens)) | \
            (last_block & (start >= num_tokens))
        tl.store(range_rows_ptr + offs_r * (RANGES + 1) + q, rows, mask=_mask_if(mask_r, here))


@triton.jit(do_not_specialize=("num_tokens",))
def _dispatch_stage_kernel(x_ptr, topk_ids_ptr, staging_x_ptr, staging_scales_ptr, slots_ptr, counts_ptr,
                           block_hist_ptr, send_mask_ptr, node_slots_ptr, node_counts_ptr, range_rows_ptr,
                           counters_ptr, status_ptr, rank, world_size, num_tokens, HIDDEN: tl.constexpr, TOPK: tl.constexpr,
                           EXPERTS_PER_RANK: tl.constexpr, NUM_SCALES: tl.constexpr, QUANTIZE: tl.constexpr,
                           FP8_FORMAT: tl.constexpr, GPUS_PER_NODE: tl.constexpr, NUM_NODES: tl.constexpr,
                           RANGES: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ALL_E: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_SCAN: tl.constexpr):
    """HT staging, with the whole GPU: program p lays out the blocks of BLOCK_T tokens b = p (mod
    programs) (slots [T, R] int32, -1 where the rank gets nothing; send_mask [T] int64;
    block_hist [blocks, num_experts] int32, each block's (token, k) pairs per expert, which the
    dispatch sums (``_staged_histogram``); the last block also counts [R] int32; across nodes
    (NUM_NODES > 1) also
    node_slots [T, N] int32, the token's row among those bound for each other node (-1: none),
    and, last block, node_counts [N]; RANGES > 0: range_rows [R, RANGES + 1] int32, row d holding
    where each of the RANGES token ranges starts among the rows bound for rank d, then their
    count — ``_store_range_rows``); every program quantises tokens t % num_programs == pid
    into staging_x [T, HIDDEN] fp8 of FP8_FORMAT and staging_scales [T, NUM_SCALES] float32 (when
    QUANTIZE). Ids outside [-1, num_experts) route nowhere and are recorded as a bad call of the
    dispatch that follows (``counters``: that dispatch's, read only here)."""
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)  # the coming dispatch's
    num_experts = EXPERTS_PER_RANK * world_size
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    offs_n = tl.arange(0, BLOCK_N)
    my_node = rank // GPUS_PER_NODE
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < TOPK
    num_blocks = tl.maximum(tl.cdiv(num_tokens, BLOCK_T), 1)
    for block in range(pid, num_blocks, tl.num_programs(0)):  # one block a program, unless too few
        carry = tl.zeros([BLOCK_R], tl.int32)  # tokens of earlier blocks bound for each rank
        node_carry = tl.zeros([BLOCK_N], tl.int32)  # ... and for each other node
        last_block = block == num_blocks - 1
        # The tokens ahead of the block, BLOCK_SCAN at a time: the longest chain (the last block's)
        # is T / BLOCK_SCAN steps, not T / BLOCK_T.
        for start in range(0, block * BLOCK_T, BLOCK_SCAN):
            is_dst = _route_counts(topk_ids_ptr, start, block * BLOCK_T, offs_r, offs_k, mask_k, TOPK,
                                   EXPERTS_PER_RANK, BLOCK_SCAN, num_experts)
            carry += tl.sum(is_dst, axis=0)
            if NUM_NODES > 1:
                node_carry += tl.sum(_nodes_hit(is_dst, offs_r, offs_n, my_node, GPUS_PER_NODE, NUM_NODES), axis=0)
        _check_ids(topk_ids_ptr, block * BLOCK_T, num_tokens, num_experts, status_ptr, epoch, offs_k, mask_k, TOPK,
                   BLOCK_T)
        offs_t, ids, is_dst = _route_block(topk_ids_ptr, block * BLOCK_T, num_tokens, offs_r, offs_k, mask_k, TOPK,
                                           EXPERTS_PER_RANK, BLOCK_T, num_experts)
        slots = tl.cumsum(is_dst, axis=0) - is_dst + carry[None, :]  # [BLOCK_T, BLOCK_R]
        mask_t = offs_t < num_tokens
        tl.store(slots_ptr + offs_t[:, None] * world_size + offs_r[None, :], tl.where(is_dst > 0, slots, -1),
                 mask=mask_t[:, None] & mask_r[None, :])
        bits = tl.sum(tl.where(is_dst > 0, tl.full(is_dst.shape, 1, tl.int64) << offs_r[None, :].to(tl.int64), 0),
                      axis=1)  # [BLOCK_T]
        tl.store(send_mask_ptr + offs_t, bits, mask=mask_t)
        if NUM_NODES > 1:
            is_node = _nodes_hit(is_dst, offs_r, offs_n, my_node, GPUS_PER_NODE, NUM_NODES)  # [BLOCK_T, BLOCK_N]
            node_slots = tl.cumsum(is_node, axis=0) - is_node + node_carry[None, :]
            tl.store(node_slots_ptr + offs_t[:, None] * NUM_NODES + offs_n[None, :],
                     tl.where(is_node > 0, node_slots, -1), mask=mask_t[:, None] & (offs_n < NUM_NODES)[None, :])
            if last_block:
                tl.store(node_counts_ptr + offs_n, node_carry + tl.sum(is_node, axis=0), mask=offs_n < NUM_NODES)
        if RANGES > 0:
            _store_range_rows(range_rows_ptr, block * BLOCK_T, offs_t, is_dst, carry, last_block, num_tokens, offs_r,
                              mask_r, RANGES, BLOCK_T)
        if last_block:
            tl.store(counts_ptr + offs_r, carry + tl.sum(is_dst, axis=0), mask=mask_r)
        offs_e = tl.arange(0, BLOCK_ALL_E)
        tl.store(block_hist_ptr + block * (EXPERTS_PER_RANK * world_size) + offs_e, _expert_histogram(ids, BLOCK_ALL_E),
                 mask=offs_e < EXPERTS_PER_RANK * world_size)
    if QUANTIZE:
        offs_h = tl.arange(0, BLOCK_H)
        offs_s = tl.arange(0, BLOCK_H // 128)
        for t in range(pid, num_tokens, tl.num_programs(0)):
            row = tl.cast(t, tl.int64)
            for start in range(0, HIDDEN, BLOCK_H):
                mask_h = start + offs_h < HIDDEN
                q, scales = _quantize_fp8(tl.load(x_ptr + row * HIDDEN + start + offs_h, mask=mask_h,
                                                  other=0.0).to(tl.float32), BLOCK_H, FP8_FORMAT,
                                          staging_x_ptr.dtype.element_ty)
                tl.store(staging_x_ptr + row * HIDDEN + start + offs_h, q, mask=mask_h)
                tl.store(staging_scales_ptr + row * NUM_SCALES + start // 128 + offs_s, scales,
                         mask=start // 128 + offs_s < NUM_SCALES)


@triton.jit
def _load_token_chunk(x_ptr, x_scales_ptr, row, start, HIDDEN: tl.constexpr, NUM_SCALES: tl.constexpr,
                      QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                      BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr):
    """Values ``[start, start + BLOCK_H)`` of row ``row`` of x, as sent: ``(values [BLOCK_H],
    scales [BLOCK_H // 128] (fp8 only), offs_h, mask_h, offs_s, mask_s)``; quantised here when
    QUANTIZE (into FP8_FORMAT codes of type OUT_DTYPE), loaded with their scales when X_FP8
    (already fp8). ALIGNED: rows of x are 16-byte multiples at 16-aligned addresses."""
    offs_h = start + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HIDDEN
    offs_s = start // 128 + tl.arange(0, BLOCK_H // 128)
    mask_s = offs_s < NUM_SCALES
    scales = tl.zeros([BLOCK_H // 128], tl.float32)
    ptr_x = _row(x_ptr, row, HIDDEN, ALIGNED)  # x_ptr may be a peer's (an inter-node forward)
    if QUANTIZE:
        values, scales = _quantize_fp8(tl.load(ptr_x + offs_h, mask=mask_h, other=0.0).to(tl.float32),
                                       BLOCK_H, FP8_FORMAT, OUT_DTYPE)  # [BLOCK_H] fp8, [BLOCK_H // 128] float32
    else:
        values = tl.load(ptr_x + offs_h, mask=mask_h)
        if X_FP8:
            scales = tl.load(x_scales_ptr + row * NUM_SCALES + offs_s, mask=mask_s, other=0.0)
    return values, scales, offs_h, mask_h, offs_s, mask_s


@triton.jit
def _send_token(t, load_row, row_base, is_dst, slot, ids, x_ptr, x_scales_ptr, topk_weights_ptr, send_mask_ptr,
                peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                world_size, experts_per_rank, offs_r, mask_r, offs_k, mask_k, part, parts,
                HIDDEN: tl.constexpr, TOPK: tl.constexpr, NUM_SCALES: tl.constexpr,
                QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr, WRITE_SEND_MASK: tl.constexpr):
    """Store token t (its payload and weights at row ``load_row`` of ``x_ptr``, ``x_scales_ptr``,
    ``topk_weights_ptr``; global expert ids ``ids``) into row ``row_base[d] + slot[d]`` of every
    destination d where ``is_dst[d]`` (``row_base``: a scalar, ``src_rank * max_tokens`` in
    regions of one row block per source, or [BLOCK_R]): the part ``part`` of ``parts`` programs
    that share the token (BLOCK_H-value chunks part, part + parts, ...; part 0
    also stores the ids, weights and source token)."""
    mask_d = mask_r & (is_dst > 0)  # [BLOCK_R]
    meta_d = _mask_if(mask_d, part == 0)
    row = (row_base + slot).to(tl.int64)  # [BLOCK_R] row index in each destination
    load_row = tl.cast(load_row, tl.int64)
    # Expert ids local to each destination (-1 elsewhere) and their weights (0 elsewhere).
    local = ids[None, :] - offs_r[:, None] * experts_per_rank  # [BLOCK_R, BLOCK_K]
    here = (ids[None, :] >= 0) & (local >= 0) & (local < experts_per_rank)
    weights = tl.load(topk_weights_ptr + load_row * TOPK + offs_k, mask=mask_k, other=0.0)  # [BLOCK_K]
    mask_rk = meta_d[:, None] & mask_k[None, :]
    ptr_ids = _peer_ptr(peer_bases_ptr, offs_r, ids_offset, tl.int32)[:, None] + row[:, None] * TOPK + offs_k[None, :]
    tl.store(ptr_ids, tl.where(here, local, -1), mask=mask_rk)
    ptr_w = _peer_ptr(peer_bases_ptr, offs_r, weights_offset, tl.float32)[:, None] + row[:, None] * TOPK + offs_k[None, :]
    tl.store(ptr_w, tl.where(here, weights[None, :], 0.0), mask=mask_rk)
    tl.store(_peer_ptr(peer_bases_ptr, offs_r, src_offset, tl.int32) + row, tl.zeros_like(slot) + t, mask=meta_d)
    if WRITE_SEND_MASK:
        if part == 0:
            tl.store(send_mask_ptr + t, _bits(mask_d, offs_r))
    # Payload, BLOCK_H values at a time: loaded (and quantised) once, stored to each destination.
    for start in range(part * BLOCK_H, HIDDEN, parts * BLOCK_H):
        values, scales, offs_h, mask_h, offs_s, mask_s = _load_token_chunk(
            x_ptr, x_scales_ptr, load_row, start, HIDDEN, NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE, BLOCK_H,
            ALIGNED)
        for d in range(0, world_size):
            if tl.sum(tl.where(offs_r == d, mask_d.to(tl.int32), 0), axis=0) > 0:
                row_d = tl.sum(tl.where(offs_r == d, row, 0), axis=0)
                ptr_x = _row(_peer_ptr(peer_bases_ptr, d, x_offset, OUT_DTYPE), row_d, HIDDEN, ALIGNED)
                tl.store(ptr_x + offs_h, values, mask=mask_h)
                if NUM_SCALES > 0:
                    ptr_s = _peer_ptr(peer_bases_ptr, d, scales_offset, tl.float32) + row_d * NUM_SCALES
                    tl.store(ptr_s + offs_s, scales, mask=mask_s)


@triton.jit
def _receive_rows(src_rank, first, count, out_row, part, parts, rank, peer_bases_ptr,
                  x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                  out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
                  HIDDEN: tl.constexpr, TOPK: tl.constexpr, NUM_SCALES: tl.constexpr, OUT_DTYPE: tl.constexpr,
                  BLOCK_COPY: tl.constexpr, ALIGNED: tl.constexpr, PAYLOAD: tl.constexpr):
    """Copy part ``part`` of ``parts`` of the ``count`` rows from ``src_rank`` that start at row
    ``first`` of this rank's receive regions (contiguous there) to output rows
    ``[out_row, out_row + count)``: one flat copy per field. Without PAYLOAD only ``src`` is
    written (the outputs are the receive regions themselves: the HT dispatch's zero copy)."""
    first = first.to(tl.int64)
    out_row = out_row.to(tl.int64)
    if PAYLOAD:
        _copy_span(_peer_ptr(peer_bases_ptr, rank, x_offset, OUT_DTYPE) + first * HIDDEN,
                   out_x_ptr + out_row * HIDDEN, count * HIDDEN, part, parts, BLOCK_COPY, ALIGNED)
        if NUM_SCALES > 0:
            _copy_span(_peer_ptr(peer_bases_ptr, rank, scales_offset, tl.float32) + first * NUM_SCALES,
                       out_scales_ptr + out_row * NUM_SCALES, count * NUM_SCALES, part, parts, BLOCK_COPY, False)
        _copy_span(_peer_ptr(peer_bases_ptr, rank, ids_offset, tl.int32) + first * TOPK,
                   out_topk_ids_ptr + out_row * TOPK, count * TOPK, part, parts, BLOCK_COPY, False)
        _copy_span(_peer_ptr(peer_bases_ptr, rank, weights_offset, tl.float32) + first * TOPK,
                   out_topk_weights_ptr + out_row * TOPK, count * TOPK, part, parts, BLOCK_COPY, False)
    # src: (src_rank, token) pairs, rows split between the parts.
    per_part = tl.cdiv(count, parts)
    base_src = _peer_ptr(peer_bases_ptr, rank, src_offset, tl.int32) + first
    for block in range(part * per_part, tl.minimum((part + 1) * per_part, count), BLOCK_COPY // 2):
        offs = block + tl.arange(0, BLOCK_COPY // 2)
        mask = offs < tl.minimum((part + 1) * per_part, count)
        token = tl.load(base_src + offs, mask=mask)
        tl.store(out_src_ptr + (out_row + offs) * 2, tl.zeros_like(token) + src_rank, mask=mask)
        tl.store(out_src_ptr + (out_row + offs) * 2 + 1, token, mask=mask)


@triton.jit
def _half_offsets(half, sources, max_tokens, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                  count_offset, signal_offset, ROW_BYTES: tl.constexpr, SCALE_BYTES: tl.constexpr,
                  IDS_BYTES: tl.constexpr):
    """The offsets of half ``half`` of double-buffered receive regions of ``sources`` x ``max_tokens``
    rows (x, scales, topk ids, weights, src token) and ``sources`` flags (count, signal)."""
    rows = (sources * max_tokens).to(tl.int64) * half
    return (x_offset + rows * ROW_BYTES, scales_offset + rows * SCALE_BYTES, ids_offset + rows * IDS_BYTES,
            weights_offset + rows * IDS_BYTES, src_offset + rows * 4, count_offset + half * sources * 4,
            signal_offset + half * sources * 4)


@triton.jit
def _announce_rows(peer_bases_ptr, count_offset, expert_counts_offset, signal_offset, src_rank, counts, hist,
                   last, offs_r, world_size, epoch, EXPERTS_PER_RANK: tl.constexpr):
    """To each rank d where ``last[d]``, on behalf of ``src_rank``: the row count ``counts[d]``, d's
    slice of the per-expert counts ``hist``, then the signal (epoch) that makes them visible."""
    tl.store(_peer_ptr(peer_bases_ptr, offs_r, count_offset + src_rank * 4, tl.int32), counts, mask=last)
    _publish_expert_counts(peer_bases_ptr, expert_counts_offset, src_rank, hist, last, world_size, EXPERTS_PER_RANK)
    _signal_peers(peer_bases_ptr, signal_offset, src_rank, offs_r, last, epoch)


@triton.jit
def _store_totals(counts, peer_bases_ptr, rank, expert_counts_offset, out_num_tokens_ptr, out_tokens_per_expert_ptr,
                  offs_r, mask_r, EXPERTS_PER_RANK: tl.constexpr, BLOCK_E: tl.constexpr, out_topk_ids_ptr, out_rows,
                  TOPK: tl.constexpr):
    """num_tokens (the sum of ``counts``, rows from each source), tokens_per_expert (the sum over
    sources of their published ``expert_counts`` rows), and -1 in the topk_ids of every row past
    num_tokens up to ``out_rows`` (the padding rows: no expert, as DeepEP leaves them)."""
    total = tl.sum(counts, axis=0)
    tl.store(out_num_tokens_ptr, total)
    offs = tl.arange(0, 1024)
    for start in range(total * TOPK, out_rows * TOPK, 1024):
        tl.store(out_topk_ids_ptr + start + offs, tl.full([1024], -1, tl.int32), mask=start + offs < out_rows * TOPK)
    offs_e = tl.arange(0, BLOCK_E)
    per_source = tl.load(_peer_ptr(peer_bases_ptr, rank, expert_counts_offset, tl.int32)
                         + offs_r[:, None] * EXPERTS_PER_RANK + offs_e[None, :],
                         mask=mask_r[:, None] & (offs_e < EXPERTS_PER_RANK)[None, :], other=0)
    tl.store(out_tokens_per_expert_ptr + offs_e, tl.sum(per_source, axis=0), mask=offs_e < EXPERTS_PER_RANK)


@triton.jit
def _receive_program(j, epoch, rank, world_size, max_tokens, max_polls, out_rows, peer_bases_ptr, x_offset,
                     scales_offset,
                     ids_offset, weights_offset, src_offset, count_offset, expert_counts_offset, signal_offset,
                     status_ptr, out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
                     out_num_tokens_ptr, out_tokens_per_expert_ptr, offs_r, mask_r, recv_parts, announce_offset,
                     call_word, HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr,
                     NUM_SCALES: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_COPY: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ALIGNED: tl.constexpr):
    """Receive program ``j``: part ``j % recv_parts`` of source ``j // recv_parts``'s rows, or (the
    last one, j == R * recv_parts) num_tokens and tokens_per_expert (and -1 in the ids of the
    outputs' ``out_rows`` past them)."""
    meta = j == world_size * recv_parts  # the program that writes num_tokens / tokens_per_expert
    src_rank = tl.where(meta, world_size - 1, j // recv_parts)
    mask_wait = mask_r & (offs_r <= src_rank)
    _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_wait, epoch, epoch,
                PHASE_DISPATCH_RECV, max_polls, announce_offset, call_word, BLOCK_R)
    counts = tl.load(_peer_ptr(peer_bases_ptr, rank, count_offset, tl.int32) + offs_r, mask=mask_wait,
                     other=0, volatile=True)  # [BLOCK_R] rows from each source
    if meta:
        _store_totals(counts, peer_bases_ptr, rank, expert_counts_offset, out_num_tokens_ptr,
                      out_tokens_per_expert_ptr, offs_r, mask_r, EXPERTS_PER_RANK, BLOCK_E, out_topk_ids_ptr, out_rows,
                      TOPK)
    else:
        _receive_rows(src_rank, src_rank * max_tokens, tl.sum(tl.where(offs_r == src_rank, counts, 0), axis=0),
                      tl.sum(tl.where(offs_r < src_rank, counts, 0), axis=0), j % recv_parts, recv_parts, rank,
                      peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset, out_x_ptr,
                      out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr, HIDDEN, TOPK,
                      NUM_SCALES, OUT_DTYPE, BLOCK_COPY, ALIGNED, True)


# Token and program counts are runtime values, unspecialised: every token count and bucket
# shares one compiled kernel (no compilation storm as batch sizes vary).
@triton.jit(do_not_specialize=("num_tokens", "send_programs", "token_parts", "recv_parts", "num_programs",
                               "call_word"))
def _dispatch_kernel(
        x_ptr, x_scales_ptr, topk_ids_ptr, topk_weights_ptr,
        out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
        out_num_tokens_ptr, out_tokens_per_expert_ptr, send_mask_ptr,
        peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
        count_offset, expert_counts_offset, signal_offset, announce_offset, call_word, counters_ptr, status_ptr,
        rank, world_size, num_tokens, max_tokens, max_polls, out_rows,
        HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr,
        NUM_SCALES: tl.constexpr, QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr,
        send_programs, token_parts, recv_parts, num_programs, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_COPY: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_ALL_E: tl.constexpr,
        ALIGNED: tl.constexpr):
    # x [num_tokens, HIDDEN] bf16, or fp8 with x_scales [num_tokens, NUM_SCALES] when X_FP8
    # topk_ids / topk_weights [num_tokens, TOPK]; outputs [R * max_tokens, ...]; send_mask [num_tokens] int64
    OUT_DTYPE: tl.constexpr = out_x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    # this call's half of every double-buffered region
    x_offset, scales_offset, ids_offset, weights_offset, src_offset, count_offset, signal_offset = _half_offsets(
        epoch % 2, world_size, max_tokens, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
        count_offset, signal_offset, HIDDEN * (OUT_DTYPE.primitive_bitwidth // 8), NUM_SCALES * 4, TOPK * 4)
    expert_counts_offset += (epoch % 2) * world_size * EXPERTS_PER_RANK * 4
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < TOPK
    if pid == 0:  # this call's number and path, for peers that wait on this rank (see _wait_peers)
        _announce_call(peer_bases_ptr, announce_offset, rank, offs_r, mask_r, call_word)
    if pid < send_programs:
        lanes, lane, part = _send_lane(pid, send_programs, token_parts)  # lane sends t = lane (mod lanes)
        counts = tl.zeros([BLOCK_R], tl.int32)  # tokens of earlier chunks bound for each rank
        hist = tl.zeros([BLOCK_ALL_E], tl.int32)  # (token, k) pairs per global expert
        for chunk in range(0, num_tokens, BLOCK_T):
            if pid == 0:
                _check_ids(topk_ids_ptr, chunk, num_tokens, EXPERTS_PER_RANK * world_size, status_ptr, epoch, offs_k,
                           mask_k, TOPK, BLOCK_T)
            offs_t, ids, is_dst = _route_block(topk_ids_ptr, chunk, num_tokens, offs_r, offs_k, mask_k, TOPK,
                                               EXPERTS_PER_RANK, BLOCK_T, EXPERTS_PER_RANK * world_size)
            slots = tl.cumsum(is_dst, axis=0) - is_dst + counts[None, :]  # [BLOCK_T, BLOCK_R]
            first = chunk + (lane - chunk % lanes + lanes) % lanes
            for t in range(first, tl.minimum(chunk + BLOCK_T, num_tokens), lanes):
                sel = (offs_t == t)[:, None]
                _send_token(t, t, rank * max_tokens, tl.sum(tl.where(sel, is_dst, 0), axis=0),
                            tl.sum(tl.where(sel, slots, 0), axis=0), tl.sum(tl.where(sel, ids, 0), axis=0),
                            x_ptr, x_scales_ptr, topk_weights_ptr, send_mask_ptr, peer_bases_ptr, x_offset,
                            scales_offset, ids_offset, weights_offset, src_offset, world_size, EXPERTS_PER_RANK,
                            offs_r, mask_r, offs_k, mask_k, part, token_parts, HIDDEN, TOPK, NUM_SCALES, QUANTIZE,
                            X_FP8, FP8_FORMAT, OUT_DTYPE, BLOCK_H, ALIGNED, True)
            counts += tl.sum(is_dst, axis=0)
            hist += _expert_histogram(ids, BLOCK_ALL_E)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r, mask_r, send_programs)
        _announce_rows(peer_bases_ptr, count_offset, expert_counts_offset, signal_offset, rank, counts, hist, last,
                       offs_r, world_size, epoch, EXPERTS_PER_RANK)
    else:
        _receive_program(pid - send_programs, epoch, rank, world_size, max_tokens, max_polls, out_rows, peer_bases_ptr,
                         x_offset, scales_offset, ids_offset, weights_offset, src_offset, count_offset,
                         expert_counts_offset, signal_offset, status_ptr, out_x_ptr, out_scales_ptr, out_topk_ids_ptr,
                         out_topk_weights_ptr, out_src_ptr, out_num_tokens_ptr, out_tokens_per_expert_ptr, offs_r,
                         mask_r, recv_parts, announce_offset, call_word, HIDDEN, TOPK, EXPERTS_PER_RANK, NUM_SCALES,
                         OUT_DTYPE, BLOCK_COPY, BLOCK_R, BLOCK_E, ALIGNED)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, num_programs)


_OFFSETS = ("x_offset", "scales_offset", "ids_offset", "weights_offset", "src_offset", "count_offset",
            "expert_counts_offset", "signal_offset", "announce_offset")
_launch_dispatch = Launcher(_dispatch_kernel)
register(_dispatch_kernel,
         {**{name: "i32" for name in ("send_programs", "token_parts", "recv_parts", "num_programs", "call_word")},
          "x_ptr": "*bf16", "x_scales_ptr": "*fp32", "topk_ids_ptr": "*i64", "topk_weights_ptr": "*fp32",
          "out_x_ptr": "*fp8e4nv", "out_scales_ptr": "*fp32",
          "out_topk_ids_ptr": "*i32", "out_topk_weights_ptr": "*fp32", "out_src_ptr": "*i32",
          "out_num_tokens_ptr": "*i32", "out_tokens_per_expert_ptr": "*i32", "send_mask_ptr": "*i64",
          "peer_bases_ptr": "*i64", "counters_ptr": "*i32", "status_ptr": "*i32",
          **{name: "i64" for name in _OFFSETS},
          **{name: "i32" for name in ("rank", "world_size", "num_tokens", "max_tokens", "max_polls", "out_rows")}},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "NUM_SCALES": 56, "QUANTIZE": True, "X_FP8": False,
          "FP8_FORMAT": E4M3FN.value, "BLOCK_T": 128, "BLOCK_H": 8192, "BLOCK_COPY": 8192, "BLOCK_R": 4, "BLOCK_K": 8,
          "BLOCK_E": 64, "BLOCK_ALL_E": 256, "ALIGNED": True})
# MI300X's fp8 (float8_e4m3fnuz): the rows' element type and the quantiser's format.
register(_dispatch_kernel, {**KERNELS[-1].signature, "out_x_ptr": "*fp8e4b8"},
         {**KERNELS[-1].constexprs, "FP8_FORMAT": E4M3FNUZ.value})
# int32 expert ids (callers pass either): their own compilation, which once hit a Triton lowering bug.
register(_dispatch_kernel, {**KERNELS[-2].signature, "topk_ids_ptr": "*i32"}, KERNELS[-2].constexprs)
_launch_dispatch_stage = Launcher(_dispatch_stage_kernel)
register(_dispatch_stage_kernel,
         {"x_ptr": "*bf16", "topk_ids_ptr": "*i64", "staging_x_ptr": "*fp8e4nv", "staging_scales_ptr": "*fp32",
          "slots_ptr": "*i32", "counts_ptr": "*i32", "block_hist_ptr": "*i32", "send_mask_ptr": "*i64",
          "node_slots_ptr": "*i32", "node_counts_ptr": "*i32", "range_rows_ptr": "*i32", "counters_ptr": "*i32",
          "status_ptr": "*i32", "rank": "i32", "world_size": "i32", "num_tokens": "i32"},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "NUM_SCALES": 56, "QUANTIZE": True,
          "FP8_FORMAT": E4M3FN.value, "GPUS_PER_NODE": 4, "NUM_NODES": 1, "RANGES": 4, "BLOCK_T": 128, "BLOCK_H": 8192,
          "BLOCK_R": 4, "BLOCK_N": 1, "BLOCK_K": 8,
          "BLOCK_ALL_E": 256, "BLOCK_Q": 8, "BLOCK_SCAN": 1024})
register(_dispatch_stage_kernel, {**KERNELS[-1].signature, "topk_ids_ptr": "*i32"}, KERNELS[-1].constexprs)
# Across nodes (the inter-node path's HT variant): node slots, no token ranges.
register(_dispatch_stage_kernel, KERNELS[-1].signature,
         {**KERNELS[-1].constexprs, "GPUS_PER_NODE": 2, "NUM_NODES": 2, "BLOCK_N": 2, "RANGES": 0, "BLOCK_Q": 1})
register(_dispatch_stage_kernel, {**KERNELS[-1].signature, "staging_x_ptr": "*fp8e4b8"},
         {**KERNELS[-1].constexprs, "FP8_FORMAT": E4M3FNUZ.value})  # MI300X's fp8


@dataclass
class HtStaging:
    """Local (not symmetric) buffers of the HT stage kernel, reused by every HT call."""

    slots: torch.Tensor  # [ht_tokens, world_size] int32: row of token t on rank d, -1 if none
    counts: torch.Tensor  # [world_size] int32: rows this rank sends to each rank
    node_slots: torch.Tensor  # [tokens, nodes] int32 across nodes: row of token t among those for node n, -1 if none
    node_counts: torch.Tensor  # [nodes] int32: rows this rank sends to each other node
    range_rows: torch.Tensor  # [world_size, ht_parts + 1] int32 (one node): where each token range starts
    #                          among the rows bound for each rank, then their count
    num_experts: int
    hidden: int
    fp8_dtype: torch.dtype  # the dispatch's fp8 (float8_e4m3fn or float8_e4m3fnuz)
    _block_hist: dict = field(default_factory=dict)  # block_t -> [cdiv(tokens, block_t), num_experts] int32
    _fp8: tuple = ()  # see fp8_rows

    @staticmethod
    def allocate(cfg, world_size: int, device, tokens: int, nodes: int = 1) -> "HtStaging":
        return HtStaging(slots=torch.empty(tokens, world_size, dtype=torch.int32, device=device),
                         counts=torch.empty(world_size, dtype=torch.int32, device=device),
                         node_slots=torch.empty(tokens if nodes > 1 else 0, nodes, dtype=torch.int32, device=device),
                         node_counts=torch.empty(nodes, dtype=torch.int32, device=device),
                         range_rows=torch.empty(world_size if nodes == 1 else 0, cfg.ht_parts + 1, dtype=torch.int32,
                                                device=device),
                         num_experts=cfg.num_experts, hidden=cfg.hidden,
                         fp8_dtype=cfg.dispatch_dtype if cfg.fp8 else torch.float8_e4m3fn)

    def fp8_rows(self) -> tuple:
        """``([tokens, hidden] fp8, [tokens, hidden // 128] float32)``: every token
        quantised by the stage kernel, when it quantises (the inter-node HT variant, or
        ``DispatchParams.send_quantize`` off); allocated at the first such call, never otherwise."""
        if not self._fp8:
            rows, device = self.slots.shape[0], self.slots.device
            self._fp8 = (torch.empty(rows, self.hidden, dtype=self.fp8_dtype, device=device),
                         torch.empty(rows, self.hidden // 128, dtype=torch.float32, device=device))
        return self._fp8

    def block_hist(self, block_t: int) -> torch.Tensor:
        """``[cdiv(tokens, block_t), num_experts]`` int32: each token block's (token, k) pairs per
        expert (the stage kernel writes them, the dispatch sums them), one buffer per block size."""
        if block_t not in self._block_hist:
            blocks = max(1, -(-self.slots.shape[0] // block_t))
            self._block_hist[block_t] = torch.empty(blocks, self.num_experts, dtype=torch.int32,
                                                    device=self.slots.device)
        return self._block_hist[block_t]


def rows_aligned(cfg, x, out) -> bool:
    """Whether the rows of ``x`` and of the dispatched payload are 16-byte multiples at 16-byte
    aligned addresses, so kernels may declare it (vector loads and stores, also through peer
    pointers); a caller's ``x`` may be an unaligned view."""
    return (cfg.hidden * out.x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0


def launch_stage(heap, sync, cfg, params, staging, x, x_scales, topk_ids, send_mask, nodes: int,
                 quantize: bool = True, op: str = "dispatch_ht"):
    """The HT stage kernel over this rank's tokens into ``staging`` (``HtStaging``; on one node
    also the rows of each of the ``cfg.ht_parts`` token ranges) and ``send_mask``; returns the
    rows to send, ``(x, x_scales)``: the staged fp8 rows when it quantised them (bf16 input to an
    fp8 dispatch, unless not ``quantize``), else the inputs."""
    num_tokens = x.shape[0]
    quantize = quantize and cfg.fp8 and x_scales is None

    def make():
        world = heap.world_size
        counts = staging.counts
        ranges = cfg.ht_parts if nodes == 1 else 0
        staged_x, staged_scales = staging.fp8_rows() if quantize else (None, counts)
        return dict(
            **({"staging_x_ptr": _platform.kernel_arg(staged_x)} if quantize else {}),
            staging_scales_ptr=staged_scales, slots_ptr=staging.slots, counts_ptr=counts,
            block_hist_ptr=staging.block_hist(params.block_t),
            node_slots_ptr=staging.node_slots if nodes > 1 else counts, node_counts_ptr=staging.node_counts,
            range_rows_ptr=staging.range_rows if ranges else counts, counters_ptr=sync.counters(op),
            status_ptr=sync.status, rank=heap.rank, world_size=world, HIDDEN=cfg.hidden, TOPK=cfg.topk,
            EXPERTS_PER_RANK=cfg.experts_per_rank(world), NUM_SCALES=cfg.num_scales, QUANTIZE=quantize,
            FP8_FORMAT=fp8_format(cfg.dispatch_dtype), GPUS_PER_NODE=world // nodes, NUM_NODES=nodes, RANGES=ranges,
            BLOCK_T=params.block_t, BLOCK_H=params.block_h, BLOCK_R=triton.next_power_of_2(world),
            BLOCK_N=triton.next_power_of_2(nodes), BLOCK_K=triton.next_power_of_2(cfg.topk),
            BLOCK_ALL_E=triton.next_power_of_2(cfg.num_experts), BLOCK_Q=triton.next_power_of_2(ranges + 1),
            BLOCK_SCAN=max(params.block_scan, params.block_t), num_warps=params.num_warps)

    static = static_args(heap, ("stage", id(sync), id(staging), cfg, params, nodes, quantize, op), make)
    x_arg = _platform.kernel_arg(x)
    unstaged = {} if quantize else {"staging_x_ptr": x_arg}  # (the kernel stages nothing: any pointer will do)
    sync.before_launch()
    _launch_dispatch_stage.launch((max(params.stage_programs, 1),), static, x_ptr=x_arg, topk_ids_ptr=topk_ids,
                                  send_mask_ptr=send_mask, num_tokens=num_tokens, **unstaged)
    if quantize:
        staged_x, staged_scales = staging.fp8_rows()
        return staged_x[:num_tokens], staged_scales[:num_tokens]
    return x, x_scales


def launch_dispatch(heap, sync, cfg, params, x, x_scales, topk_ids, topk_weights, out, call_word: int) -> None:
    """Launch the LL dispatch of this rank's tokens into ``out`` (a ``DispatchOutput``);
    ``call_word``: this call's number and path (``SyncState.call_word``).

    ``x`` [T, hidden] bf16, or fp8 with ``x_scales`` [T, hidden // 128] float32;
    ``topk_ids`` [T, topk] int32/int64 (-1: no expert); ``topk_weights`` [T, topk] float32.
    Inputs are validated by the caller (``Buffer``). The HT path: ``kernels.dispatch_ht``.
    """
    prequantized = x_scales is not None

    def make():
        world = heap.world_size
        return dict(
            peer_bases_ptr=heap.peer_bases,
            **{f"{name}_offset": heap.offset("ll_dispatch_" + region) for name, region in _LL_REGIONS},
            announce_offset=heap.offset("dispatch_calls"), counters_ptr=sync.counters("dispatch_ll"), status_ptr=sync.status, rank=heap.rank, world_size=world,
            max_tokens=cfg.ll_tokens, max_polls=sync.max_polls, HIDDEN=cfg.hidden, TOPK=cfg.topk,
            EXPERTS_PER_RANK=cfg.experts_per_rank(world), NUM_SCALES=cfg.num_scales,
            QUANTIZE=cfg.fp8 and not prequantized, X_FP8=prequantized, FP8_FORMAT=fp8_format(cfg.dispatch_dtype),
            send_programs=params.send_programs, token_parts=params.token_parts, recv_parts=params.recv_parts,
            num_programs=params.send_programs + world * params.recv_parts + 1, BLOCK_T=params.block_t,
            BLOCK_H=params.block_h, BLOCK_COPY=params.block_copy, BLOCK_R=triton.next_power_of_2(world),
            BLOCK_K=triton.next_power_of_2(cfg.topk), BLOCK_E=triton.next_power_of_2(cfg.experts_per_rank(world)),
            BLOCK_ALL_E=triton.next_power_of_2(cfg.num_experts), num_warps=params.num_warps)

    static = static_args(heap, ("dispatch_ll", id(sync), cfg, params, prequantized), make)
    sync.before_launch()
    _launch_dispatch.launch(
        (static["num_programs"],), static, x_ptr=_platform.kernel_arg(x),
        x_scales_ptr=x_scales if prequantized else out.topk_weights, topk_ids_ptr=topk_ids,
        topk_weights_ptr=topk_weights, out_x_ptr=_platform.kernel_arg(out.x),
        out_scales_ptr=out.x_scales if out.x_scales is not None else out.topk_weights,
        out_topk_ids_ptr=out.topk_ids, out_topk_weights_ptr=out.topk_weights, out_src_ptr=out.src,
        out_num_tokens_ptr=out.num_tokens, out_tokens_per_expert_ptr=out.tokens_per_expert,
        send_mask_ptr=out.handle.send_mask, num_tokens=x.shape[0], out_rows=out.topk_ids.shape[0],
        call_word=call_word, ALIGNED=rows_aligned(cfg, x, out))
    sync.after_launch()


# (kernel argument, region name) of the dispatch's receive regions, after the path's prefix
_LL_REGIONS = (("x", "x"), ("scales", "scales"), ("ids", "topk_ids"), ("weights", "topk_weights"),
               ("src", "src_token"), ("count", "count"), ("expert_counts", "expert_counts"), ("signal", "signal"))
