"""Pure-torch semantics of dispatch and combine over all ranks at once: the oracle of every test.

Functions take every rank's inputs (lists indexed by rank) and return every rank's outputs,
with the exact layout, order and rounding the kernels promise:
- rank d receives, in order of source rank then token index, each token that has at least one
  expert on d (once, however many of its experts live there);
- fp8 quantisation: per 128 values, scale = max(amax, 1e-4) / fp8_max, q = fp8(clamp(x / scale)),
  round to nearest even, in float8_e4m3fn (fp8_max 448) or float8_e4m3fnuz (AMD MI300X's format:
  fp8_max 240, no negative zero: -0 and what rounds to it give 0x00; torch's own conversion
  already does so, and rounds ties to even, checked for every code by tests/test_numerics.py);
  non-finite values as torch computes them (a group with a NaN: scale NaN, every code NaN; with an
  infinity: scale inf, NaN codes at the infinities, zeros elsewhere), with one rule of its own:
  a NaN is the positive quiet NaN whatever its sign or payload (scale 0x7FC00000, fp8 code 0x7F
  for e4m3fn, 0x80 for e4m3fnuz), as the sign of a NaN that torch (and the kernels) compute
  differs between devices (x86's inf / inf is -NaN: torch's conversion then gives 0xFF);
- combine sums the partials of the ranks a token went to in rank order, in float32, then rounds
  to bfloat16 (a token with no expert gets zeros). Across nodes (``gpus_per_node`` below the
  world size) each node's partials are summed first, in rank order in float32, a remote node's
  sum is rounded to bfloat16 (it crosses the network so), and the node sums are added in node
  order; with one node this is the plain rank-order sum, bit for bit. Rounding to bfloat16 is
  torch's, but that any NaN gives 0x7FC0 (torch's own NaN bits differ by device and path).

The expert-major layout (``dispatch(..., layout="expert")``, ``dispatch_expert`` /
``combine_expert`` here): rank d holds one row per (token, k) pair whose expert ``topk_ids[t, k]``
lives on d, grouped by local expert; within an expert the rows are in order of source rank, then
token index, then k. Its combine sums, per token, over k = 0 .. topk - 1 in that order and in
float32, ``w[t, k] * y`` (weighted: each product rounded to float32, then added) or ``y``
(unweighted) of the row of pair (t, k), skipping k whose id is -1, then rounds to bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ep.config import QUANT_BLOCK

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}  # largest finite value
FP8_AMAX_FLOOR = 1e-4
_FLOAT32_NAN = torch.tensor(0x7FC00000, dtype=torch.int32).view(torch.float32)  # the quiet NaN
_BF16_NAN = torch.tensor(0x7FC0, dtype=torch.int16).view(torch.bfloat16)
_FP8_NAN = {torch.float8_e4m3fn: 0x7F, torch.float8_e4m3fnuz: 0x80}  # NaN codes (see the module docstring)


def _canonical_nan(x: torch.Tensor, nan: torch.Tensor) -> torch.Tensor:
    """``x`` with every NaN replaced by ``nan`` (a 0-d tensor of x's dtype)."""
    return torch.where(x.isnan(), nan.to(x.device), x)


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 as the kernels round: torch's rounding, any NaN 0x7FC0."""
    return _canonical_nan(x.to(torch.bfloat16), _BF16_NAN)


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, H]`` -> (``[T, H]`` fp8 ``dtype`` (float8_e4m3fn or float8_e4m3fnuz),
    ``[T, H // 128]`` float32 scales)."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"quantize_fp8: dtype must be one of {FP8_DTYPES}, got {dtype}")
    fp8_max = FP8_MAX[dtype]
    t, h = x.shape
    groups = x.float().view(t, h // QUANT_BLOCK, QUANT_BLOCK)
    scales = _canonical_nan(groups.abs().amax(dim=-1).clamp(min=FP8_AMAX_FLOOR) / fp8_max, _FLOAT32_NAN)
    scaled = groups / scales[..., None]
    q = scaled.clamp(-fp8_max, fp8_max).to(dtype).view(torch.uint8)
    q = torch.where(scaled.isnan(), torch.full_like(q, _FP8_NAN[dtype]), q).view(dtype)
    return q.view(t, h), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_fp8`` up to rounding: ``[T, H]`` float32."""
    t, h = q.shape
    return (q.float().view(t, h // QUANT_BLOCK, QUANT_BLOCK) * scales[..., None]).view(t, h)


@dataclass
class RankDispatch:
    """What one rank receives (only the valid rows; the kernels pad to capacity)."""

    x: torch.Tensor  # [num_tokens, hidden] bf16 or fp8
    x_scales: torch.Tensor | None  # [num_tokens, hidden // 128] float32 (fp8 only)
    topk_ids: torch.Tensor  # [num_tokens, topk] int32, local expert index, -1 elsewhere
    topk_weights: torch.Tensor  # [num_tokens, topk] float32, 0 where topk_ids is -1
    src: torch.Tensor  # [num_tokens, 2] int32: (source rank, token index there)
    tokens_per_expert: torch.Tensor  # [experts_per_rank] int32

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]


def destinations(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """``[T, topk]`` global expert ids -> ``[T, world_size]`` bool: does rank d hold any."""
    per_rank = num_experts // world_size
    valid = topk_ids >= 0
    dst = torch.where(valid, topk_ids // per_rank, torch.full_like(topk_ids, -1))
    return torch.stack([(dst == d).any(dim=1) for d in range(world_size)], dim=1) \
        if topk_ids.shape[0] else torch.zeros(0, world_size, dtype=torch.bool, device=topk_ids.device)


def dispatch(xs, topk_ids, topk_weights, num_experts: int, dispatch_dtype: torch.dtype) -> list[RankDispatch]:
    """Every rank's inputs (lists over ranks of ``[T_r, H]`` bf16 — or (fp8, scales) tuples —,
    ``[T_r, topk]`` ids, ``[T_r, topk]`` float32 weights) -> every rank's ``RankDispatch``."""
    world_size = len(xs)
    per_rank = num_experts // world_size
    fp8 = dispatch_dtype in FP8_DTYPES
    payloads = []
    for x in xs:
        if isinstance(x, tuple):
            payloads.append(x)
        elif fp8:
            payloads.append(quantize_fp8(x, dispatch_dtype))
        else:
            payloads.append((x, None))
    out = []
    for d in range(world_size):
        rows_x, rows_s, rows_ids, rows_w, rows_src = [], [], [], [], []
        for s in range(world_size):
            ids = topk_ids[s].long()
            sel = destinations(ids, num_experts, world_size)[:, d].nonzero().flatten()
            rows_x.append(payloads[s][0][sel])
            if fp8:
                rows_s.append(payloads[s][1][sel])
            local = ids[sel] - d * per_rank
            here = (ids[sel] >= 0) & (local >= 0) & (local < per_rank)
            rows_ids.append(torch.where(here, local, torch.full_like(local, -1)).int())
            rows_w.append(torch.where(here, topk_weights[s][sel].float(), torch.zeros_like(topk_weights[s][sel].float())))
            rows_src.append(torch.stack([torch.full_like(sel, s), sel], dim=1).int())
        ids_d = torch.cat(rows_ids)
        counts = torch.bincount(ids_d[ids_d >= 0].long(), minlength=per_rank).int()
        out.append(RankDispatch(torch.cat(rows_x), torch.cat(rows_s) if fp8 else None, ids_d,
                                torch.cat(rows_w), torch.cat(rows_src), counts))
    return out


def combine(ys, received: list[RankDispatch], num_tokens: list[int],
            gpus_per_node: int | None = None) -> list[torch.Tensor]:
    """Every rank's expert outputs (``[num_tokens_d, H]`` bf16, rows as in ``received[d]``) ->
    every rank's combined ``[T_s, H]`` bf16: per token, the float32 sum of the rows its
    destination ranks send back — in rank order within a node, node sums in node order, a remote
    node's sum rounded to bf16 (see the module docstring)."""
    world_size = len(ys)
    per_node = gpus_per_node or world_size
    hidden = ys[0].shape[1]
    out = []
    for s in range(world_size):
        acc = torch.zeros(num_tokens[s], hidden, dtype=torch.float32, device=ys[0].device)
        for node in range(world_size // per_node):
            node_acc = torch.zeros_like(acc)
            for d in range(node * per_node, (node + 1) * per_node):
                src = received[d].src
                rows = (src[:, 0] == s).nonzero().flatten()
                part = torch.zeros_like(acc)
                part[src[rows, 1].long()] = ys[d][rows].float()
                node_acc = node_acc + part
            if node != s // per_node:
                node_acc = to_bf16(node_acc).float()
            acc = acc + node_acc
        out.append(to_bf16(acc))
    return out


@dataclass
class RankExpertDispatch:
    """What one rank receives in the expert-major layout, its experts' rows back to back
    (expert 0's ``tokens_per_expert[0]`` rows first; the kernels place expert e's rows at
    ``[e, 0:tokens_per_expert[e]]`` of ``[experts_per_rank, slots, ...]`` outputs)."""

    x: torch.Tensor  # [num_pairs, hidden] bf16 or fp8
    x_scales: torch.Tensor | None  # [num_pairs, hidden // 128] float32 (fp8 only)
    src: torch.Tensor  # [num_pairs, 2] int32: (source rank, token index there)
    topk_weights: torch.Tensor  # [num_pairs] float32: the weight of the pair
    topk_slot: torch.Tensor  # [num_pairs] int32: k of the pair in the source's topk_ids row
    tokens_per_expert: torch.Tensor  # [experts_per_rank] int32

    def rows(self, expert: int) -> slice:
        """The rows of local expert ``expert`` in the tensors above."""
        starts = [0] + torch.cumsum(self.tokens_per_expert, 0).tolist()
        return slice(starts[expert], starts[expert + 1])


def dispatch_expert(xs, topk_ids, topk_weights, num_experts: int,
                    dispatch_dtype: torch.dtype) -> list[RankExpertDispatch]:
    """Every rank's inputs (as for ``dispatch``) -> every rank's ``RankExpertDispatch``: one row
    per (token, k) pair, on the rank of expert ``topk_ids[t, k]`` (-1: none), in order of local
    expert, then source rank, token index and k."""
    world_size = len(xs)
    per_rank = num_experts // world_size
    fp8 = dispatch_dtype in FP8_DTYPES
    payloads = [x if isinstance(x, tuple) else quantize_fp8(x, dispatch_dtype) if fp8 else (x, None) for x in xs]
    out = []
    for d in range(world_size):
        rows_x, rows_s, rows_src, rows_w, rows_k, counts = [], [], [], [], [], []
        for e in range(d * per_rank, (d + 1) * per_rank):
            n = 0
            for s in range(world_size):
                ids = topk_ids[s].long()
                token, k = (ids == e).nonzero(as_tuple=True)  # row-major: by token, then k
                rows_x.append(payloads[s][0][token])
                if fp8:
                    rows_s.append(payloads[s][1][token])
                rows_src.append(torch.stack([torch.full_like(token, s), token], dim=1).int())
                rows_w.append(topk_weights[s][token, k].float())
                rows_k.append(k.int())
                n += len(token)
            counts.append(n)
        out.append(RankExpertDispatch(torch.cat(rows_x), torch.cat(rows_s) if fp8 else None, torch.cat(rows_src),
                                      torch.cat(rows_w), torch.cat(rows_k), torch.tensor(counts, dtype=torch.int32)))
    return out


def combine_expert(ys, received: list[RankExpertDispatch], topk_ids, topk_weights,
                   weighted: bool = True) -> list[torch.Tensor]:
    """Every rank's expert outputs (``[num_pairs_d, hidden]`` bf16, rows as in ``received[d]``),
    and every rank's dispatched ``topk_ids`` / ``topk_weights`` -> every rank's ``[T_s, hidden]``
    bf16: per token, over k in order, the float32 sum of ``w[t, k] * y`` (``weighted``: the
    product rounded to float32 first) or of ``y``, of the row of pair (t, k); k with id -1 are
    skipped; a token with no expert gets zeros."""
    world_size = len(ys)
    hidden = ys[0].shape[1]
    out = []
    for s in range(world_size):
        num_tokens, topk = topk_ids[s].shape
        pairs = torch.zeros(num_tokens, topk, hidden, dtype=torch.float32)
        for d in range(world_size):
            mine = (received[d].src[:, 0] == s).nonzero().flatten()
            token, k = received[d].src[mine, 1].long(), received[d].topk_slot[mine].long()
            pairs[token, k] = ys[d][mine].float()
        acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
        for k in range(topk):
            part = pairs[:, k] * topk_weights[s][:, k:k + 1].float() if weighted else pairs[:, k]
            acc = torch.where((topk_ids[s][:, k] >= 0)[:, None], acc + part, acc)
        out.append(acc.to(torch.bfloat16))
    return out
