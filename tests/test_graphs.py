"""Dispatch -> a stand-in expert -> combine captured in a CUDA graph and replayed with fresh inputs
copied into its static tensors, every replay checked against moe_ep.reference (-m gpu); on CPU
ranks the same static-input protocol runs without a graph (the same calls on the same tensors).

Flat and expert layouts on the LL path (the expert layout with and without receive hooks, and two
micro-batches in flight), and the HT path with zero-copy outputs."""

import pytest
import torch

from ep_cases import CPU_SHAPE, GPU_SHAPE, check_dispatch
from rank_checks import assert_equal

GPU_REPLAYS = 50
CPU_REPLAYS = 3


def _dequantized(x, scales):
    """[..., hidden] fp8 or bf16 rows -> float32, as moe_ep.reference.dequantize_fp8 (elementwise: the
    same bits on any device)."""
    if scales is None:
        return x.float()
    values = x.float().unflatten(-1, (scales.shape[-1], -1))
    return (values * scales[..., None]).flatten(-2)


def _stand_in(out, rank: int):
    """The experts of ``rank``, elementwise so that device and reference agree bit for bit: flat rows
    times (rank + 1); expert-layout rows of expert e times (rank + 1) * (e + 1)."""
    x = _dequantized(out.x, out.x_scales) * (rank + 1)
    if out.layout == "expert":
        x = x * torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float32)[:, None, None]
    return x.to(torch.bfloat16)


def _reference(ctx, buf, call, shape, layout, seed):
    """Every rank's inputs of one replay, and this rank's expected dispatch and combine."""
    from moe_ep import reference

    world, me = ctx.world_size, ctx.rank
    # Static shapes: rank r always sends max_tokens_per_rank - r tokens.
    tokens = [shape.max_tokens_per_rank - r for r in range(world)]
    gen = torch.Generator().manual_seed(seed * 131 + call)
    xs = [torch.randn(t, shape.hidden, generator=gen).to(torch.bfloat16) for t in tokens]
    num_experts = buf.cfg.num_experts
    ids = [torch.stack([torch.randperm(num_experts, generator=gen)[:shape.topk] for _ in range(t)]) for t in tokens]
    for i in ids:
        i[torch.rand(i.shape, generator=gen) < 0.2] = -1
    weights = [torch.rand(t, shape.topk, generator=gen) for t in tokens]
    if layout == "expert":
        exp = reference.dispatch_expert(xs, ids, weights, num_experts, buf.cfg.dispatch_dtype)
        ys = []
        for d, e in enumerate(exp):
            scale = torch.repeat_interleave(torch.arange(1, len(e.tokens_per_expert) + 1, dtype=torch.float32),
                                            e.tokens_per_expert.long())
            ys.append((_dequantized(e.x, e.x_scales) * (d + 1) * scale[:, None]).to(torch.bfloat16))
        z = reference.combine_expert(ys, exp, ids, weights, weighted=True)[me]
    else:
        exp = reference.dispatch(xs, ids, weights, num_experts, buf.cfg.dispatch_dtype)
        ys = [(_dequantized(e.x, e.x_scales) * (d + 1)).to(torch.bfloat16) for d, e in enumerate(exp)]
        z = reference.combine(ys, exp, [len(i) for i in ids])[me]
    return (xs[me], ids[me], weights[me]), exp[me], z


def _check_expert(out, exp, name):
    assert_equal(f"tokens_per_expert ({name})", exp.tokens_per_expert, out.tokens_per_expert.cpu())
    for e in range(len(exp.tokens_per_expert)):
        n, rows = int(exp.tokens_per_expert[e]), exp.rows(e)
        assert_equal(f"x of expert {e} ({name})", exp.x[rows].view(torch.uint8), out.x[e, :n].cpu().view(torch.uint8))
        assert_equal(f"src of expert {e} ({name})", exp.src[rows], out.src[e, :n].cpu())
        assert_equal(f"topk_weights of expert {e} ({name})", exp.topk_weights[rows], out.topk_weights[e, :n].cpu())


def _replays(ctx, shape, variant: str, replays: int, seed: int = 7):
    """``variant``: "ll-flat", "expert", "expert-hooks", "expert-two-batches" or "ht-zero-copy"."""
    import moe_ep

    world, me, dev = ctx.world_size, ctx.rank, ctx.device
    expert = variant.startswith("expert")
    batches = 2 if variant == "expert-two-batches" else 1
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * world, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=torch.float8_e4m3fn,
                          mode="ht" if variant.startswith("ht") else "ll",
                          layouts=("expert",) if expert else ("flat",))
    buf = moe_ep.Buffer(ctx.group, cfg)
    tokens = shape.max_tokens_per_rank - me
    static = [(torch.empty(tokens, shape.hidden, dtype=torch.bfloat16, device=dev),
               torch.empty(tokens, shape.topk, dtype=torch.int64, device=dev),
               torch.empty(tokens, shape.topk, dtype=torch.float32, device=dev)) for _ in range(batches)]

    def step():
        """What the graph holds: dispatch, stand-in experts, combine, for each micro-batch."""
        hooks = variant in ("expert-hooks", "expert-two-batches")
        kwargs = {"layout": "expert"} if expert else {"zero_copy": True} if variant == "ht-zero-copy" else {}
        outs, pending = [], []
        for x, ids, w in static:
            result = buf.dispatch(x, ids, w, return_recv_hook=hooks, **kwargs)
            out, hook = result if hooks else (result, None)
            outs.append(out)
            pending.append(hook)
        for hook in pending:
            if hook is not None:
                hook()
        zs, pending = [], []
        for out in outs:
            kwargs = {"weighted": True, "return_recv_hook": hooks} if expert else {}
            result = buf.combine(_stand_in(out, me), out.handle, **kwargs)
            z, hook = result if hooks else (result, None)
            zs.append(z)
            pending.append(hook)
        for hook in pending:
            if hook is not None:
                hook()
        return outs, zs

    def fill(call):
        expected = []
        for b, tensors in enumerate(static):
            inputs, exp, z = _reference(ctx, buf, batches * call + b, shape, "expert" if expert else "flat", seed)
            for dst, src in zip(tensors, inputs):
                dst.copy_(src)
            expected.append((exp, z))
        return expected

    def check(outs, zs, expected, name):
        for b, (out, z, (exp, z_ref)) in enumerate(zip(outs, zs, expected)):
            if expert:
                _check_expert(out, exp, f"{name}, batch {b}")
            else:
                check_dispatch(out, exp, buf.capacity)
            assert_equal(f"combine ({name}, batch {b})", z_ref, z.cpu())

    try:
        expected = fill(0)  # an eager warm-up (compiles), checked
        outs, zs = step()
        check(outs, zs, expected, "eager")
        graph = None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs, zs = step()
        for replay in range(1, replays + 1):
            expected = fill(replay)
            if graph is not None:
                graph.replay()
                torch.cuda.synchronize(dev)
            else:
                outs, zs = step()
            check(outs, zs, expected, f"replay {replay}")
        buf.check()
    finally:
        buf.close()
    return replays


@pytest.mark.parametrize("variant", ["ll-flat", "expert", "expert-hooks", "expert-two-batches", "ht-zero-copy"])
def test_graph_replays_match_reference(ranks, variant):
    on_cpu = ranks.device == "cpu"
    replays = CPU_REPLAYS if on_cpu else GPU_REPLAYS
    shape = CPU_SHAPE if on_cpu else GPU_SHAPE
    assert ranks.run(_replays, shape, variant, replays, timeout=900) == [replays] * ranks.world_size
