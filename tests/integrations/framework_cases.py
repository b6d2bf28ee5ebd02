"""What the vLLM and SGLang lanes share (importable by rank processes): inputs, the oracle's
view of a call, stand-in expert outputs, SwiGLU experts in plain torch, and the accuracy bounds.

Every rank draws every rank's inputs from one seed, runs ``moe_ep.reference`` for the whole group
and checks its own outputs alone: data movement bit for bit, arithmetic against the dense MoE
within the bounds of tests/test_layer.py (the same data path: bf16 or fp8 dispatch, bf16 outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ep_cases import routing
from moe_ep import reference
from moe_ep.layer import make_expert_weights, make_router_weight, route

# Tiny CPU shapes: hidden a multiple of 128 (fp8 scales), 4 experts a rank, top-3.
HIDDEN, EXPERTS_PER_RANK, TOPK, MAX_TOKENS, FFN = 256, 4, 3, 12, 64
CROSSOVER = 6  # flat Buffers take LL up to this many tokens per rank (the largest batch), HT above
POISON = float("nan")

# (per call, per row, at least) relative error against the dense MoE: tests/test_layer.py's
# bounds and their derivation (bf16: two roundings of the outputs; fp8: the inputs' e4m3 rounding).
BOUNDS = {"bfloat16": (2.0 ** -7, 2.0 ** -7, 0.0), "float8_e4m3fn": (2.0 ** -4, 2.0 ** -3, 2.0 ** -8)}


def call_counts(call: int, world: int, gen, small: bool) -> list[int]:
    """Tokens per rank of one call: rank (call % R) sends none, the others 1 .. CROSSOVER (``small``:
    the flat Buffer takes its LL path) or up to MAX_TOKENS, one of them MAX_TOKENS (HT)."""
    limit = CROSSOVER if small else MAX_TOKENS
    counts = [int(torch.randint(1, limit + 1, (1,), generator=gen)) for _ in range(world)]
    counts[call % world] = 0
    if not small:
        counts[(call + 1) % world] = MAX_TOKENS
    return counts


def random_inputs(call: int, world: int, seed: int, kind: str, small: bool = False):
    """Every rank's (x [T, H] bf16, topk_ids [T, topk] int64 global ids with -1 per ``kind``,
    topk_weights [T, topk] float32) for one call (``routing`` kinds of tests/ep_cases.py)."""
    gen = torch.Generator().manual_seed(seed * 7919 + call)
    num_experts = EXPERTS_PER_RANK * world
    counts = call_counts(call, world, gen, small)
    xs = [(torch.randn(t, HIDDEN, generator=gen) * (1 + 3 * torch.rand(t, 1, generator=gen))).to(torch.bfloat16)
          for t in counts]
    ids = [routing(kind, t, num_experts, TOPK, world, gen) for t in counts]
    weights = [torch.rand(t, TOPK, generator=gen) for t in counts]
    return xs, ids, weights


def routed_inputs(call: int, world: int, seed: int, small: bool = False):
    """Every rank's (x, topk_ids, topk_weights) from a real router (softmax, top-k, renormalised:
    ``moe_ep.layer.route``): what a model feeds the MoE. Also returns the router weight."""
    gen = torch.Generator().manual_seed(seed * 104729 + call)
    w_router = make_router_weight(HIDDEN, EXPERTS_PER_RANK * world, seed)
    counts = call_counts(call, world, gen, small)
    xs = [torch.randn(t, HIDDEN, generator=gen).to(torch.bfloat16) for t in counts]
    routes = [route(x, w_router, TOPK) for x in xs]
    return xs, [r[0] for r in routes], [r[1] for r in routes], w_router


def dequantized(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Rows ``[..., H]`` (bf16, or fp8 with ``[..., H // 128]`` scales) as float32."""
    if scales is None:
        return x.float()
    shape = x.shape
    return reference.dequantize_fp8(x.reshape(-1, shape[-1]), scales.reshape(-1, scales.shape[-1])).view(shape)


def flat_stand_in(received: list[reference.RankDispatch]) -> list[torch.Tensor]:
    """Stand-in outputs of every rank's experts on its flat rows (already weighted and reduced, as a
    framework's experts hand them to combine): row values times (rank + 1), bf16."""
    return [reference.to_bf16(dequantized(r.x, r.x_scales) * (d + 1)) for d, r in enumerate(received)]


def expert_stand_in(received: list[reference.RankExpertDispatch]) -> list[torch.Tensor]:
    """Stand-in unweighted outputs of every rank's experts, one row per (token, expert) pair: the
    row's values times (rank + 1) * (local expert + 1), bf16 (as tests/expert_cases.py)."""
    ys = []
    for d, r in enumerate(received):
        scale = torch.repeat_interleave(torch.arange(1, len(r.tokens_per_expert) + 1, dtype=torch.float32),
                                        r.tokens_per_expert.long())
        ys.append((dequantized(r.x, r.x_scales) * (d + 1) * scale[:, None]).to(torch.bfloat16))
    return ys


def expert_rows_padded(ys_rank: torch.Tensor, received: reference.RankExpertDispatch, slots: int) -> torch.Tensor:
    """``[experts, slots, H]`` bf16: each expert's stand-in rows, NaN past its count (never read)."""
    experts = len(received.tokens_per_expert)
    y = torch.full((experts, slots, ys_rank.shape[1]), POISON, dtype=torch.bfloat16)
    for e in range(experts):
        rows = ys_rank[received.rows(e)]
        y[e, :len(rows)] = rows
    return y


@dataclass(frozen=True)
class Experts:
    """SwiGLU expert weights of every expert, in moe_ep.layer's layout (bf16) and vLLM's
    (w13 [E, 2 * ffn, H] gate rows then up rows, w2 [E, H, ffn])."""

    all: object  # moe_ep.layer.ExpertWeights of all experts
    w13: torch.Tensor
    w2: torch.Tensor

    def local(self, rank: int, per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13[rank * per_rank:(rank + 1) * per_rank], self.w2[rank * per_rank:(rank + 1) * per_rank]


def make_experts(world: int, seed: int) -> Experts:
    weights = make_expert_weights(HIDDEN, FFN, range(EXPERTS_PER_RANK * world), seed)
    w13 = torch.cat([weights.w_gate.transpose(1, 2), weights.w_up.transpose(1, 2)], dim=1).contiguous()
    return Experts(weights, w13, weights.w_down.transpose(1, 2).contiguous())


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert in float32 on ``x`` [rows, H] float32 with vLLM-layout bf16 weights:
    ``(silu(x @ gate^T) * (x @ up^T)) @ w2^T`` -> [rows, H] float32."""
    ffn = w2.shape[1]
    h = x @ w13.float().t()
    return (torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]) @ w2.float().t()


def dense_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    experts: Experts) -> torch.Tensor:
    """The MoE in one process over every expert, float32, no communication: ``[T, H]`` float32."""
    acc = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e >= 0:
                acc[t] += topk_weights[t, k] * swiglu(x[t:t + 1].float(), experts.w13[e], experts.w2[e])[0]
    return acc


def check_accuracy(name: str, dtype_name: str, out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``out`` [T, H] bf16 against the dense ``ref`` within BOUNDS; returns the errors measured."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape, (name, out.dtype, out.shape, ref.shape)
    if ref.shape[0] == 0:
        return {}
    assert bool(out.isfinite().all()), f"{name}: non-finite output"
    per_call, per_row, at_least = BOUNDS[dtype_name]
    diff = out.float() - ref
    norms = ref.norm(dim=1)
    rows = diff.norm(dim=1)[norms > 0] / norms[norms > 0]
    rel = float(diff.norm() / ref.norm())
    worst = float(rows.max()) if rows.numel() else 0.0
    assert rel <= per_call and worst <= per_row, f"{name}: relative error {rel:.4g} (bound {per_call:.4g}), " \
                                                 f"worst row {worst:.4g} (bound {per_row:.4g})"
    assert rel >= at_least, f"{name}: relative error {rel:.4g} below {at_least:.4g}: were the rows quantised?"
    rows_without_expert = norms == 0  # a token with no expert (-1 everywhere) combines to zeros
    assert bool((out[rows_without_expert] == 0).all()), f"{name}: a token without experts is not zero"
    return {"rel": rel, "worst_row": worst}
