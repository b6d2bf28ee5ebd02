"""One rank (EP1, e.g. a one-GPU server): every flat path (LL, HT, HT with zero-copy outputs, into
poisoned ``out``) in bf16 and fp8, and the expert layout (with and without receive hooks, weighted
and unweighted combines), checked against ``moe_ep.reference`` on fresh random inputs, token counts
from 0 to the capacity. On a CPU rank in CI, and on one GPU with ``-m gpu``: the suite's single-GPU
sanity of the compiled kernels and their direct launches, HT included, which two ranks sharing one
GPU cannot run (``MOE_EP_GPU_SHARED``)."""

import pytest
import torch

import moe_ep
from ep_cases import (CPU_SHAPE, GPU_SHAPE, assert_equal, check_dispatch, check_part_rows, expert_outputs,
                      poisoned_dispatch_output)
from moe_ep import reference


def _inputs(tokens: int, shape, num_experts: int, gen):
    x = torch.randn(tokens, shape.hidden, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:shape.topk] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, shape.topk, dtype=torch.int64)
    if tokens:
        ids[0, -1] = -1  # a pair with no expert
    return x, ids, torch.rand(tokens, shape.topk, generator=gen)


def _flat(ctx, shape, mode: str, dtype: torch.dtype) -> int:
    dev, num_experts = ctx.device, shape.num_experts_per_rank
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=dtype, mode=mode)
    buf = moe_ep.Buffer(ctx.group, cfg)
    gen = torch.Generator().manual_seed(7)
    top = shape.max_tokens_per_rank
    calls = 0
    try:
        for call, tokens in enumerate((1, top // 3, top, 0, top // 2 + 1, top)):
            x, ids, w = _inputs(tokens, shape, num_experts, gen)
            expected = reference.dispatch([x], [ids], [w], num_experts, dtype)[0]
            zero_copy, use_out = mode == "ht" and call % 3 == 1, call % 3 == 2
            out = buf.dispatch(x.to(dev), (ids if call % 2 else ids.int()).to(dev), w.to(dev), zero_copy=zero_copy,
                               out=poisoned_dispatch_output(buf) if use_out else None)
            assert out.handle.path == mode
            n = check_dispatch(out, expected, buf.capacity)
            if mode == "ht":
                check_part_rows(out, expected, [tokens], cfg.ht_parts)
            y = torch.full((buf.capacity, shape.hidden), float("nan"), dtype=torch.bfloat16)
            y[:n] = expert_outputs(expected, 0)  # rows past num_tokens stay NaN: never read
            z = buf.combine(y.to(dev), out.handle)
            assert_equal(f"combine ({mode}, call {call})", reference.combine([y[:n]], [expected], [tokens])[0], z.cpu())
            calls += 1
        buf.check()
    finally:
        buf.close()
    return calls


def _expert(ctx, shape) -> int:
    dev, num_experts = ctx.device, shape.num_experts_per_rank
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=torch.float8_e4m3fn,
                          mode="ll", layouts=("expert",))
    buf = moe_ep.Buffer(ctx.group, cfg)
    gen = torch.Generator().manual_seed(8)
    top = shape.max_tokens_per_rank
    calls = 0
    try:
        for call, tokens in enumerate((1, top, top // 3, 0, top)):
            x, ids, w = _inputs(tokens, shape, num_experts, gen)
            expected = reference.dispatch_expert([x], [ids], [w], num_experts, torch.float8_e4m3fn)[0]
            hook = call % 2 == 1
            out = buf.dispatch(x.to(dev), ids.to(dev), w.to(dev), layout="expert", return_recv_hook=hook)
            if hook:
                out, receive = out
                receive()
            counts = out.tokens_per_expert.cpu()
            assert_equal("tokens_per_expert", expected.tokens_per_expert, counts)
            y = torch.randn(out.x.shape, generator=gen).to(torch.bfloat16)
            start, packed = 0, []
            for e, count in enumerate(counts.tolist()):
                rows = slice(start, start + count)
                assert_equal(f"expert {e} x", expected.x[rows].view(torch.uint8), out.x[e, :count].cpu().view(torch.uint8))
                assert_equal(f"expert {e} x_scales", expected.x_scales[rows], out.x_scales[e, :count].cpu())
                assert_equal(f"expert {e} src", expected.src[rows], out.src[e, :count].cpu())
                assert_equal(f"expert {e} topk_weights", expected.topk_weights[rows], out.topk_weights[e, :count].cpu())
                packed.append(y[e, :count])
                start += count
            for weighted in (False, True):
                z = buf.combine(y.to(dev), out.handle, weighted=weighted)
                assert_equal(f"expert combine (weighted={weighted}, call {call})",
                             reference.combine_expert([torch.cat(packed)], [expected], [ids], [w], weighted=weighted)[0],
                             z.cpu())
            calls += 1
        buf.check()
    finally:
        buf.close()
    return calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_one_rank_matches_reference(rank_pools, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    shape = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    pool = rank_pools(device, 1)
    for mode in ("ll", "ht"):
        for dtype in (torch.float8_e4m3fn, torch.bfloat16):
            assert pool.run(_flat, shape, mode, dtype) == [6]
    assert pool.run(_expert, shape) == [5]
