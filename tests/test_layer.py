"""End-to-end accuracy: the expert-parallel MoE layer against the dense single-process MoE.

Every rank routes its own tokens, dispatches them, runs its experts on what it received and
combines; the result must match ``dense_moe_reference`` (all experts, float32, no
communication) up to the rounding the data path is allowed: bf16 outputs, and for fp8
dispatch the e4m3 quantisation of the inputs.

Bounds (relative error ||out - ref|| / ||ref||; measured on CPU ranks, hidden 256, topk 3,
4 calls, seed 1; see the numbers beside each bound):
- bf16 dispatch: inputs arrive exactly; the error is the rounding of each rank's partial sum to
  bf16 before combine and of the combined row to bf16: two roundings of half an ulp at most
  (2^-8 relative), about 0.0016 rms each. Measured 0.0024 per call and 0.0029 for the worst
  row. Bound 2^-7 per call and per row: twice the worst case of one rounding.
- fp8 dispatch: each input value is rounded to e4m3 (3 mantissa bits: at most 2^-4 relative,
  about 2^-4 / sqrt(3) = 0.036 rms); the experts are near-linear maps with random weights, so
  the output keeps that relative size (it averages over hidden, it does not grow).
  Measured 0.035-0.037 over all calls, 0.043 for the worst call, 0.069 for the worst row (a row
  of 256 values fluctuates more than a call's). Bound 2^-4 per call (the worst case of one
  value's rounding, which a norm over many values cannot reach) and 2^-3 per row. An error
  below 2^-8 would mean the rows were never quantised, so that is checked too.
"""

import pytest
import torch

from ep_cases import CPU_SHAPE, Shape, make_inputs

CALLS = 4
SEED = 1

BOUNDS = {  # dispatch dtype: (per call, per row, at least)
    "bfloat16": (2.0 ** -7, 2.0 ** -7, 0.0),
    "float8_e4m3fn": (2.0 ** -4, 2.0 ** -3, 2.0 ** -8),
}


def _shape_and_ffn(device_type: str, world_size: int) -> tuple[Shape, int]:
    if device_type == "cpu":
        return CPU_SHAPE, 64
    # DeepSeek-V3's hidden, experts and top-k, with a small ffn to keep the experts cheap.
    return Shape(hidden=7168, num_experts_per_rank=256 // world_size, topk=8, max_tokens_per_rank=128), 256


def _layer_against_dense(ctx, dtype_name: str, calls: int, seed: int) -> list[dict]:
    """``calls`` forward passes on one Buffer with fresh inputs (a rank with no token, one with
    max_tokens_per_rank); per call with tokens: the relative error and the worst row's."""
    import moe_ep
    from moe_ep.layer import EpMoELayer, dense_moe_reference, make_expert_weights

    shape, ffn = _shape_and_ffn(ctx.device.type, ctx.world_size)
    num_experts = shape.num_experts_per_rank * ctx.world_size
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=getattr(torch, dtype_name))
    buf = moe_ep.Buffer(ctx.group, cfg)
    stats = []
    try:
        layer = EpMoELayer(buf, ffn, seed)
        all_experts = make_expert_weights(shape.hidden, ffn, range(num_experts), seed, ctx.device)
        for call in range(calls):
            xs, _, _ = make_inputs(call, "uniform", shape, ctx.world_size, seed)
            x = xs[ctx.rank].to(ctx.device)
            out = layer(x)
            assert out.dtype == torch.bfloat16 and tuple(out.shape) == tuple(x.shape), (out.dtype, out.shape)
            ref = dense_moe_reference(x, layer.w_router, all_experts, shape.topk)
            if x.shape[0] == 0:
                continue
            assert bool(out.isfinite().all()), f"call {call}: non-finite output"
            diff = out.float() - ref
            rows = diff.norm(dim=1) / ref.norm(dim=1)  # every token has topk experts: ref rows are nonzero
            stats.append({"call": call, "tokens": x.shape[0], "rel": (diff.norm() / ref.norm()).item(),
                          "worst_row": rows.max().item(), "worst_row_index": int(rows.argmax()),
                          "diff_sq": diff.square().sum().item(), "ref_sq": ref.square().sum().item()})
        buf.check()
    finally:
        buf.close()
    return stats


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"], ids=["bf16", "fp8"])
def test_layer_matches_dense_reference(ranks, dtype):
    """Four EP forward passes on one Buffer against the dense MoE, every token checked."""
    per_rank = ranks.run(_layer_against_dense, dtype, CALLS, SEED)
    per_call, per_row, at_least = BOUNDS[dtype]
    stats = [dict(s, rank=r) for r, rank_stats in enumerate(per_rank) for s in rank_stats]
    assert stats, "no rank sent a token"
    overall = (sum(s["diff_sq"] for s in stats) / sum(s["ref_sq"] for s in stats)) ** 0.5
    worst_call = max(stats, key=lambda s: s["rel"])
    worst_row = max(stats, key=lambda s: s["worst_row"])
    print(f"\n{ranks.device}{ranks.world_size} {dtype}: relative error {overall:.5f} overall, "
          f"{worst_call['rel']:.5f} worst call, {worst_row['worst_row']:.5f} worst row")
    for s in stats:
        where = f"rank {s['rank']} call {s['call']} ({s['tokens']} tokens)"
        assert s["rel"] <= per_call, f"{where}: relative error {s['rel']:.5f} > {per_call:.5f}"
        assert s["worst_row"] <= per_row, \
            f"{where}: row {s['worst_row_index']} relative error {s['worst_row']:.5f} > {per_row:.5f}"
        assert s["rel"] >= at_least, f"{where}: relative error {s['rel']:.6f} < {at_least}: fp8 not applied?"
