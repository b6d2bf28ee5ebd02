"""The baselines bench_ep times beside moe_ep, each as a torch user would write it.

``nccl-padded`` (``PaddedNccl``): what a careful torch user writes, and the bar to beat. Fixed
capacity per destination: every rank sends ``capacity`` rows (its tokens, padded) to every rank,
row ``t`` of destination d being token ``t`` (its payload only where the token has an expert on
d; a row whose local top-k ids are all -1 is padding). One launch packs (and quantises, fp8: 1x128
block scales, exactly as ``moe_ep.reference.quantize_fp8``) every token once for all
destinations; one ``all_to_all_single`` with equal splits moves the rows (so no count exchange
and no host synchronisation); the receiver reads its rows in place (valid where any local id is
>= 0). Combine: one ``all_to_all_single`` returns the expert outputs in the same slots, and one
launch sums each token's rows from the ranks that hold its experts, in rank order in float32,
then rounds to bf16 (bit for bit ``moe_ep.reference.combine``). No host synchronisation, no
allocation per call (static buffers): the benchmark captures it in a CUDA graph. Row layout,
``row_bytes`` (a multiple of 16) per row:
    [0, payload)            fp8 codes [hidden] + float32 scales [hidden // 128], or bf16 [hidden]
    [payload, +4 * topk)    int32 local expert ids (-1: not on this rank)
    [+4 * topk, +8 * topk)  float32 weights (0 where the id is -1)
The padding costs bytes: every destination gets ``capacity`` rows, however many tokens go there.

``nccl-naive`` (``naive_dispatch`` / ``naive_combine``): what a hurried torch user writes.
Dispatch: quantise (fp8), replicate each token once per destination rank, sort by destination,
exchange the counts (a host synchronisation), ``all_to_all_single`` the packed rows.
Combine: ``all_to_all_single`` the expert outputs back, then sum each token's partials.
About 30 eager kernels and two host synchronisations per dispatch.

``nvshmem-vdev2d`` (``VdevBaseline``): torch's NVSHMEM ``all_to_all_vdev_2d`` (see its class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_ep import reference  # noqa: I001  (first: on a CPU machine it selects Triton's interpreter)
import triton
import triton.language as tl

from moe_ep.kernels.numerics import E4M3FN, _quantize_fp8, _to_bf16
from moe_ep.kernels.registry import KernelSpec
from moe_ep.transport.primitives import _mask_if

# -- nccl-padded ----------------------------------------------------------------------------------


@triton.jit
def _padded_pack_kernel(x_ptr, topk_ids_ptr, topk_weights_ptr, send_ptr, dest_ptr, num_tokens, capacity,
                        experts_per_rank, HIDDEN: tl.constexpr, TOPK: tl.constexpr, WORLD: tl.constexpr,
                        FP8: tl.constexpr, PAYLOAD_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # x_ptr: [num_tokens, HIDDEN] bf16; topk_ids_ptr: [num_tokens, TOPK] int32/int64 global ids;
    # topk_weights_ptr: [num_tokens, TOPK] float32; send_ptr: [WORLD, capacity, ROW_BYTES] uint8,
    # row (d, t) for rank d; dest_ptr: [capacity, WORLD] int32, 1 where token t goes to rank d.
    # One program per slot t < capacity; slots >= num_tokens only get their ids set to -1.
    slot = tl.program_id(0)
    is_token = slot < num_tokens
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = _mask_if(offs_k < TOPK, is_token)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < WORLD
    ids = tl.load(topk_ids_ptr + slot * TOPK + offs_k, mask=mask_k, other=-1).to(tl.int32)  # [BLOCK_K]
    weights = tl.load(topk_weights_ptr + slot * TOPK + offs_k, mask=mask_k, other=0.0)  # [BLOCK_K]
    owner = tl.where(ids >= 0, ids // experts_per_rank, -1)
    here = (owner[None, :] == offs_r[:, None]) & mask_k[None, :]  # [BLOCK_R, BLOCK_K]
    hit = tl.sum(here.to(tl.int32), axis=1) > 0  # [BLOCK_R]
    ptr_rows = send_ptr + (offs_r * capacity + slot).to(tl.int64) * ROW_BYTES  # [BLOCK_R] uint8
    local_ids = tl.where(here, ids[None, :] - offs_r[:, None] * experts_per_rank, -1)  # [BLOCK_R, BLOCK_K]
    mask_meta = mask_r[:, None] & (offs_k < TOPK)[None, :]
    tl.store((ptr_rows + PAYLOAD_BYTES).to(tl.pointer_type(tl.int32))[:, None] + offs_k[None, :], local_ids,
             mask=mask_meta)
    tl.store((ptr_rows + PAYLOAD_BYTES + 4 * TOPK).to(tl.pointer_type(tl.float32))[:, None] + offs_k[None, :],
             tl.where(here, weights[None, :], 0.0), mask=mask_meta)
    tl.store(dest_ptr + slot * WORLD + offs_r, hit.to(tl.int32), mask=mask_r)
    mask_rows = hit & mask_r
    offs_h = tl.arange(0, BLOCK_H)
    for start in range(0, HIDDEN, BLOCK_H):
        mask_h = start + offs_h < HIDDEN
        x = tl.load(x_ptr + slot.to(tl.int64) * HIDDEN + start + offs_h, mask=_mask_if(mask_h, is_token),
                    other=0.0)
        mask_x = mask_rows[:, None] & mask_h[None, :]  # [BLOCK_R, BLOCK_H]
        if FP8:
            q, scales = _quantize_fp8(x.to(tl.float32), BLOCK_H, E4M3FN,
                                      tl.float8e4nv)  # [BLOCK_H] fp8, [BLOCK_H // 128] float32
            tl.store(ptr_rows.to(tl.pointer_type(tl.float8e4nv))[:, None] + start + offs_h[None, :],
                     tl.broadcast_to(q[None, :], (BLOCK_R, BLOCK_H)), mask=mask_x)
            offs_s = start // 128 + tl.arange(0, BLOCK_H // 128)
            tl.store((ptr_rows + HIDDEN).to(tl.pointer_type(tl.float32))[:, None] + offs_s[None, :],
                     tl.broadcast_to(scales[None, :], (BLOCK_R, BLOCK_H // 128)),
                     mask=mask_rows[:, None] & (offs_s < HIDDEN // 128)[None, :])
        else:
            tl.store(ptr_rows.to(tl.pointer_type(tl.bfloat16))[:, None] + start + offs_h[None, :],
                     tl.broadcast_to(x[None, :], (BLOCK_R, BLOCK_H)), mask=mask_x)


@triton.jit
def _padded_combine_kernel(back_ptr, dest_ptr, out_ptr, capacity, HIDDEN: tl.constexpr, WORLD: tl.constexpr,
                           BLOCK_H: tl.constexpr):
    # back_ptr: [WORLD, capacity, HIDDEN] bf16, row (d, t): rank d's output for token t;
    # dest_ptr: [capacity, WORLD] int32 (the dispatch's); out_ptr: [num_tokens, HIDDEN] bf16.
    # Grid (num_tokens, cdiv(HIDDEN, BLOCK_H)). The ranks are added one after another, in rank
    # order, as the reference does (a tree sum could differ in the last bit).
    slot = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < HIDDEN
    acc = tl.zeros([BLOCK_H], tl.float32)
    for d in tl.static_range(WORLD):
        hit = tl.load(dest_ptr + slot * WORLD + d) != 0
        row = back_ptr + (d * capacity + slot).to(tl.int64) * HIDDEN
        acc += tl.load(row + offs_h, mask=_mask_if(mask_h, hit), other=0.0).to(tl.float32)  # [BLOCK_H]
    tl.store(out_ptr + slot.to(tl.int64) * HIDDEN + offs_h, _to_bf16(acc), mask=mask_h)


# The two kernels as tests/test_bench_smoke.py cross-compiles them (a benchmark's kernels are not
# in moe_ep's registry).
PADDED_KERNELS = [
    KernelSpec(_padded_pack_kernel,
               {"x_ptr": "*bf16", "topk_ids_ptr": "*i64", "topk_weights_ptr": "*fp32", "send_ptr": "*u8",
                "dest_ptr": "*i32", "num_tokens": "i32", "capacity": "i32", "experts_per_rank": "i32",
                **{name: "constexpr" for name in ("HIDDEN", "TOPK", "WORLD", "FP8", "PAYLOAD_BYTES", "ROW_BYTES",
                                                  "BLOCK_H", "BLOCK_K", "BLOCK_R")}},
               {"HIDDEN": 7168, "TOPK": 8, "WORLD": 4, "FP8": fp8, "PAYLOAD_BYTES": 7392 if fp8 else 14336,
                "ROW_BYTES": 7456 if fp8 else 14400, "BLOCK_H": 1024, "BLOCK_K": 8, "BLOCK_R": 4})
    for fp8 in (True, False)] + [
    KernelSpec(_padded_combine_kernel,
               {"back_ptr": "*bf16", "dest_ptr": "*i32", "out_ptr": "*bf16", "capacity": "i32",
                "HIDDEN": "constexpr", "WORLD": "constexpr", "BLOCK_H": "constexpr"},
               {"HIDDEN": 7168, "WORLD": 4, "BLOCK_H": 1024})]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class PaddedNccl:
    """nccl-padded (module docstring): static buffers for up to ``capacity`` tokens per rank.

    ``dispatch`` returns ``recv`` ([world, capacity, row_bytes] uint8: row (s, t) is token t of
    rank s), valid until the next dispatch; ``received()`` gives its fields as views, ``compact()``
    the valid rows in the reference's order (for checks, outside timed code). ``combine(y)``
    takes ``y`` [world * capacity, hidden] bf16 in the received slots and returns
    [num_tokens, hidden] bf16 of the last dispatch's tokens.
    """

    def __init__(self, group, capacity: int, hidden: int, num_experts: int, topk: int, fp8: bool, device):
        if hidden % 128 or num_experts % dist.get_world_size(group):
            raise ValueError(f"hidden {hidden} must be a multiple of 128 and num_experts {num_experts} of the "
                             f"world size")
        self.group, self.world = group, dist.get_world_size(group)
        self.capacity, self.hidden, self.topk, self.fp8 = capacity, hidden, topk, fp8
        self.experts_per_rank = num_experts // self.world
        self.payload_bytes = hidden + 4 * (hidden // 128) if fp8 else 2 * hidden
        self.row_bytes = _round_up(self.payload_bytes + 8 * topk, 16)
        self.send = torch.empty(self.world, capacity, self.row_bytes, dtype=torch.uint8, device=device)
        self.recv = torch.empty_like(self.send)
        self.dest = torch.zeros(capacity, self.world, dtype=torch.int32, device=device)
        self.back = torch.empty(self.world, capacity, hidden, dtype=torch.bfloat16, device=device)
        self.out = torch.empty(capacity, hidden, dtype=torch.bfloat16, device=device)
        self.num_tokens = 0
        self.block_h = min(1024, triton.next_power_of_2(hidden))

    def dispatch(self, x, topk_ids, topk_weights) -> torch.Tensor:
        """``x`` [T, hidden] bf16 (T <= capacity), ``topk_ids`` [T, topk] global ids (-1: none),
        ``topk_weights`` [T, topk] float32 -> ``recv`` (class docstring)."""
        num_tokens = x.shape[0]
        if num_tokens > self.capacity:
            raise ValueError(f"{num_tokens} tokens exceed the capacity {self.capacity}")
        self.num_tokens = num_tokens
        _padded_pack_kernel[(self.capacity,)](
            x_ptr=x, topk_ids_ptr=topk_ids, topk_weights_ptr=topk_weights, send_ptr=self.send, dest_ptr=self.dest,
            num_tokens=num_tokens, capacity=self.capacity, experts_per_rank=self.experts_per_rank,
            HIDDEN=self.hidden, TOPK=self.topk, WORLD=self.world, FP8=self.fp8, PAYLOAD_BYTES=self.payload_bytes,
            ROW_BYTES=self.row_bytes, BLOCK_H=self.block_h, BLOCK_K=triton.next_power_of_2(self.topk),
            BLOCK_R=triton.next_power_of_2(self.world), num_warps=4)
        dist.all_to_all_single(self.recv, self.send, group=self.group)
        return self.recv

    def combine(self, y) -> torch.Tensor:
        dist.all_to_all_single(self.back, y.view(self.world, self.capacity, self.hidden), group=self.group)
        if self.num_tokens:
            _padded_combine_kernel[(self.num_tokens, triton.cdiv(self.hidden, self.block_h))](
                back_ptr=self.back, dest_ptr=self.dest, out_ptr=self.out, capacity=self.capacity, HIDDEN=self.hidden,
                WORLD=self.world, BLOCK_H=self.block_h, num_warps=4)
        return self.out[:self.num_tokens]

    def received(self, rows: torch.Tensor | None = None) -> dict:
        """Views of ``rows`` (default ``recv``; or a copy of it) as its fields, each [world,
        capacity, ...]: x (fp8 or bf16), x_scales (float32, fp8 only), topk_ids (int32 local
        ids, -1 elsewhere), topk_weights (float32)."""
        rows = self.recv if rows is None else rows
        p, k = self.payload_bytes, self.topk
        x = rows[..., :self.hidden].view(torch.float8_e4m3fn) if self.fp8 else rows[..., :p].view(torch.bfloat16)
        return {"x": x, "x_scales": rows[..., self.hidden:p].view(torch.float32) if self.fp8 else None,
                "topk_ids": rows[..., p:p + 4 * k].view(torch.int32),
                "topk_weights": rows[..., p + 4 * k:p + 8 * k].view(torch.float32)}

    def compact(self) -> tuple[dict, torch.Tensor]:
        """(the valid rows' fields, ``src`` [rows, 2] int32 (source rank, token)), in order of
        source rank then token: the layout of ``moe_ep.reference.dispatch``. On the CPU (a copy of
        ``recv``): for checks, outside timed code."""
        fields = self.received(self.recv.cpu())
        valid = (fields["topk_ids"] >= 0).any(dim=-1)  # [world, capacity]
        src = valid.nonzero().int()
        return {name: None if t is None else t[valid] for name, t in fields.items()}, src

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [n, hidden] in ``compact()``'s order -> [world * capacity, hidden] in the
        received slots (NaN in the padding: a combine that reads it fails its check)."""
        valid = (self.received()["topk_ids"] >= 0).any(dim=-1).view(-1)
        out = torch.full((self.world * self.capacity, rows.shape[1]), float("nan"), dtype=rows.dtype,
                         device=rows.device)
        out[valid] = rows
        return out


# -- nccl-naive -----------------------------------------------------------------------------------

@dataclass
class NaiveState:
    token_index: torch.Tensor  # [rows sent] int64: local token of each row sent, sorted by destination
    send_counts: list
    recv_counts: list
    num_tokens: int


def naive_dispatch(x, topk_ids, topk_weights, num_experts, fp8, group):
    """Returns (received rows [N, bytes] uint8: payload, ids, weights; state for the combine)."""
    world = dist.get_world_size(group)
    per_rank = num_experts // world
    if fp8:
        q, scales = reference.quantize_fp8(x)
        payload = torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)
    else:
        payload = x.view(torch.uint8)
    dst = torch.where(topk_ids >= 0, topk_ids // per_rank, torch.full_like(topk_ids, -1))
    mask = torch.stack([(dst == d).any(dim=1) for d in range(world)], dim=0)  # [R, T]
    rank_of_row, token_index = mask.nonzero(as_tuple=True)  # sorted by destination rank
    send_counts = torch.bincount(rank_of_row, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_list, recv_list = send_counts.tolist(), recv_counts.tolist()  # the host synchronisation
    meta = torch.cat([topk_ids[token_index].int().view(torch.uint8).view(-1, topk_ids.shape[1] * 4),
                      topk_weights[token_index].view(torch.uint8).view(-1, topk_weights.shape[1] * 4)], dim=1)
    rows = torch.cat([payload[token_index], meta], dim=1)
    received = torch.empty(sum(recv_list), rows.shape[1], dtype=torch.uint8, device=x.device)
    dist.all_to_all_single(received, rows, recv_list, send_list, group=group)
    return received, NaiveState(token_index, send_list, recv_list, x.shape[0])


def naive_combine(y, state: NaiveState, group):
    """``y`` [rows received, hidden] bf16 in received order -> [num_tokens, hidden] bf16."""
    back = torch.empty(sum(state.send_counts), y.shape[1], dtype=y.dtype, device=y.device)
    dist.all_to_all_single(back, y, state.send_counts, state.recv_counts, group=group)
    out = torch.zeros(state.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, state.token_index, back.float())
    return out.to(torch.bfloat16)


# -- nvshmem-vdev2d -------------------------------------------------------------------------------

MAX_VDEV_GROUPS = 16  # torch's NUM_TILES = THREADS_PER_BLOCK / A2AV_TILE_SIZE (512 / 32)


class VdevBaseline:
    """torch's NVSHMEM all-to-all for MoE: ``torch.ops.symm_mem.all_to_all_vdev_2d`` for dispatch
    and ``all_to_all_vdev_2d_offset`` for combine, as a torch user would wire them.

    Dispatch sends one row per (token, expert) pair — payload (fp8 codes + scales, or bf16) and
    the pair's weight — sorted by destination; the receiver gets them group-major (per group of
    local experts, per source rank) with splits and offsets on the device: no host
    synchronisation. torch takes at most ``MAX_VDEV_GROUPS`` splits per rank (its check "Number
    of experts must be smaller than NUM_TILES"), so a rank's experts are folded into that many
    groups of consecutive experts (DeepSeek-V3 at EP4: 64 experts per rank, 16 groups of 4); the
    sort within a group that a layer would still need is not timed.
    Combine sends the expert outputs back with the dispatch's splits/offsets and sums each token's
    pairs. Everything lives in symmetric memory of torch's NVSHMEM backend, which must be the
    process's backend before its first symmetric allocation (``symm_mem.set_backend("NVSHMEM")``).
    """

    def __init__(self, group, max_tokens: int, hidden: int, num_experts: int, topk: int, fp8: bool, device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.world = dist.get_world_size(group)
        self.hidden, self.num_experts, self.topk, self.fp8 = hidden, num_experts, topk, fp8
        experts_per_rank = num_experts // self.world
        self.groups_per_rank = min(experts_per_rank, MAX_VDEV_GROUPS)
        self.experts_per_group = -(-experts_per_rank // self.groups_per_rank)
        splits = self.world * self.groups_per_rank
        payload = hidden + 4 * (hidden // 128) if fp8 else 2 * hidden
        self.row_bytes = payload + 4  # + the pair's weight (float32)
        pairs = max_tokens * topk
        self.inp = symm_mem.empty(pairs, self.row_bytes, dtype=torch.uint8, device=device)
        self.out = symm_mem.empty(pairs * self.world, self.row_bytes, dtype=torch.uint8, device=device)
        self.in_splits = symm_mem.empty(splits, dtype=torch.int64, device=device)
        self.out_splits_offsets = symm_mem.empty(2, splits, dtype=torch.int64, device=device)
        self.y = symm_mem.empty(pairs * self.world, hidden, dtype=torch.bfloat16, device=device)
        self.back = symm_mem.empty(pairs, hidden, dtype=torch.bfloat16, device=device)
        self.back_splits_offsets = symm_mem.empty(2, splits, dtype=torch.int64, device=device)
        for t in (self.inp, self.out, self.in_splits, self.out_splits_offsets, self.y, self.back,
                  self.back_splits_offsets):
            symm_mem.rendezvous(t, self.group_name)
        self.pair_token = None  # [T * topk] token of each sorted pair
        self.pair_valid = None  # [T * topk] bool: a real expert (id >= 0)

    def dispatch(self, x, topk_ids, topk_weights):
        num_tokens = x.shape[0]
        flat = topk_ids.reshape(-1).long()
        splits = self.world * self.groups_per_rank
        experts_per_rank = self.num_experts // self.world
        group = (flat // experts_per_rank) * self.groups_per_rank + (flat % experts_per_rank) // self.experts_per_group
        key = torch.where(flat >= 0, group, torch.full_like(flat, splits))  # -1 pairs sort last
        order = torch.argsort(key, stable=True)
        self.pair_token = order // self.topk
        self.pair_valid = key[order] < splits
        if self.fp8:
            q, scales = reference.quantize_fp8(x)
            payload = torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)
        else:
            payload = x.view(torch.uint8)
        weight = topk_weights.reshape(-1)[order].float().view(torch.uint8).view(-1, 4)
        n = num_tokens * self.topk
        torch.cat([payload[self.pair_token], weight], dim=1, out=self.inp[:n])
        self.in_splits.copy_(torch.bincount(key, minlength=splits + 1)[:splits])
        torch.ops.symm_mem.all_to_all_vdev_2d(self.inp, self.out, self.in_splits, self.out_splits_offsets,
                                              self.group_name)
        return self.out, self.out_splits_offsets

    def combine(self):
        """Send ``self.y`` (expert outputs, in the dispatch's received layout) back and sum."""
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(self.y, self.back, self.out_splits_offsets,
                                                     self.back_splits_offsets, self.group_name)
        n = self.pair_token.shape[0]
        rows = torch.where(self.pair_valid[:, None], self.back[:n].float(), 0.0)
        out = torch.zeros(n // self.topk, self.hidden, dtype=torch.float32, device=rows.device)
        out.index_add_(0, self.pair_token, rows)
        return out.to(torch.bfloat16)
