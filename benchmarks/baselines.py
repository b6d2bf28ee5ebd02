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
