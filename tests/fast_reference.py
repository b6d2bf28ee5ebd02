"""A vectorised oracle for long soaks: what ``moe_ep.reference`` says one rank receives and
combines, computed on that rank's device in a few dozen tensor operations.

``moe_ep.reference`` loops over every (source, destination) pair and every node (hundreds of
small operations and host round trips per call at 4 ranks): at 100,000 calls that loop, not the
kernels, would set the pace. Here every rank's inputs of a call are one concatenated batch
(``Batch``, rows in rank order, then token order: the order a rank receives them in), and one rank
selects its rows at once. ``test_soak.py::test_fast_reference_matches_reference`` checks every
function here against ``moe_ep.reference`` bit for bit; the soak's stand-in experts
(``expert_rows``) are elementwise, so a source rank recomputes exactly what each destination
sends back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ep import reference


@dataclass
class Batch:
    """Every rank's inputs of one call, concatenated in rank order."""

    x: torch.Tensor  # [N, hidden] bf16, or float8_e4m3fn when pre-quantised
    x_scales: torch.Tensor | None  # [N, hidden // 128] float32 when pre-quantised
    topk_ids: torch.Tensor  # [N, topk] int64 global expert ids, -1: none
    topk_weights: torch.Tensor  # [N, topk] float32
    tokens: list  # tokens of each rank (N in all)

    def __post_init__(self):
        counts = torch.tensor(self.tokens, device=self.x.device)
        self.source = torch.repeat_interleave(torch.arange(len(self.tokens), device=self.x.device), counts,
                                              output_size=self.x.shape[0])  # [N] rank of each row
        starts = torch.cumsum(counts, 0) - counts
        self.index = torch.arange(self.x.shape[0], device=self.x.device) - starts[self.source]  # [N] token on its rank

    def rows(self, rank: int) -> slice:
        start = sum(self.tokens[:rank])
        return slice(start, start + self.tokens[rank])

    def inputs(self, rank: int):
        """(x, topk_ids, topk_weights) of ``rank``, as it passes them to dispatch."""
        r = self.rows(rank)
        x = (self.x[r], self.x_scales[r]) if self.x_scales is not None else self.x[r]
        return x, self.topk_ids[r], self.topk_weights[r]


def routing(kind: str, num_tokens: int, num_experts: int, topk: int, world_size: int, gen, device,
            target: int = 0, masked: bool = False) -> torch.Tensor:
    """``[num_tokens, topk]`` int64 expert ids of the routing ``kind`` of ep_cases.fuzz_routing
    (same kinds and meaning; other draws), generated on ``device`` without a per-token loop."""
    per_rank = num_experts // world_size

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    def randint(high, shape):
        return torch.randint(0, high, shape, generator=gen, device=device)

    if kind == "uniform":
        ids = rand(num_tokens, num_experts).argsort(dim=1)[:, :topk]
    elif kind == "one_rank":
        local = rand(num_tokens, per_rank).argsort(dim=1)[:, :topk] if topk <= per_rank else \
            randint(per_rank, (num_tokens, topk))
        ids = target * per_rank + local
    elif kind == "every_rank":
        reach = min(topk, world_size)
        ids = randint(num_experts, (num_tokens, topk))
        ranks = rand(num_tokens, world_size).argsort(dim=1)[:, :reach]  # distinct ranks per token
        ids[:, :reach] = ranks * per_rank + randint(per_rank, (num_tokens, reach))
        ids = ids.gather(1, rand(num_tokens, topk).argsort(dim=1))
    elif kind == "duplicates":
        ids = randint(num_experts, (num_tokens, topk))
        ids[:, -1] = ids[:, 0]
    else:
        raise ValueError(kind)
    ids = ids.contiguous()
    if masked:
        ids[rand(num_tokens, topk) < 0.25] = -1
        ids[rand(num_tokens) < 0.15] = -1
    return ids


def payload(batch: Batch, dispatch_dtype: torch.dtype):
    """What the dispatch moves for every row: (values, scales or None)."""
    if batch.x_scales is not None:
        return batch.x, batch.x_scales
    if dispatch_dtype in reference.FP8_DTYPES:
        return reference.quantize_fp8(batch.x, dispatch_dtype)
    return batch.x, None


def expected_dispatch(batch: Batch, values, scales, num_experts: int, rank: int) -> reference.RankDispatch:
    """``reference.dispatch(...)[rank]`` from the batch and its ``payload``."""
    world_size = len(batch.tokens)
    per_rank = num_experts // world_size
    ids = batch.topk_ids
    here = (ids >= 0) & (ids >= rank * per_rank) & (ids < (rank + 1) * per_rank)  # [N, topk]
    sel = here.any(dim=1).nonzero().flatten()
    local = torch.where(here[sel], ids[sel] - rank * per_rank, torch.full_like(ids[sel], -1)).int()
    weights = batch.topk_weights[sel].float()
    weights = torch.where(here[sel], weights, torch.zeros_like(weights))
    src = torch.stack([batch.source[sel], batch.index[sel]], dim=1).int()
    counts = _count(local, per_rank)
    return reference.RankDispatch(values[sel], scales[sel] if scales is not None else None, local, weights, src,
                                  counts)


def expert_rows(values: torch.Tensor, scales, rank: int) -> torch.Tensor:
    """The soak's stand-in for the experts of ``rank``: bf16(row * (rank + 1)), elementwise."""
    x = values.float() if scales is None else reference.dequantize_fp8(values, scales)
    return (x * (rank + 1)).to(torch.bfloat16)


def expected_combine(batch: Batch, values, scales, num_experts: int, rank: int,
                     gpus_per_node: int | None = None) -> torch.Tensor:
    """``reference.combine(ys, ...)[rank]`` when every rank d sends back ``expert_rows(row, d)``
    for each row it received: the same float32 additions in the same order."""
    world_size = len(batch.tokens)
    per_rank, per_node = num_experts // world_size, gpus_per_node or world_size
    mine = batch.rows(rank)
    ids = batch.topk_ids[mine]
    dst = torch.where(ids >= 0, ids // per_rank, torch.full_like(ids, -1))
    values, scales = values[mine], scales[mine] if scales is not None else None
    acc = torch.zeros(values.shape[0], values.shape[1], dtype=torch.float32, device=values.device)
    for node in range(world_size // per_node):
        node_acc = torch.zeros_like(acc)
        for d in range(node * per_node, (node + 1) * per_node):
            hit = (dst == d).any(dim=1, keepdim=True)
            node_acc = node_acc + torch.where(hit, expert_rows(values, scales, d).float(), torch.zeros_like(acc))
        if node != rank // per_node:
            node_acc = node_acc.to(torch.bfloat16).float()
        acc = acc + node_acc
    return acc.to(torch.bfloat16)


def expected_part_rows(received: reference.RankDispatch, tokens: list, parts: int) -> torch.Tensor:
    """``[world_size, parts + 1]`` int32: ep_cases.check_part_rows's expectation, vectorised."""
    src = received.src.long()
    device = src.device
    tokens_t = torch.tensor(tokens, device=device)
    q = torch.arange(parts + 1, device=device)
    bounds = torch.minimum(q[None, :] * ((tokens_t[:, None] + parts - 1) // parts), tokens_t[:, None])  # [R, P + 1]
    world_size = len(tokens)
    counts = _count(src[:, 0], world_size)
    before = torch.cumsum(counts, 0) - counts  # [R] rows of the lower sources
    of_source = src[None, None, :, 0] == torch.arange(world_size, device=device)[:, None, None]
    below = (src[None, None, :, 1] < bounds[:, :, None]) & of_source  # [R, P + 1, rows]
    return (before[:, None] + below.sum(dim=2)).int()


def _count(values: torch.Tensor, size: int) -> torch.Tensor:
    """``torch.bincount(values[values >= 0], minlength=size)`` as int32, for values below ``size``,
    without a host round trip (bincount and boolean indexing read the device's result first)."""
    index = torch.where(values >= 0, values, size).long().flatten()
    counts = torch.zeros(size + 1, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))[:size].int()
