"""HT dispatch: bulk sends after the layout is published, in groups of token ranges.

First ``_dispatch_stage_kernel`` (kernels/dispatch.py) uses the whole GPU to lay the tokens out
once (each token's slot on each destination, the counts, send_mask, and ``range_rows``: where
each of the ``cfg.ht_parts`` token ranges starts among the rows bound for each rank) and to
quantise every token once (with ``DispatchParams.send_quantize`` the send programs quantise
instead, each token once as they send it, as LL does: QUANTIZE). Then ``_dispatch_ht_kernel``:

Protocol (regions in ``moe_ep.regions``; R = world size, P = ``cfg.ht_parts``; range q of a rank
with T tokens holds tokens [min(q * cdiv(T, P), T), min((q + 1) * cdiv(T, P), T))):
  The receive regions hold the rows in the outputs' layout: rows [o_s, o_s + n_s) from source s,
  o_s being the rows of the lower ranks. So ``Buffer.dispatch(zero_copy=True)`` returns them as
  they are (ZERO_COPY: the receive programs copy no payload), and otherwise the copy out is one
  contiguous span per source and group.
  Send programs ``[0, send_programs)`` first wait for every destination's credit (it consumed
  this rank's rows of the previous HT call). Program 0 then stores, on every rank d, d's row of
  ``range_rows`` into ``ranges[rank, :]`` (P + 1 values, the last the row count), this rank's
  row counts for every rank into ``counts[e % 2, rank, :]`` (call e; double-buffered, as a
  rank's senders may still read the previous call's while it is rewritten) and d's slice of
  this rank's tokens per expert into ``expert_counts[rank, :]``, and signals ``signal[rank]``:
  every receiver knows its output offsets before a row arrives. Every send program waits for all ranks' signals of
  the call: ``counts`` then gives o_rank on each destination, and a rank that announced this
  call has finished its previous one (stream order), zero-copy outputs included.
  The ranges are sent in G groups (``DispatchParams.send_groups``, at most P), group g = ranges
  [g * P // G, (g + 1) * P // G). Each program, for g = 0 .. G - 1, sends its tokens of group g
  (token t to program (t - first) % lanes, as in the LL kernel: payload, scales, local expert
  ids, weights, token index, straight into row o_rank + slot of every destination) and arrives
  on group g's counter; the last of them signals each range q of group g to every rank
  (``range_signal[q, rank] = epoch``; groups end in order, so range q's signal means ranges
  0..q have landed, whatever groups the receiver forms).
  Receive programs, recv_parts per source rank s, wait for ``signal`` of sources 0..s (o_s is
  the sum of their counts), then for each of their own groups g wait for s's signal of g's last
  range and copy their share of g's rows into the outputs (only ``src`` with ZERO_COPY). So the
  ranks need not agree on send_groups or zero_copy (each rank's launch parameters are its own).
  With G > 1 group g is laid out while later groups are being sent (run 13: slower, G = 1).
  One more program waits for every ``signal`` and writes num_tokens, tokens_per_expert and
  ``handle.part_rows`` (where each source's ranges start among the output rows: the combine's
  ranges). The receive programs and this one arrive on the per-source counter; the last of the
  recv_parts + 1 gives the source its credit (``credit[rank] = epoch``).
Outputs are in source-rank order, then token order, as on the LL path: bit-identical results.
Waits are only for programs of lower ids (a send program waits for the previous call and for
every rank's program 0, which waits only for the previous call): no deadlock in the interpreter
or on a GPU whose grid is not all resident.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep import _platform
from moe_ep.kernels.dispatch import (_publish_expert_counts, _receive_rows, _send_lane, _send_token,
                                     _staged_histogram, _store_totals, _token_range, launch_stage, rows_aligned)
from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.numerics import E4M3FN, E4M3FNUZ, fp8_format
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import (PHASE_DISPATCH_CREDIT, PHASE_DISPATCH_RECV, RECV_ARRIVALS, SEND_ARRIVALS,
                                         _announce_call, _arrive, _finish_launch, _launch_epoch, _mask_if, _peer_ptr,
                                         _signal_peers, _wait_peers)


@triton.jit
def _announce_ranges(range_rows_ptr, hist, peer_bases_ptr, ranges_offset, counts_offset, expert_counts_offset,
                     signal_offset, rank, world_size, epoch, offs_r, mask_r, EXPERTS_PER_RANK: tl.constexpr,
                     RANGES: tl.constexpr, BLOCK_Q: tl.constexpr):
    """To every rank d: d's row of ``range_rows`` ([R, RANGES + 1], local) into ``ranges[rank, :]``,
    this rank's row counts for every rank into ``counts[rank, :]``, d's slice of ``hist`` (this
    rank's tokens per global expert) into ``expert_counts[rank, :]``, then the signal (epoch) that
    makes them visible."""
    offs_q = tl.arange(0, BLOCK_Q)
    mask = mask_r[:, None] & (offs_q <= RANGES)[None, :]
    rows = tl.load(range_rows_ptr + offs_r[:, None] * (RANGES + 1) + offs_q[None, :], mask=mask, other=0)
    ptrs = _peer_ptr(peer_bases_ptr, offs_r, ranges_offset, tl.int32)[:, None] + rank * (RANGES + 1) + offs_q[None, :]
    tl.store(ptrs, rows, mask=mask)
    counts = tl.sum(tl.where(offs_q[None, :] == RANGES, rows, 0), axis=1)  # [BLOCK_R] rows for each rank
    ptrs = _peer_ptr(peer_bases_ptr, offs_r, counts_offset, tl.int32)[:, None] + rank * world_size + offs_r[None, :]
    tl.store(ptrs, counts[None, :] + offs_r[:, None] * 0, mask=mask_r[:, None] & mask_r[None, :])
    _publish_expert_counts(peer_bases_ptr, expert_counts_offset, rank, hist, mask_r, world_size, EXPERTS_PER_RANK)
    _signal_peers(peer_bases_ptr, signal_offset, rank, offs_r, mask_r, epoch)


# Token and program counts are runtime values, unspecialised: every token count and bucket
# shares one compiled kernel (no compilation storm as batch sizes vary).
@triton.jit(do_not_specialize=("num_tokens", "send_programs", "token_parts", "recv_parts", "num_programs", "groups",
                               "call_word"))
def _dispatch_ht_kernel(
        x_ptr, x_scales_ptr, topk_ids_ptr, topk_weights_ptr, slots_ptr, block_hist_ptr, range_rows_ptr,
        out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
        out_num_tokens_ptr, out_tokens_per_expert_ptr, out_part_rows_ptr, send_mask_ptr,
        peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset, ranges_offset,
        counts_offset, expert_counts_offset, signal_offset, range_signal_offset, credit_offset, announce_offset,
        call_word, counters_ptr, status_ptr,
        rank, world_size, num_tokens, max_polls, out_rows,
        HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr, NUM_SCALES: tl.constexpr,
        QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, send_programs, token_parts,
        recv_parts, num_programs, groups,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_COPY: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_ALL_E: tl.constexpr, ALIGNED: tl.constexpr,
        RANGES: tl.constexpr, BLOCK_Q: tl.constexpr, ZERO_COPY: tl.constexpr):
    # x [num_tokens, HIDDEN] bf16, or fp8 with x_scales [num_tokens, NUM_SCALES] when X_FP8 (staged);
    # topk_ids / topk_weights [num_tokens, TOPK]; from the stage kernel: slots [num_tokens, R] int32,
    # block_hist [cdiv(num_tokens, BLOCK_T), num_experts] int32, range_rows [R, RANGES + 1] int32;
    # outputs [capacity, ...]; out_part_rows [R, RANGES + 1] int32
    OUT_DTYPE: tl.constexpr = out_x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < TOPK
    counts_offset += (epoch % 2) * world_size * world_size * 4  # this call's half
    if pid == 0:  # this call's number and path, for peers that wait on this rank (see _wait_peers)
        _announce_call(peer_bases_ptr, announce_offset, rank, offs_r, mask_r, call_word)
    if pid < send_programs:
        lanes, lane, part = _send_lane(pid, send_programs, token_parts)
        _wait_peers(peer_bases_ptr, credit_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch - 1, epoch,
                    PHASE_DISPATCH_CREDIT, max_polls, announce_offset, call_word, BLOCK_R)
        if pid == 0:
            hist = _staged_histogram(block_hist_ptr, num_tokens, EXPERTS_PER_RANK * world_size, BLOCK_T, BLOCK_ALL_E)
            _announce_ranges(range_rows_ptr, hist, peer_bases_ptr, ranges_offset, counts_offset, expert_counts_offset,
                             signal_offset, rank, world_size, epoch, offs_r, mask_r, EXPERTS_PER_RANK, RANGES, BLOCK_Q)
        # Every rank's announcement of this call: the rows of the lower ranks place this rank's
        # rows in each destination, and a rank that announced is done with its previous outputs.
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_r, epoch, epoch,
                    PHASE_DISPATCH_CREDIT, max_polls, announce_offset, call_word, BLOCK_R)
        counts_ptr = _peer_ptr(peer_bases_ptr, rank, counts_offset, tl.int32)  # [R, R]
        lower = offs_r[:, None] < rank
        row_base = tl.sum(tl.load(counts_ptr + offs_r[:, None] * world_size + offs_r[None, :],
                                  mask=lower & mask_r[None, :], other=0, volatile=True), axis=0)  # [BLOCK_R]
        for g in range(0, groups):  # the ranges [g * RANGES // groups, (g + 1) * RANGES // groups)
            lo, _ = _token_range(g * RANGES // groups, num_tokens, RANGES)
            _, hi = _token_range((g + 1) * RANGES // groups - 1, num_tokens, RANGES)
            for t in range(lo + lane, hi, lanes):
                slot = tl.load(slots_ptr + t * world_size + offs_r, mask=mask_r, other=-1)
                ids = tl.load(topk_ids_ptr + t * TOPK + offs_k, mask=mask_k, other=-1).to(tl.int32)
                _send_token(t, t, row_base, (slot >= 0).to(tl.int32), slot, ids, x_ptr, x_scales_ptr,
                            topk_weights_ptr, send_mask_ptr, peer_bases_ptr, x_offset, scales_offset, ids_offset,
                            weights_offset, src_offset, world_size, EXPERTS_PER_RANK, offs_r, mask_r, offs_k, mask_k,
                            part, token_parts, HIDDEN, TOPK, NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE,
                            BLOCK_H, ALIGNED, False)
            # One arrival counter per group (lane 0), then the signal of each of the group's ranges
            # to every rank: a receiver grouping the ranges otherwise (its own send_groups, or a
            # zero-copy call beside a copy-out one) waits for the last range of each of its groups.
            last = _arrive(counters_ptr + SEND_ARRIVALS + g + offs_r * 0, offs_r == 0, send_programs)
            for q in range(g * RANGES // groups, (g + 1) * RANGES // groups):
                _signal_peers(peer_bases_ptr, range_signal_offset + q * world_size * 4, rank, offs_r,
                              _mask_if(mask_r, tl.max(last.to(tl.int32), axis=0) > 0), epoch)
    else:
        j = pid - send_programs
        meta = j == world_size * recv_parts  # the program that writes the totals and part_rows
        src_rank = tl.where(meta, world_size - 1, j // recv_parts)
        mask_wait = mask_r & (offs_r <= src_rank)
        _wait_peers(peer_bases_ptr, signal_offset, status_ptr, rank, offs_r, offs_r, mask_wait, epoch, epoch,
                    PHASE_DISPATCH_RECV, max_polls, announce_offset, call_word, BLOCK_R)
        ranges_ptr = _peer_ptr(peer_bases_ptr, rank, ranges_offset, tl.int32)  # [R, RANGES + 1]
        counts = tl.load(ranges_ptr + offs_r * (RANGES + 1) + RANGES, mask=mask_wait, other=0,
                         volatile=True)  # [BLOCK_R] rows from each source
        offsets = tl.cumsum(counts, axis=0) - counts  # [BLOCK_R] first output row of each source
        if meta:
            _store_totals(counts, peer_bases_ptr, rank, expert_counts_offset, out_num_tokens_ptr,
                          out_tokens_per_expert_ptr, offs_r, mask_r, EXPERTS_PER_RANK, BLOCK_E, out_topk_ids_ptr,
                          out_rows, TOPK)
            offs_q = tl.arange(0, BLOCK_Q)
            mask = mask_r[:, None] & (offs_q <= RANGES)[None, :]
            at = offs_r[:, None] * (RANGES + 1) + offs_q[None, :]
            starts = tl.load(ranges_ptr + at, mask=mask, other=0, volatile=True)
            tl.store(out_part_rows_ptr + at, starts + offsets[:, None], mask=mask)
            mask_done = mask_r
        else:
            offset = tl.sum(tl.where(offs_r == src_rank, offsets, 0), axis=0)
            for g in range(0, groups):  # ranges [g * RANGES // groups, (g + 1) * RANGES // groups): after the last
                q_last = (g + 1) * RANGES // groups - 1
                _wait_peers(peer_bases_ptr, range_signal_offset + q_last * world_size * 4, status_ptr, rank,
                            offs_r, offs_r, offs_r == src_rank, epoch, epoch, PHASE_DISPATCH_RECV, max_polls,
                            announce_offset, call_word, BLOCK_R)
                lo = tl.load(ranges_ptr + src_rank * (RANGES + 1) + g * RANGES // groups, volatile=True)
                hi = tl.load(ranges_ptr + src_rank * (RANGES + 1) + (g + 1) * RANGES // groups, volatile=True)
                _receive_rows(src_rank, offset + lo, hi - lo, offset + lo, j % recv_parts, recv_parts, rank,
                              peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                              out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr, HIDDEN,
                              TOPK, NUM_SCALES, OUT_DTYPE, BLOCK_COPY, ALIGNED, not ZERO_COPY)
            mask_done = offs_r == src_rank
        last = _arrive(counters_ptr + RECV_ARRIVALS + offs_r, mask_done, recv_parts + 1)
        _signal_peers(peer_bases_ptr, credit_offset, rank, offs_r, last, epoch)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, num_programs)


_OFFSETS = ("x_offset", "scales_offset", "ids_offset", "weights_offset", "src_offset", "ranges_offset",
            "counts_offset", "expert_counts_offset", "signal_offset", "range_signal_offset", "credit_offset",
            "announce_offset")
_launch_dispatch_ht = Launcher(_dispatch_ht_kernel)
register(_dispatch_ht_kernel,
         {**{name: "i32" for name in ("send_programs", "token_parts", "recv_parts", "num_programs", "groups",
                                      "call_word")},
          "x_ptr": "*fp8e4nv", "x_scales_ptr": "*fp32", "topk_ids_ptr": "*i64", "topk_weights_ptr": "*fp32",
          "slots_ptr": "*i32", "block_hist_ptr": "*i32", "range_rows_ptr": "*i32",
          "out_x_ptr": "*fp8e4nv", "out_scales_ptr": "*fp32", "out_topk_ids_ptr": "*i32",
          "out_topk_weights_ptr": "*fp32", "out_src_ptr": "*i32", "out_num_tokens_ptr": "*i32",
          "out_tokens_per_expert_ptr": "*i32", "out_part_rows_ptr": "*i32", "send_mask_ptr": "*i64",
          "peer_bases_ptr": "*i64", "counters_ptr": "*i32", "status_ptr": "*i32",
          **{name: "i64" for name in _OFFSETS},
          **{name: "i32" for name in ("rank", "world_size", "num_tokens", "max_polls", "out_rows")}},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "NUM_SCALES": 56, "QUANTIZE": False, "X_FP8": True,
          "FP8_FORMAT": E4M3FN.value, "BLOCK_T": 128,
          "BLOCK_H": 8192,
          "BLOCK_COPY": 8192, "BLOCK_R": 4, "BLOCK_K": 8, "BLOCK_E": 64, "BLOCK_ALL_E": 256, "ALIGNED": True,
          "RANGES": 4, "BLOCK_Q": 8, "ZERO_COPY": False})
register(_dispatch_ht_kernel, KERNELS[-1].signature, {**KERNELS[-1].constexprs, "ZERO_COPY": True})
register(_dispatch_ht_kernel, {**KERNELS[-1].signature, "x_ptr": "*bf16"},
         {**KERNELS[-1].constexprs, "QUANTIZE": True, "X_FP8": False})  # DispatchParams.send_quantize
register(_dispatch_ht_kernel, {**KERNELS[-1].signature, "out_x_ptr": "*fp8e4b8"},
         {**KERNELS[-1].constexprs, "FP8_FORMAT": E4M3FNUZ.value})  # MI300X's fp8


# (kernel argument, region name) of the HT dispatch's regions, after "ht_dispatch_"
_REGIONS = (("x", "x"), ("scales", "scales"), ("ids", "topk_ids"), ("weights", "topk_weights"), ("src", "src_token"),
            ("ranges", "ranges"), ("counts", "counts"), ("expert_counts", "expert_counts"), ("signal", "signal"),
            ("range_signal", "range_signal"), ("credit", "credit"))


def launch_dispatch_ht(heap, sync, cfg, params, x, x_scales, topk_ids, topk_weights, out, staging, call_word: int,
                       zero_copy: bool = False) -> None:
    """The HT dispatch of this rank's tokens into ``out`` (a ``DispatchOutput``): the stage
    kernel into ``staging`` (``kernels.dispatch.HtStaging``), then the dispatch kernel.
    ``zero_copy``: ``out``'s x, x_scales, topk_ids and topk_weights are the receive regions
    themselves (``Buffer.dispatch(zero_copy=True)``), so no row is copied out of them.
    ``call_word``: this call's number and path (``SyncState.call_word``).

    ``x`` [T, hidden] bf16, or fp8 with ``x_scales`` [T, hidden // 128] float32;
    ``topk_ids`` [T, topk] int32/int64 (-1: no expert); ``topk_weights`` [T, topk] float32.
    Inputs are validated by the caller (``Buffer``).
    """
    quantize = params.send_quantize and cfg.fp8 and x_scales is None  # in the send programs, not the stage
    x, x_scales = launch_stage(heap, sync, cfg, params, staging, x, x_scales, topk_ids, out.handle.send_mask, 1,
                               not quantize)
    prequantized = x_scales is not None

    def make():
        world = heap.world_size
        return dict(
            slots_ptr=staging.slots, block_hist_ptr=staging.block_hist(params.block_t),
            range_rows_ptr=staging.range_rows, peer_bases_ptr=heap.peer_bases,
            announce_offset=heap.offset("dispatch_calls"),
            **{f"{name}_offset": heap.offset("ht_dispatch_" + region) for name, region in _REGIONS},
            counters_ptr=sync.counters("dispatch_ht"), status_ptr=sync.status, rank=heap.rank, world_size=world,
            max_polls=sync.max_polls, HIDDEN=cfg.hidden, TOPK=cfg.topk, EXPERTS_PER_RANK=cfg.experts_per_rank(world),
            NUM_SCALES=cfg.num_scales, QUANTIZE=quantize, X_FP8=prequantized,
            FP8_FORMAT=fp8_format(cfg.dispatch_dtype), send_programs=params.send_programs,
            token_parts=params.token_parts, recv_parts=params.recv_parts,
            num_programs=params.send_programs + world * params.recv_parts + 1,
            # Groups let the receive copy of early ranges overlap later sends; with zero copy there is
            # no copy to overlap, and each group only adds signals (run 14: 313 -> 303 us with one).
            groups=1 if zero_copy else min(params.send_groups, cfg.ht_parts),
            BLOCK_T=params.block_t, BLOCK_H=params.block_h, BLOCK_COPY=params.block_copy,
            BLOCK_R=triton.next_power_of_2(world), BLOCK_K=triton.next_power_of_2(cfg.topk),
            BLOCK_E=triton.next_power_of_2(cfg.experts_per_rank(world)),
            BLOCK_ALL_E=triton.next_power_of_2(cfg.num_experts), RANGES=cfg.ht_parts,
            BLOCK_Q=triton.next_power_of_2(cfg.ht_parts + 1), ZERO_COPY=zero_copy, num_warps=params.num_warps)

    static = static_args(heap, ("dispatch_ht", id(sync), id(staging), cfg, params, quantize, prequantized, zero_copy),
                         make)
    sync.before_launch()
    _launch_dispatch_ht.launch(
        (static["num_programs"],), static, x_ptr=_platform.kernel_arg(x),
        x_scales_ptr=x_scales if prequantized else out.topk_weights, topk_ids_ptr=topk_ids,
        topk_weights_ptr=topk_weights, out_x_ptr=_platform.kernel_arg(out.x),
        out_scales_ptr=out.x_scales if out.x_scales is not None else out.topk_weights,
        out_topk_ids_ptr=out.topk_ids, out_topk_weights_ptr=out.topk_weights, out_src_ptr=out.src,
        out_num_tokens_ptr=out.num_tokens, out_tokens_per_expert_ptr=out.tokens_per_expert,
        out_part_rows_ptr=out.handle.part_rows, send_mask_ptr=out.handle.send_mask, num_tokens=x.shape[0],
        out_rows=out.topk_ids.shape[0], call_word=call_word, ALIGNED=rows_aligned(cfg, x, out))
    sync.after_launch()
