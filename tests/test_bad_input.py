"""Bad input gets a clear Python error before any kernel runs, and the Buffer stays usable."""

import pytest
import torch

import moe_ep
from ep_cases import CPU_SHAPE, GPU_SHAPE, make_inputs, check_dispatch
from moe_ep import reference


def _bad_calls_then_good_one(ctx, shape):
    world, dev = ctx.world_size, ctx.device
    num_experts = shape.num_experts_per_rank * world
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=torch.float8_e4m3fn)
    buf = moe_ep.Buffer(ctx.group, cfg)
    t, h, k = 3, shape.hidden, shape.topk
    x = torch.randn(t, h, device=dev).to(torch.bfloat16)
    ids = torch.randint(0, num_experts, (t, k), device=dev)
    w = torch.rand(t, k, device=dev)
    other = torch.device("meta") if dev.type == "cpu" else torch.device("cpu")
    bad = {
        "x float32": (lambda: buf.dispatch(x.float(), ids, w), TypeError, "x must be torch.bfloat16"),
        "x wrong hidden": (lambda: buf.dispatch(x[:, :h - 128].contiguous(), ids, w), ValueError, "shape"),
        "x 1-d": (lambda: buf.dispatch(x[0], ids, w), ValueError, "x must be a"),
        "x on another device": (lambda: buf.dispatch(x.to(other), ids, w), ValueError, "is on"),
        "x not contiguous": (lambda: buf.dispatch(torch.cat([x, x], 1)[:, ::2], ids, w), ValueError, "contiguous"),
        "too many tokens": (lambda: buf.dispatch(torch.zeros(shape.max_tokens_per_rank + 1, h, dtype=torch.bfloat16, device=dev),
                                                 torch.zeros(shape.max_tokens_per_rank + 1, k, dtype=torch.int64, device=dev),
                                                 torch.zeros(shape.max_tokens_per_rank + 1, k, device=dev)),
                            ValueError, "max_tokens_per_rank"),
        "expert id too large": (lambda: buf.dispatch(x, ids.clone().fill_(num_experts), w), ValueError, r"\[-1, "),
        "expert id below -1": (lambda: buf.dispatch(x, ids.clone().fill_(-2), w), ValueError, r"\[-1, "),
        "ids float": (lambda: buf.dispatch(x, ids.float(), w), TypeError, "topk_ids must be"),
        "ids wrong topk": (lambda: buf.dispatch(x, ids[:, :1].contiguous(), w), ValueError, "topk_ids must have shape"),
        "weights bf16": (lambda: buf.dispatch(x, ids, w.bfloat16()), TypeError, "topk_weights must be"),
        "fp8 tuple of one": (lambda: buf.dispatch((x,), ids, w), TypeError, "tuple"),
        "fp8 of the other format": (lambda: buf.dispatch(tuple(t.to(dev) for t in reference.quantize_fp8(
                                        x.cpu(), torch.float8_e4m3fnuz)), ids, w),
                                    TypeError, "x must be torch.float8_e4m3fn"),
        "scales wrong shape": (lambda: buf.dispatch((x.to(torch.float8_e4m3fn), torch.ones(t, 1, device=dev)), ids, w),
                               ValueError, "x_scales must have shape"),
        "hint below the tokens": (lambda: buf.dispatch(x, ids, w, num_tokens_hint=t - 1), ValueError, "num_tokens_hint"),
        "zero_copy with out": (lambda: buf.dispatch(x, ids, w, out=buf.empty_dispatch_output(), zero_copy=True),
                               ValueError, "zero_copy"),
        "combine without handle": (lambda: buf.combine(torch.zeros(buf.capacity, h, dtype=torch.bfloat16, device=dev), None),
                                   TypeError, "handle"),
    }
    for name, (call, error, match) in bad.items():
        with pytest.raises(error, match=match):
            call()
    # A good call after all that: correct results.
    xs, all_ids, weights = make_inputs(1, "uniform", shape, world, seed=5)
    out = buf.dispatch(xs[ctx.rank].to(dev), all_ids[ctx.rank].to(dev), weights[ctx.rank].to(dev))
    with pytest.raises(ValueError, match="y must have shape"):
        buf.combine(torch.zeros(3, h, dtype=torch.bfloat16, device=dev), out.handle)
    check_dispatch(out, reference.dispatch(xs, all_ids, weights, num_experts, torch.float8_e4m3fn)[ctx.rank], buf.capacity)
    buf.combine(torch.zeros(buf.capacity, h, dtype=torch.bfloat16, device=dev), out.handle)
    buf.check()
    buf.close()
    # Configurations that cannot work are refused before anything is allocated.
    with pytest.raises(ValueError, match="inter_transport"):
        moe_ep.EpConfig(hidden=h, num_experts=num_experts, topk=1, max_tokens_per_rank=4, gpus_per_node=1,
                        inter_transport="rdma")
    with pytest.raises(ValueError, match="not a multiple of gpus_per_node"):
        moe_ep.Buffer(ctx.group, moe_ep.EpConfig(hidden=h, num_experts=num_experts, topk=1, max_tokens_per_rank=4,
                                                 gpus_per_node=ctx.world_size + 1, mode="ll"))
    with pytest.raises(ValueError, match="not divisible by the world size"):
        moe_ep.Buffer(ctx.group, moe_ep.EpConfig(hidden=h, num_experts=world * 2 + 1, topk=1, max_tokens_per_rank=4))
    return True


def test_bad_input_raises_and_buffer_stays_usable(ranks):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_bad_calls_then_good_one, shape))


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=200, dispatch_dtype=torch.float8_e4m3fn), "multiple of 128"),
    (dict(hidden=0), "hidden must be a positive int"),
    (dict(topk=9, num_experts=8), "exceeds num_experts"),
    (dict(dispatch_dtype=torch.float16), "dispatch_dtype"),
    (dict(mode="fast"), "mode"),
    (dict(ht_parts=0), "ht_parts must be a positive int"),
    (dict(ht_parts=33), "ht_parts must be at most 32"),
])
def test_config_rejects_impossible_shapes(kwargs, match):
    base = dict(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=4)
    with pytest.raises(ValueError, match=match):
        moe_ep.EpConfig(**{**base, **kwargs})


def test_heap_bytes_grow_linearly():
    cfg = moe_ep.EpConfig(hidden=7168, num_experts=256, topk=8, max_tokens_per_rank=128,
                          dispatch_dtype=torch.float8_e4m3fn)
    one = moe_ep.heap_bytes(cfg, 4)
    import dataclasses
    four = moe_ep.heap_bytes(dataclasses.replace(cfg, max_tokens_per_rank=512), 4)
    assert 3.9 < four / one < 4.01
    assert 22_000_000 < one < 22_600_000  # the figure moe_ep/regions.py documents
