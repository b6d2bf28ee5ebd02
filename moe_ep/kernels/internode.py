"""Inter-node dispatch and combine (mori's "EPV1" design): a token crosses the network once per
node; a rail-aligned proxy forwards it inside its node; combine pre-sums per node.

Ranks form nodes of G = gpus_per_node consecutive ranks (N nodes); rank r is (node r // G,
local index r % G). A token of rank s = (n, l) bound for node m != n goes once to its proxy
p = (m, l), which forwards it to every rank of node m that holds one of its experts. Regions in
``moe_ep.regions`` (double-buffered: call e uses half e % 2, as every LL region; see
kernels/dispatch.py for why no handshake is needed); the epochs are the inter-node path's own.

Dispatch, one launch:
  Send programs ``[0, send_programs)`` (token t % send_programs == pid). Ranks of the own node
  get the token as in the intra-node LL dispatch: row ``[s, slot]`` of their receive regions,
  then (last sender per destination) count, per-expert counts and signal ``[s]``. Each other
  node m holding one of its experts gets it once, at row ``[n, node_slot]`` of its proxy's
  ``inter_dispatch_*`` regions (payload, scales, global expert ids, weights, token index); the
  last sender per node writes ``inter_dispatch_count[n]`` there and signals
  ``inter_dispatch_signal[n]``. Over NVLink these are peer stores; across real nodes they are
  the puts of the inter-node transport (NVSHMEM/rocSHMEM: not wired yet, see issue notes).
  Forward programs, forward_parts per node n != own node: wait for ``inter_dispatch_signal[n]``,
  then forward each staged row (row i % forward_parts == part) to the own node's ranks that hold
  its experts, into row ``[s, slot]`` of their receive regions exactly as s would have, record
  (token, destination mask) in the handle for combine, and (last part) write count, per-expert
  counts and signal ``[s]`` there on s's behalf.
  Receive programs and the meta program: the intra-node ones (kernels/dispatch.py), unchanged:
  every source's rows arrive at its own slot, directly or forwarded.
Combine, one launch:
  Send programs: each valid received row (s, t) goes to s's ``ll_combine_x[rank, t]`` when s is
  on the own node, else to the proxy (own node, local index of s) at
  ``inter_combine_x[own local, node of s, t]``; the last sender signals the own node's ranks
  (``ll_combine_signal[rank]``, ``inter_combine_signal[own local]``). Rank r takes the rows from
  about where source r + 1's begin, wrapping around (and proxies take the nodes from the next one
  on), so that the ranks send to different ranks at a time.
  Proxy programs wait for every own-node rank, then for each forwarded row (node n, token t) sum
  in float32, in rank order, the partials of the own-node ranks it went to, round to bf16 and
  send it to s = (n, own local) at ``node_combine_x[own node, t]``; the last signals those s.
  Reduce programs wait for the own node's ranks and the other nodes' proxies and sum per token:
  node by node in node order, the own node's partials in rank order (float32), a remote node's
  bf16 sum — the order ``moe_ep.reference.combine(..., gpus_per_node)`` defines.
Sends have lower program ids than forwards, forwards than receives; forwards wait only for
other ranks' sends, receives for sends and forwards: no launch can deadlock in the interpreter
or on a GPU whose grid is not all resident.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ep.kernels.combine import _rotated
from moe_ep.kernels.dispatch import (_announce_rows, _bits, _check_ids, _expert_histogram, _half_offsets,
                                     _load_token_chunk, _nodes_hit, _receive_program, _route_block, _send_token, _staged_histogram,
                                     launch_stage, rows_aligned)
from moe_ep import _platform
from moe_ep.kernels.numerics import E4M3FN, E4M3FNUZ, _to_bf16, fp8_format
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport import shmem
from moe_ep.transport.primitives import (PHASE_COMBINE_RECV, PHASE_DISPATCH_RECV, RECV_ARRIVALS, SEND_ARRIVALS,
                                         _arrive, _finish_launch, _launch_epoch, _mask_if, _peer_ptr, _row,
                                         _signal_peers, _wait_peers)
from moe_ep.transport.shmem import _complete_puts, _put_row, _put_word


@triton.jit
def _put_token_to_proxy(t, node_slot, proxy, my_node, ids, x_ptr, x_scales_ptr, topk_weights_ptr, peer_bases_ptr,
                        ix_offset, iscales_offset, iids_offset, iweights_offset, isrc_offset, max_tokens,
                        offs_k, mask_k, HIDDEN: tl.constexpr, TOPK: tl.constexpr, NUM_SCALES: tl.constexpr,
                        QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                        BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr):
    """Store token t (payload, scales, global expert ids, weights, index) into row
    ``[my_node, node_slot]`` of ``proxy``'s inter-node staging regions."""
    row = (my_node * max_tokens + node_slot).to(tl.int64)
    t64 = tl.cast(t, tl.int64)
    tl.store(_peer_ptr(peer_bases_ptr, proxy, iids_offset, tl.int32) + row * TOPK + offs_k, ids, mask=mask_k)
    tl.store(_peer_ptr(peer_bases_ptr, proxy, iweights_offset, tl.float32) + row * TOPK + offs_k,
             tl.load(topk_weights_ptr + t64 * TOPK + offs_k, mask=mask_k), mask=mask_k)
    tl.store(_peer_ptr(peer_bases_ptr, proxy, isrc_offset, tl.int32) + row, t)
    ptr_x = _row(_peer_ptr(peer_bases_ptr, proxy, ix_offset, OUT_DTYPE), row, HIDDEN, ALIGNED)
    ptr_s = _peer_ptr(peer_bases_ptr, proxy, iscales_offset, tl.float32) + row * NUM_SCALES
    for start in range(0, HIDDEN, BLOCK_H):
        values, scales, offs_h, mask_h, offs_s, mask_s = _load_token_chunk(
            x_ptr, x_scales_ptr, t64, start, HIDDEN, NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE, BLOCK_H,
            ALIGNED)
        tl.store(ptr_x + offs_h, values, mask=mask_h)
        if NUM_SCALES > 0:
            tl.store(ptr_s + offs_s, scales, mask=mask_s)


@triton.jit
def _put_staged_token(peer_bases_ptr, rank, proxy, stage_row, row, sx_offset, sscales_offset, sids_offset,
                      sweights_offset, ssrc_offset, ix_offset, iscales_offset, iids_offset, iweights_offset,
                      isrc_offset, HIDDEN: tl.constexpr, TOPK: tl.constexpr, NUM_SCALES: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, SHMEM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Put the token staged at row ``stage_row`` of this rank's ``inter_stage_*`` regions into row
    ``row`` of ``proxy``'s ``inter_dispatch_*`` regions, field by field."""
    _put_row(peer_bases_ptr, rank, proxy, ix_offset, row, sx_offset, stage_row, HIDDEN, OUT_DTYPE, SHMEM, ALIGNED,
             BLOCK)
    if NUM_SCALES > 0:
        _put_row(peer_bases_ptr, rank, proxy, iscales_offset, row, sscales_offset, stage_row, NUM_SCALES, tl.float32,
                 SHMEM, False, BLOCK)
    _put_row(peer_bases_ptr, rank, proxy, iids_offset, row, sids_offset, stage_row, TOPK, tl.int32, SHMEM, False, BLOCK)
    _put_row(peer_bases_ptr, rank, proxy, iweights_offset, row, sweights_offset, stage_row, TOPK, tl.float32, SHMEM,
             False, BLOCK)
    _put_row(peer_bases_ptr, rank, proxy, isrc_offset, row, ssrc_offset, stage_row, 1, tl.int32, SHMEM, False, BLOCK)


@triton.jit
def _send_token_across(t, is_local, slot, node_t, node_slot_t, ids_t, x_ptr, x_scales_ptr, topk_weights_ptr,
                       send_mask_ptr, peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset,
                       src_offset, ix_offset, iscales_offset, iids_offset, iweights_offset, isrc_offset, sx_offset,
                       sscales_offset, sids_offset, sweights_offset, ssrc_offset, rank, my_node, my_local,
                       world_size, max_tokens, offs_r, mask_r, offs_n, offs_k, mask_k, HIDDEN: tl.constexpr,
                       TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr, NUM_SCALES: tl.constexpr,
                       QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       GPUS_PER_NODE: tl.constexpr, NUM_NODES: tl.constexpr, PUT: tl.constexpr,
                       SHMEM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_COPY: tl.constexpr, ALIGNED: tl.constexpr):
    """Token t of this rank: into row ``[rank, slot[d]]`` of each own-node rank d where
    ``is_local[d]``, and once to the proxy of each other node m where ``node_t[m]``, at row
    ``[my_node, node_slot_t[m]]`` of its inter-node regions (PUT: staged in the own arena, then put)."""
    _send_token(t, t, rank * max_tokens, is_local, slot, ids_t, x_ptr, x_scales_ptr, topk_weights_ptr,
                send_mask_ptr, peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset,
                world_size, EXPERTS_PER_RANK, offs_r, mask_r, offs_k, mask_k, 0, 1, HIDDEN, TOPK, NUM_SCALES,
                QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE, BLOCK_H, ALIGNED, False)
    for m in range(0, NUM_NODES):
        if tl.sum(tl.where(offs_n == m, node_t, 0), axis=0) > 0:
            slot_m = tl.sum(tl.where(offs_n == m, node_slot_t, 0), axis=0)
            if PUT:  # staged in the own arena (rows of node m), then put to the proxy
                _put_token_to_proxy(t, slot_m, rank, m, ids_t, x_ptr, x_scales_ptr, topk_weights_ptr, peer_bases_ptr,
                                    sx_offset, sscales_offset, sids_offset, sweights_offset, ssrc_offset, max_tokens,
                                    offs_k, mask_k, HIDDEN, TOPK, NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE,
                                    BLOCK_H, ALIGNED)
                _put_staged_token(peer_bases_ptr, rank, m * GPUS_PER_NODE + my_local, m * max_tokens + slot_m,
                                  my_node * max_tokens + slot_m, sx_offset, sscales_offset, sids_offset,
                                  sweights_offset, ssrc_offset, ix_offset, iscales_offset, iids_offset,
                                  iweights_offset, isrc_offset, HIDDEN, TOPK, NUM_SCALES, OUT_DTYPE, SHMEM, ALIGNED,
                                  BLOCK_COPY)
            else:
                _put_token_to_proxy(t, slot_m, m * GPUS_PER_NODE + my_local, my_node, ids_t, x_ptr, x_scales_ptr,
                                    topk_weights_ptr, peer_bases_ptr, ix_offset, iscales_offset, iids_offset,
                                    iweights_offset, isrc_offset, max_tokens, offs_k, mask_k, HIDDEN, TOPK,
                                    NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT, OUT_DTYPE, BLOCK_H, ALIGNED)


# Token and program counts are runtime values, unspecialised: every token count and bucket
# shares one compiled kernel (no compilation storm as batch sizes vary).
@triton.jit(do_not_specialize=("num_tokens", "send_programs", "forward_parts", "recv_parts", "num_programs"))
def _dispatch_internode_kernel(
        x_ptr, x_scales_ptr, topk_ids_ptr, topk_weights_ptr, slots_ptr, counts_ptr, block_hist_ptr,
        node_slots_ptr, node_counts_ptr, out_x_ptr, out_scales_ptr, out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr,
        out_num_tokens_ptr, out_tokens_per_expert_ptr, send_mask_ptr, fwd_token_ptr, fwd_mask_ptr, fwd_count_ptr,
        peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset, src_offset, count_offset,
        expert_counts_offset, signal_offset, ix_offset, iscales_offset, iids_offset, iweights_offset, isrc_offset,
        icount_offset, isignal_offset, sx_offset, sscales_offset, sids_offset, sweights_offset, ssrc_offset,
        ssignal_offset, counters_ptr, status_ptr,
        rank, world_size, num_tokens, max_tokens, max_polls, out_rows,
        HIDDEN: tl.constexpr, TOPK: tl.constexpr, EXPERTS_PER_RANK: tl.constexpr, NUM_SCALES: tl.constexpr,
        QUANTIZE: tl.constexpr, X_FP8: tl.constexpr, FP8_FORMAT: tl.constexpr, GPUS_PER_NODE: tl.constexpr,
        NUM_NODES: tl.constexpr, PUT: tl.constexpr, SHMEM: tl.constexpr, STAGED: tl.constexpr,
        send_programs, forward_parts, recv_parts,
        num_programs, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_COPY: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_ALL_E: tl.constexpr, ALIGNED: tl.constexpr):
    # x [num_tokens, HIDDEN] bf16 (or fp8 + x_scales when X_FP8); topk_ids / topk_weights [num_tokens, TOPK]
    # outputs [R * max_tokens, ...]; send_mask [num_tokens] int64; fwd_token / fwd_mask [N, max_tokens]
    # int32 / int64 and fwd_count [N] int32: what this rank forwarded, for combine
    OUT_DTYPE: tl.constexpr = out_x_ptr.dtype.element_ty
    ELEMENT_BYTES: tl.constexpr = OUT_DTYPE.primitive_bitwidth // 8
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    half = epoch % 2  # this call's half of every double-buffered region
    x_offset, scales_offset, ids_offset, weights_offset, src_offset, count_offset, signal_offset = _half_offsets(
        half, world_size, max_tokens, x_offset, scales_offset, ids_offset, weights_offset, src_offset, count_offset,
        signal_offset, HIDDEN * ELEMENT_BYTES, NUM_SCALES * 4, TOPK * 4)
    expert_counts_offset += half * world_size * EXPERTS_PER_RANK * 4
    ix_offset, iscales_offset, iids_offset, iweights_offset, isrc_offset, _, _ = _half_offsets(
        half, NUM_NODES, max_tokens, ix_offset, iscales_offset, iids_offset, iweights_offset, isrc_offset,
        icount_offset, isignal_offset, HIDDEN * ELEMENT_BYTES, NUM_SCALES * 4, TOPK * 4)
    icount_offset += half * NUM_NODES * 8  # 64-bit words: what the put transport writes
    isignal_offset += half * NUM_NODES * 8
    my_node = rank // GPUS_PER_NODE
    my_local = rank % GPUS_PER_NODE
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < world_size
    local_r = mask_r & (offs_r // GPUS_PER_NODE == my_node)  # [BLOCK_R] ranks of the own node
    offs_n = tl.arange(0, BLOCK_N)
    remote_n = (offs_n < NUM_NODES) & (offs_n != my_node)  # [BLOCK_N] the other nodes
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < TOPK
    if pid < send_programs:
        if STAGED:  # the stage kernel laid the tokens out (and quantised them): send programs only copy
            counts = tl.load(counts_ptr + offs_r, mask=local_r, other=0)  # [BLOCK_R] rows for own-node ranks
            node_counts = tl.load(node_counts_ptr + offs_n, mask=remote_n, other=0)  # [BLOCK_N]
            hist = _staged_histogram(block_hist_ptr, num_tokens, EXPERTS_PER_RANK * world_size, BLOCK_T, BLOCK_ALL_E)
            for t in range(pid, num_tokens, send_programs):
                slot = tl.load(slots_ptr + t * world_size + offs_r, mask=local_r, other=-1)
                node_slot_t = tl.load(node_slots_ptr + t * NUM_NODES + offs_n, mask=remote_n, other=-1)
                ids_t = tl.load(topk_ids_ptr + t * TOPK + offs_k, mask=mask_k, other=-1).to(tl.int32)
                _send_token_across(t, (slot >= 0).to(tl.int32), slot, (node_slot_t >= 0).to(tl.int32), node_slot_t,
                                   ids_t, x_ptr, x_scales_ptr, topk_weights_ptr, send_mask_ptr, peer_bases_ptr,
                                   x_offset, scales_offset, ids_offset, weights_offset, src_offset, ix_offset,
                                   iscales_offset, iids_offset, iweights_offset, isrc_offset, sx_offset,
                                   sscales_offset, sids_offset, sweights_offset, ssrc_offset, rank, my_node, my_local,
                                   world_size, max_tokens, offs_r, mask_r, offs_n, offs_k, mask_k, HIDDEN, TOPK,
                                   EXPERTS_PER_RANK, NUM_SCALES, False, X_FP8, FP8_FORMAT, OUT_DTYPE, GPUS_PER_NODE,
                                   NUM_NODES, PUT, SHMEM, BLOCK_H, BLOCK_COPY, ALIGNED)
        else:  # every send program routes all tokens itself (one pass) and quantises its own
            counts = tl.zeros([BLOCK_R], tl.int32)  # earlier tokens bound for each own-node rank
            node_counts = tl.zeros([BLOCK_N], tl.int32)  # earlier tokens bound for each other node
            hist = tl.zeros([BLOCK_ALL_E], tl.int32)
            for chunk in range(0, num_tokens, BLOCK_T):
                if pid == 0:
                    _check_ids(topk_ids_ptr, chunk, num_tokens, EXPERTS_PER_RANK * world_size, status_ptr, epoch,
                               offs_k, mask_k, TOPK, BLOCK_T)
                offs_t, ids, is_dst = _route_block(topk_ids_ptr, chunk, num_tokens, offs_r, offs_k, mask_k, TOPK,
                                                   EXPERTS_PER_RANK, BLOCK_T, EXPERTS_PER_RANK * world_size)
                is_local = tl.where(local_r[None, :], is_dst, 0)  # [BLOCK_T, BLOCK_R]
                is_node = _nodes_hit(is_dst, offs_r, offs_n, my_node, GPUS_PER_NODE, NUM_NODES)  # [BLOCK_T, BLOCK_N]
                slots = tl.cumsum(is_local, axis=0) - is_local + counts[None, :]
                node_slots = tl.cumsum(is_node, axis=0) - is_node + node_counts[None, :]
                first = chunk + (pid - chunk % send_programs + send_programs) % send_programs
                for t in range(first, tl.minimum(chunk + BLOCK_T, num_tokens), send_programs):
                    sel = (offs_t == t)[:, None]
                    tl.store(send_mask_ptr + t, _bits(tl.sum(tl.where(sel, is_dst, 0), axis=0) > 0, offs_r))
                    _send_token_across(t, tl.sum(tl.where(sel, is_local, 0), axis=0),
                                       tl.sum(tl.where(sel, slots, 0), axis=0), tl.sum(tl.where(sel, is_node, 0), axis=0),
                                       tl.sum(tl.where(sel, node_slots, 0), axis=0), tl.sum(tl.where(sel, ids, 0), axis=0),
                                       x_ptr, x_scales_ptr, topk_weights_ptr, send_mask_ptr, peer_bases_ptr,
                                       x_offset, scales_offset, ids_offset, weights_offset, src_offset, ix_offset,
                                       iscales_offset, iids_offset, iweights_offset, isrc_offset, sx_offset,
                                       sscales_offset, sids_offset, sweights_offset, ssrc_offset, rank, my_node,
                                       my_local, world_size, max_tokens, offs_r, mask_r, offs_n, offs_k, mask_k,
                                       HIDDEN, TOPK, EXPERTS_PER_RANK, NUM_SCALES, QUANTIZE, X_FP8, FP8_FORMAT,
                                       OUT_DTYPE, GPUS_PER_NODE, NUM_NODES, PUT, SHMEM, BLOCK_H, BLOCK_COPY, ALIGNED)
                counts += tl.sum(is_local, axis=0)
                node_counts += tl.sum(is_node, axis=0)
                hist += _expert_histogram(ids, BLOCK_ALL_E)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r, local_r, send_programs)
        _announce_rows(peer_bases_ptr, count_offset, expert_counts_offset, signal_offset, rank, counts, hist, last,
                       offs_r, world_size, epoch, EXPERTS_PER_RANK)
        if PUT:
            _complete_puts(SHMEM)  # before arriving: the last arriver signals for every sender
        last_n = _arrive(counters_ptr + SEND_ARRIVALS + world_size + offs_n, remote_n, send_programs)
        for m in range(0, NUM_NODES):  # the row count, then the epoch that signals it
            if tl.sum(tl.where(offs_n == m, last_n.to(tl.int32), 0), axis=0) > 0:
                proxy = m * GPUS_PER_NODE + my_local
                count_m = tl.sum(tl.where(offs_n == m, node_counts, 0), axis=0)
                _put_word(peer_bases_ptr, rank, proxy, icount_offset + my_node * 8, ssignal_offset + m * 8, count_m,
                          SHMEM)
                _put_word(peer_bases_ptr, rank, proxy, isignal_offset + my_node * 8, ssignal_offset + m * 8, epoch,
                          SHMEM)
    elif pid < send_programs + NUM_NODES * forward_parts:
        node = (pid - send_programs) // forward_parts
        part = (pid - send_programs) % forward_parts
        src_rank = node * GPUS_PER_NODE + my_local  # whose tokens this program forwards
        if node == my_node:
            if part == 0:
                tl.store(fwd_count_ptr + node, 0)
        else:
            offs_one = tl.arange(0, 1) + node
            # 64-bit slots: the epoch is the low half of slot `node` (int32 index 2 * node)
            _wait_peers(peer_bases_ptr, isignal_offset, status_ptr, rank, offs_one * 2, offs_one * 0 + src_rank,
                        offs_one < NUM_NODES, epoch, epoch, PHASE_DISPATCH_RECV, max_polls, 0, 0, 1)
            staged = tl.load(_peer_ptr(peer_bases_ptr, rank, icount_offset + node * 8, tl.int64),
                             volatile=True).to(tl.int32)
            if part == 0:
                tl.store(fwd_count_ptr + node, staged)
            first_row = node * max_tokens
            base_x = _peer_ptr(peer_bases_ptr, rank, ix_offset, OUT_DTYPE)
            base_scales = _peer_ptr(peer_bases_ptr, rank, iscales_offset, tl.float32)
            base_ids = _peer_ptr(peer_bases_ptr, rank, iids_offset, tl.int32) + first_row * TOPK
            base_weights = _peer_ptr(peer_bases_ptr, rank, iweights_offset, tl.float32)
            base_src = _peer_ptr(peer_bases_ptr, rank, isrc_offset, tl.int32) + first_row
            counts = tl.zeros([BLOCK_R], tl.int32)
            hist = tl.zeros([BLOCK_ALL_E], tl.int32)
            for chunk in range(0, staged, BLOCK_T):
                offs_t, ids, is_dst = _route_block(base_ids, chunk, staged, offs_r, offs_k, mask_k, TOPK,
                                                   EXPERTS_PER_RANK, BLOCK_T, EXPERTS_PER_RANK * world_size)
                is_dst = tl.where(local_r[None, :], is_dst, 0)  # [BLOCK_T, BLOCK_R] own-node ranks only
                slots = tl.cumsum(is_dst, axis=0) - is_dst + counts[None, :]
                first = chunk + (part - chunk % forward_parts + forward_parts) % forward_parts
                for i in range(first, tl.minimum(chunk + BLOCK_T, staged), forward_parts):
                    sel = (offs_t == i)[:, None]
                    dst_i = tl.sum(tl.where(sel, is_dst, 0), axis=0)
                    token = tl.load(base_src + i)
                    _send_token(token, first_row + i, src_rank * max_tokens, dst_i,
                                tl.sum(tl.where(sel, slots, 0), axis=0), tl.sum(tl.where(sel, ids, 0), axis=0),
                                base_x, base_scales, base_weights, send_mask_ptr, peer_bases_ptr, x_offset,
                                scales_offset, ids_offset, weights_offset, src_offset, world_size, EXPERTS_PER_RANK,
                                offs_r, mask_r, offs_k, mask_k, 0, 1, HIDDEN, TOPK, NUM_SCALES, False,
                                NUM_SCALES > 0, FP8_FORMAT, OUT_DTYPE, BLOCK_H, ALIGNED, False)
                    tl.store(fwd_token_ptr + first_row + i, token)
                    tl.store(fwd_mask_ptr + first_row + i, _bits(dst_i > 0, offs_r))
                counts += tl.sum(is_dst, axis=0)
                hist += _expert_histogram(ids, BLOCK_ALL_E)
            offs_one = tl.arange(0, 1)
            last_one = _arrive(counters_ptr + RECV_ARRIVALS + src_rank + offs_one, offs_one < 1, forward_parts)
            last = _mask_if(local_r, tl.max(last_one.to(tl.int32), axis=0) > 0)
            _announce_rows(peer_bases_ptr, count_offset, expert_counts_offset, signal_offset, src_rank, counts, hist,
                           last, offs_r, world_size, epoch, EXPERTS_PER_RANK)
    else:
        _receive_program(pid - send_programs - NUM_NODES * forward_parts, epoch, rank, world_size, max_tokens,
                         max_polls, out_rows, peer_bases_ptr, x_offset, scales_offset, ids_offset, weights_offset,
                         src_offset, count_offset, expert_counts_offset, signal_offset, status_ptr, out_x_ptr, out_scales_ptr,
                         out_topk_ids_ptr, out_topk_weights_ptr, out_src_ptr, out_num_tokens_ptr,
                         out_tokens_per_expert_ptr, offs_r, mask_r, recv_parts, 0, 0, HIDDEN, TOPK,
                         EXPERTS_PER_RANK, NUM_SCALES, OUT_DTYPE, BLOCK_COPY, BLOCK_R, BLOCK_E,
                         ALIGNED)  # (0, 0: inter-node calls are not announced)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, num_programs)


# Token and program counts are runtime values, unspecialised: every token count and bucket
# shares one compiled kernel (no compilation storm as batch sizes vary).
@triton.jit(do_not_specialize=("num_tokens", "send_programs", "proxy_programs", "reduce_programs", "num_programs"))
def _combine_internode_kernel(
        y_ptr, src_ptr, num_recv_ptr, send_mask_ptr, fwd_token_ptr, fwd_mask_ptr, fwd_count_ptr, out_ptr,
        peer_bases_ptr, direct_offset, direct_signal_offset, inter_offset, inter_signal_offset, node_offset,
        node_signal_offset, stage_offset, ssignal_offset, counters_ptr, status_ptr, rank, world_size, num_tokens,
        max_tokens, max_polls, HIDDEN: tl.constexpr, GPUS_PER_NODE: tl.constexpr, NUM_NODES: tl.constexpr,
        PUT: tl.constexpr, SHMEM: tl.constexpr, send_programs,
        proxy_programs, reduce_programs, num_programs,
        BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
        ALIGNED: tl.constexpr):
    # y [R * M, HIDDEN] bf16; src [R * M, 2] int32; num_recv [1]; send_mask [num_tokens] int64;
    # ALIGNED: bf16 rows are 16-byte multiples, declared on every row pointer made from a peer base
    # fwd_token / fwd_mask [N, M], fwd_count [N] (from the dispatch); out [num_tokens, HIDDEN] bf16
    pid = tl.program_id(0)
    epoch = _launch_epoch(counters_ptr)
    half = epoch % 2
    direct_offset += (world_size * max_tokens).to(tl.int64) * HIDDEN * 2 * half
    direct_signal_offset += half * world_size * 4
    inter_offset += (GPUS_PER_NODE * NUM_NODES * max_tokens).to(tl.int64) * HIDDEN * 2 * half
    inter_signal_offset += half * GPUS_PER_NODE * 4
    node_offset += (NUM_NODES * max_tokens).to(tl.int64) * HIDDEN * 2 * half
    node_signal_offset += half * NUM_NODES * 8  # 64-bit words: what the put transport writes
    my_node = rank // GPUS_PER_NODE
    my_local = rank % GPUS_PER_NODE
    offs_r = tl.arange(0, BLOCK_R)
    local_r = (offs_r < world_size) & (offs_r // GPUS_PER_NODE == my_node)
    offs_n = tl.arange(0, BLOCK_N)
    remote_n = (offs_n < NUM_NODES) & (offs_n != my_node)
    same_local = tl.where(offs_n < NUM_NODES, offs_n * GPUS_PER_NODE + my_local, 0)  # [BLOCK_N] (node, my local)
    offs_g = tl.arange(0, BLOCK_G)
    if pid < send_programs:
        num_recv = tl.load(num_recv_ptr)
        for n in range(pid, num_recv, send_programs):
            i = _rotated(n, num_recv, rank, world_size)  # not all ranks into rank 0 first
            src_rank = tl.load(src_ptr + 2 * i)
            token = tl.load(src_ptr + 2 * i + 1).to(tl.int64)
            src_node = src_rank // GPUS_PER_NODE
            if src_node == my_node:
                ptr_dst = _row(_peer_ptr(peer_bases_ptr, src_rank, direct_offset, tl.bfloat16),
                               rank * max_tokens + token, HIDDEN, ALIGNED)
            else:
                proxy = my_node * GPUS_PER_NODE + src_rank % GPUS_PER_NODE
                ptr_dst = _row(_peer_ptr(peer_bases_ptr, proxy, inter_offset, tl.bfloat16),
                               (my_local * NUM_NODES + src_node) * max_tokens + token, HIDDEN, ALIGNED)
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < HIDDEN
                tl.store(ptr_dst + offs_h, tl.load(y_ptr + tl.cast(i, tl.int64) * HIDDEN + offs_h, mask=mask_h),
                         mask=mask_h)
        last = _arrive(counters_ptr + SEND_ARRIVALS + offs_r, local_r, send_programs)
        _signal_peers(peer_bases_ptr, direct_signal_offset, rank, offs_r, last, epoch)
        _signal_peers(peer_bases_ptr, inter_signal_offset, my_local, offs_r, last, epoch)
    elif pid < send_programs + proxy_programs:
        q = pid - send_programs
        _wait_peers(peer_bases_ptr, inter_signal_offset, status_ptr, rank, offs_g, my_node * GPUS_PER_NODE + offs_g,
                    offs_g < GPUS_PER_NODE, epoch, epoch, PHASE_COMBINE_RECV, max_polls, 0, 0, BLOCK_G)
        base = _peer_ptr(peer_bases_ptr, rank, inter_offset, tl.bfloat16)
        for k in range(0, NUM_NODES):  # from the next node on: the proxies do not all send to node 0 first
            node = (my_node + 1 + k) % NUM_NODES
            forwarded = tl.load(fwd_count_ptr + node)  # 0 for the own node
            for i in range(q, forwarded, proxy_programs):
                token = tl.load(fwd_token_ptr + node * max_tokens + i).to(tl.int64)
                sent_to = tl.load(fwd_mask_ptr + node * max_tokens + i)
                dst_rank = node * GPUS_PER_NODE + my_local
                if PUT:  # the sum is staged in the own arena, then put
                    ptr_dst = _row(_peer_ptr(peer_bases_ptr, rank, stage_offset, tl.bfloat16),
                                   node * max_tokens + token, HIDDEN, ALIGNED)
                else:
                    ptr_dst = _row(_peer_ptr(peer_bases_ptr, dst_rank, node_offset, tl.bfloat16),
                                   my_node * max_tokens + token, HIDDEN, ALIGNED)
                for start in range(0, HIDDEN, BLOCK_H):
                    offs_h = start + tl.arange(0, BLOCK_H)
                    mask_h = offs_h < HIDDEN
                    acc = tl.zeros([BLOCK_H], tl.float32)
                    for g in range(0, GPUS_PER_NODE):
                        sent = ((sent_to >> (my_node * GPUS_PER_NODE + g)) & 1) != 0
                        ptr_part = _row(base, (g * NUM_NODES + node) * max_tokens + token, HIDDEN, ALIGNED)
                        acc += tl.load(ptr_part + offs_h, mask=_mask_if(mask_h, sent), other=0.0).to(tl.float32)
                    tl.store(ptr_dst + offs_h, _to_bf16(acc), mask=mask_h)
                if PUT:
                    _put_row(peer_bases_ptr, rank, dst_rank, node_offset, my_node * max_tokens + token, stage_offset,
                             node * max_tokens + token, HIDDEN, tl.bfloat16, SHMEM, ALIGNED, BLOCK_H)
        if PUT:
            _complete_puts(SHMEM)  # before arriving: the last arriver signals for every proxy program
        last = _arrive(counters_ptr + RECV_ARRIVALS + offs_n, remote_n, proxy_programs)
        for node in range(0, NUM_NODES):
            if tl.sum(tl.where(offs_n == node, last.to(tl.int32), 0), axis=0) > 0:
                _put_word(peer_bases_ptr, rank, node * GPUS_PER_NODE + my_local, node_signal_offset + my_node * 8,
                          ssignal_offset + node * 8, epoch, SHMEM)
    else:
        _wait_peers(peer_bases_ptr, direct_signal_offset, status_ptr, rank, offs_r, offs_r, local_r, epoch, epoch,
                    PHASE_COMBINE_RECV, max_polls, 0, 0, BLOCK_R)
        _wait_peers(peer_bases_ptr, node_signal_offset, status_ptr, rank, offs_n * 2, same_local, remote_n, epoch,
                    epoch, PHASE_COMBINE_RECV, max_polls, 0, 0, BLOCK_N)  # the low halves of 64-bit slots
        direct = _peer_ptr(peer_bases_ptr, rank, direct_offset, tl.bfloat16)
        from_nodes = _peer_ptr(peer_bases_ptr, rank, node_offset, tl.bfloat16)
        for t in range(pid - send_programs - proxy_programs, num_tokens, reduce_programs):
            sent_to = tl.load(send_mask_ptr + t)
            t64 = tl.cast(t, tl.int64)
            for start in range(0, HIDDEN, BLOCK_H):
                offs_h = start + tl.arange(0, BLOCK_H)
                mask_h = offs_h < HIDDEN
                acc = tl.zeros([BLOCK_H], tl.float32)
                for node in range(0, NUM_NODES):
                    if node == my_node:
                        node_acc = tl.zeros([BLOCK_H], tl.float32)
                        for g in range(0, GPUS_PER_NODE):
                            d = node * GPUS_PER_NODE + g
                            sent = ((sent_to >> d) & 1) != 0
                            ptr_part = _row(direct, d * max_tokens + t64, HIDDEN, ALIGNED)
                            node_acc += tl.load(ptr_part + offs_h, mask=_mask_if(mask_h, sent),
                                                other=0.0).to(tl.float32)
                        acc += node_acc
                    else:
                        node_bits = (sent_to >> (node * GPUS_PER_NODE)) & ((1 << GPUS_PER_NODE) - 1)
                        ptr_part = _row(from_nodes, node * max_tokens + t64, HIDDEN, ALIGNED)
                        acc += tl.load(ptr_part + offs_h, mask=_mask_if(mask_h, node_bits != 0),
                                       other=0.0).to(tl.float32)
                tl.store(out_ptr + t64 * HIDDEN + offs_h, _to_bf16(acc), mask=mask_h)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, num_programs)


_COMMON = {"peer_bases_ptr": "*i64", "counters_ptr": "*i32", "status_ptr": "*i32", "rank": "i32",
           "world_size": "i32", "num_tokens": "i32", "max_tokens": "i32", "max_polls": "i32"}
register(_dispatch_internode_kernel,
         {**{name: "i32" for name in ("send_programs", "forward_parts", "recv_parts", "num_programs", "out_rows")},
          "x_ptr": "*bf16", "x_scales_ptr": "*fp32", "topk_ids_ptr": "*i64", "topk_weights_ptr": "*fp32",
          "slots_ptr": "*i32", "counts_ptr": "*i32", "block_hist_ptr": "*i32", "node_slots_ptr": "*i32",
          "node_counts_ptr": "*i32", "out_x_ptr": "*fp8e4nv", "out_scales_ptr": "*fp32", "out_topk_ids_ptr": "*i32",
          "out_topk_weights_ptr": "*fp32", "out_src_ptr": "*i32", "out_num_tokens_ptr": "*i32",
          "out_tokens_per_expert_ptr": "*i32", "send_mask_ptr": "*i64", "fwd_token_ptr": "*i32",
          "fwd_mask_ptr": "*i64", "fwd_count_ptr": "*i32", **_COMMON,
          **{name: "i64" for name in ("x_offset", "scales_offset", "ids_offset", "weights_offset", "src_offset",
                                      "count_offset", "expert_counts_offset", "signal_offset", "ix_offset",
                                      "iscales_offset", "iids_offset", "iweights_offset", "isrc_offset",
                                      "icount_offset", "isignal_offset", "sx_offset", "sscales_offset",
                                      "sids_offset", "sweights_offset", "ssrc_offset", "ssignal_offset")}},
         {"HIDDEN": 7168, "TOPK": 8, "EXPERTS_PER_RANK": 64, "NUM_SCALES": 56, "QUANTIZE": True, "X_FP8": False,
          "FP8_FORMAT": E4M3FN.value,
          "GPUS_PER_NODE": 2, "NUM_NODES": 2, "PUT": False, "SHMEM": False, "STAGED": False, "BLOCK_T": 128, "BLOCK_H": 8192, "BLOCK_COPY": 8192,
          "BLOCK_R": 4, "BLOCK_N": 2, "BLOCK_K": 8, "BLOCK_E": 64, "BLOCK_ALL_E": 256, "ALIGNED": True})
register(_combine_internode_kernel,
         {**{name: "i32" for name in ("send_programs", "proxy_programs", "reduce_programs", "num_programs")},
          "y_ptr": "*bf16", "src_ptr": "*i32", "num_recv_ptr": "*i32", "send_mask_ptr": "*i64",
          "fwd_token_ptr": "*i32", "fwd_mask_ptr": "*i64", "fwd_count_ptr": "*i32", "out_ptr": "*bf16", **_COMMON,
          **{name: "i64" for name in ("direct_offset", "direct_signal_offset", "inter_offset", "inter_signal_offset",
                                      "node_offset", "node_signal_offset", "stage_offset", "ssignal_offset")}},
         {"HIDDEN": 7168, "GPUS_PER_NODE": 2, "NUM_NODES": 2, "PUT": False, "SHMEM": False, "BLOCK_H": 4096, "BLOCK_R": 4, "BLOCK_N": 2, "BLOCK_G": 2,
          "ALIGNED": True})


# The put transport's structure (staged rows, puts, 64-bit words) with its emulated puts; the
# NVSHMEM/rocSHMEM variant (SHMEM) needs the vendor's device library and builds only on GPUs.
_DISPATCH_SPEC, _COMBINE_SPEC = KERNELS[-2], KERNELS[-1]
for _spec in (_DISPATCH_SPEC, _COMBINE_SPEC):
    register(_spec.kernel, _spec.signature, {**_spec.constexprs, "PUT": True})
# The HT variant's dispatch (staged, pre-quantised input), with puts.
register(_dispatch_internode_kernel, _DISPATCH_SPEC.signature,
         {**_DISPATCH_SPEC.constexprs, "PUT": True, "STAGED": True, "QUANTIZE": False, "X_FP8": True})
# MI300X's fp8 (float8_e4m3fnuz): the LL variant, which quantises.
register(_dispatch_internode_kernel, {**_DISPATCH_SPEC.signature, "out_x_ptr": "*fp8e4b8"},
         {**_DISPATCH_SPEC.constexprs, "FP8_FORMAT": E4M3FNUZ.value})


def _stage_offsets(heap, cfg, names) -> list[int]:
    """The offsets of the put transport's staging regions (zeros where the legs are peer stores:
    the kernel never reads them then)."""
    return [heap.offset(name) if cfg.inter_puts else 0 for name in names]


_WITH_SHMEM: dict = {}


def _launchable(kernel, cfg):
    """``kernel``, or (NVSHMEM/rocSHMEM puts) its variant linked with the vendor's device library."""
    if not cfg.inter_shmem:
        return kernel
    if kernel not in _WITH_SHMEM:
        _WITH_SHMEM[kernel] = shmem.with_shmem(kernel)
    return _WITH_SHMEM[kernel]


def launch_dispatch_internode(heap, sync, cfg, params, x, x_scales, topk_ids, topk_weights, out,
                              staging=None) -> None:
    """The inter-node dispatch of this rank's tokens into ``out`` (inputs as ``launch_dispatch``'s;
    ``out.handle`` carries the forwarding record). ``staging`` (``HtStaging``): the HT variant —
    the stage kernel lays the tokens out and quantises them with the whole GPU first; None: the
    LL variant. Inputs are validated by the caller (``Buffer``)."""
    world = heap.world_size
    nodes = cfg.nodes(world)
    per_node = world // nodes
    experts_per_rank = cfg.experts_per_rank(world)
    handle = out.handle
    staged = staging is not None
    if staged:
        x, x_scales = launch_stage(heap, sync, cfg, params, staging, x, x_scales, topk_ids, handle.send_mask, nodes,
                                   op="dispatch_inter")
    layout = (staging.slots, staging.counts, staging.block_hist(params.block_t), staging.node_slots,
              staging.node_counts) if staged else (handle.send_mask,) * 5  # placeholders the LL variant never reads
    num_programs = params.send_programs + nodes * params.forward_parts + world * params.recv_parts + 1
    stage = _stage_offsets(heap, cfg, ("inter_stage_x", "inter_stage_scales", "inter_stage_topk_ids",
                                       "inter_stage_topk_weights", "inter_stage_src_token", "inter_stage_signal"))
    sync.before_launch()
    _launchable(_dispatch_internode_kernel, cfg)[(num_programs,)](
        x_ptr=_platform.kernel_arg(x), x_scales_ptr=x_scales if x_scales is not None else out.topk_weights,
        topk_ids_ptr=topk_ids, topk_weights_ptr=topk_weights, slots_ptr=layout[0], counts_ptr=layout[1],
        block_hist_ptr=layout[2], node_slots_ptr=layout[3], node_counts_ptr=layout[4],
        out_x_ptr=_platform.kernel_arg(out.x),
        out_scales_ptr=out.x_scales if out.x_scales is not None else out.topk_weights,
        out_topk_ids_ptr=out.topk_ids, out_topk_weights_ptr=out.topk_weights, out_src_ptr=out.src,
        out_num_tokens_ptr=out.num_tokens, out_tokens_per_expert_ptr=out.tokens_per_expert,
        send_mask_ptr=handle.send_mask, fwd_token_ptr=handle.forwarded_token, fwd_mask_ptr=handle.forwarded_mask,
        fwd_count_ptr=handle.forwarded_count, peer_bases_ptr=heap.peer_bases,
        x_offset=heap.offset("ll_dispatch_x"), scales_offset=heap.offset("ll_dispatch_scales"),
        ids_offset=heap.offset("ll_dispatch_topk_ids"), weights_offset=heap.offset("ll_dispatch_topk_weights"),
        src_offset=heap.offset("ll_dispatch_src_token"), count_offset=heap.offset("ll_dispatch_count"),
        expert_counts_offset=heap.offset("ll_dispatch_expert_counts"), signal_offset=heap.offset("ll_dispatch_signal"),
        ix_offset=heap.offset("inter_dispatch_x"), iscales_offset=heap.offset("inter_dispatch_scales"),
        iids_offset=heap.offset("inter_dispatch_topk_ids"), iweights_offset=heap.offset("inter_dispatch_topk_weights"),
        isrc_offset=heap.offset("inter_dispatch_src_token"), icount_offset=heap.offset("inter_dispatch_count"),
        isignal_offset=heap.offset("inter_dispatch_signal"), sx_offset=stage[0], sscales_offset=stage[1],
        sids_offset=stage[2], sweights_offset=stage[3], ssrc_offset=stage[4], ssignal_offset=stage[5],
        counters_ptr=sync.counters("dispatch_inter"),
        status_ptr=sync.status, rank=heap.rank, world_size=world, num_tokens=x.shape[0],
        max_tokens=cfg.max_tokens_per_rank, max_polls=sync.max_polls, out_rows=out.topk_ids.shape[0], HIDDEN=cfg.hidden,
        TOPK=cfg.topk, EXPERTS_PER_RANK=experts_per_rank, NUM_SCALES=cfg.num_scales, QUANTIZE=cfg.fp8 and x_scales is None,
        X_FP8=x_scales is not None, FP8_FORMAT=fp8_format(cfg.dispatch_dtype), GPUS_PER_NODE=per_node, NUM_NODES=nodes,
        PUT=cfg.inter_puts,
        SHMEM=cfg.inter_shmem, STAGED=staged, send_programs=params.send_programs,
        forward_parts=params.forward_parts, recv_parts=params.recv_parts, num_programs=num_programs,
        BLOCK_T=params.block_t, BLOCK_H=params.block_h, BLOCK_COPY=params.block_copy,
        BLOCK_R=triton.next_power_of_2(world), BLOCK_N=triton.next_power_of_2(nodes),
        BLOCK_K=triton.next_power_of_2(cfg.topk), BLOCK_E=triton.next_power_of_2(experts_per_rank),
        BLOCK_ALL_E=triton.next_power_of_2(cfg.num_experts),
        ALIGNED=rows_aligned(cfg, x, out), num_warps=params.num_warps)
    sync.after_launch()


def launch_combine_internode(heap, sync, cfg, params, y, handle, out) -> None:
    """The inter-node combine of ``y`` ([capacity, hidden] bf16) into ``out`` ([handle.num_tokens,
    hidden] bf16). Inputs are validated by the caller (``Buffer``)."""
    world = heap.world_size
    nodes = cfg.nodes(world)
    per_node = world // nodes
    num_programs = params.send_programs + params.proxy_programs + params.reduce_programs
    stage = _stage_offsets(heap, cfg, ("node_stage_x", "inter_stage_signal"))
    sync.before_launch()
    _launchable(_combine_internode_kernel, cfg)[(num_programs,)](
        y_ptr=y, src_ptr=handle.src, num_recv_ptr=handle.num_recv_tokens, send_mask_ptr=handle.send_mask,
        fwd_token_ptr=handle.forwarded_token, fwd_mask_ptr=handle.forwarded_mask,
        fwd_count_ptr=handle.forwarded_count, out_ptr=out, peer_bases_ptr=heap.peer_bases,
        direct_offset=heap.offset("ll_combine_x"), direct_signal_offset=heap.offset("ll_combine_signal"),
        inter_offset=heap.offset("inter_combine_x"), inter_signal_offset=heap.offset("inter_combine_signal"),
        node_offset=heap.offset("node_combine_x"), node_signal_offset=heap.offset("node_combine_signal"),
        stage_offset=stage[0], ssignal_offset=stage[1],
        counters_ptr=sync.counters("combine_inter"), status_ptr=sync.status, rank=heap.rank, world_size=world,
        num_tokens=handle.num_tokens, max_tokens=cfg.max_tokens_per_rank, max_polls=sync.max_polls, HIDDEN=cfg.hidden,
        GPUS_PER_NODE=per_node, NUM_NODES=nodes, PUT=cfg.inter_puts, SHMEM=cfg.inter_shmem,
        send_programs=params.send_programs, proxy_programs=params.proxy_programs, reduce_programs=params.reduce_programs, num_programs=num_programs,
        BLOCK_H=params.block_h, BLOCK_R=triton.next_power_of_2(world), BLOCK_N=triton.next_power_of_2(nodes),
        BLOCK_G=triton.next_power_of_2(per_node), ALIGNED=cfg.hidden % 8 == 0, num_warps=params.num_warps)
    sync.after_launch()
