"""What a torch user writes today without an EP library: the NCCL all_to_all path.

Dispatch: quantise (fp8), replicate each token once per destination rank, sort by destination,
exchange the counts (a host synchronisation), ``all_to_all_single`` the packed rows.
Combine: ``all_to_all_single`` the expert outputs back, then sum each token's partials.
The same outputs as moe_ep (modulo row order within a rank), so the same bytes move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_ep import reference


@dataclass
class NcclState:
    token_index: torch.Tensor  # [rows sent] int64: local token of each row sent, sorted by destination
    send_counts: list
    recv_counts: list
    num_tokens: int


def nccl_dispatch(x, topk_ids, topk_weights, num_experts, fp8, group):
    """Returns (received payload rows [N, bytes] uint8, received ids, received weights, state)."""
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
    return received, NcclState(token_index, send_list, recv_list, x.shape[0])


def nccl_combine(y, state: NcclState, group):
    """``y`` [rows received, hidden] bf16 in received order -> [num_tokens, hidden] bf16."""
    back = torch.empty(sum(state.send_counts), y.shape[1], dtype=y.dtype, device=y.device)
    dist.all_to_all_single(back, y, state.send_counts, state.recv_counts, group=group)
    out = torch.zeros(state.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, state.token_index, back.float())
    return out.to(torch.bfloat16)


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
