"""Bad input gets a clear Python error before any kernel runs, and the Buffer stays usable."""

import dataclasses

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
        # Checked by the kernels (no host synchronisation): raised at the next check, a BadCallError
        "expert id too large": (lambda: (buf.dispatch(x, ids.clone().fill_(num_experts), w), buf.check()),
                                moe_ep.BadCallError, rf"\[-1, {num_experts}\); got {num_experts} \(token 0\)"),
        "expert id below -1": (lambda: (buf.dispatch(x, ids.clone().fill_(-2), w), buf.check()), moe_ep.BadCallError,
                               r"\[-1, .*got -2"),
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
    four = moe_ep.heap_bytes(dataclasses.replace(cfg, max_tokens_per_rank=512), 4)
    assert 3.9 < four / one < 4.01
    assert 22_000_000 < one < 22_600_000  # the figure moe_ep/regions.py documents


def _device_checks_ids(ctx, shape, path: str, dtype_name: str):
    """Without check_inputs, rank 1 dispatches one id equal to num_experts and one of -2: the call
    runs on every rank with those ids routed nowhere (results as the reference's with -1 there,
    tokens_per_expert included), rank 1 gets BadCallError naming the first bad id at its check,
    the others none; the next call is right everywhere."""
    from ep_cases import check_dispatch as check_flat, expert_outputs
    from expert_cases import ExpertCall, expert_config
    from moe_ep import reference
    from rank_checks import assert_equal

    world, me, dev = ctx.world_size, ctx.rank, ctx.device
    expert = path == "expert"
    if expert:
        cfg = expert_config(ctx, shape, dtype_name)
    else:
        cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * world, topk=shape.topk,
                              max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=getattr(torch, dtype_name),
                              **moe_ep.EpConfig.path_options(path, world // 2))
    buf = moe_ep.Buffer(ctx.group, cfg)
    try:
        for call in range(2):
            xs, ids, weights = make_inputs(call, "uniform", shape, world, seed=23)
            if call == 0:  # rank 1 sends its maximum (make_inputs: rank (call + 1) % R)
                ids[1][0, 1] = cfg.num_experts
                ids[1][2, 0] = -2
            clean = [torch.where((i >= 0) & (i < cfg.num_experts), i, -1) for i in ids]
            x, i, w = xs[me].to(dev), ids[me].to(dev), weights[me].to(dev)
            out = buf.dispatch(x, i, w, layout="expert") if expert else buf.dispatch(x, i, w)
            raised = None
            try:
                buf.check()
            except moe_ep.BadCallError as err:
                raised = str(err)
            if call == 0 and me == 1:
                assert raised and f"got {cfg.num_experts} (token 0)" in raised, raised
            else:
                assert raised is None, raised
            if expert:
                exp = reference.dispatch_expert(xs, clean, weights, cfg.num_experts, cfg.dispatch_dtype)
                c = ExpertCall.__new__(ExpertCall)  # its checks only, on these inputs
                c.name, c.expected = f"call {call}", exp[me]
                c.check_dispatch(out)
                continue
            exp = reference.dispatch(xs, clean, weights, cfg.num_experts, cfg.dispatch_dtype)
            check_flat(out, exp[me], buf.capacity)
            ys = [expert_outputs(exp[r], r) for r in range(world)]
            y = torch.zeros(buf.capacity, shape.hidden, dtype=torch.bfloat16)
            y[:exp[me].num_tokens] = ys[me]
            z = buf.combine(y.to(dev), out.handle)
            gpus = cfg.gpus_per_node if path.startswith("inter") else None
            assert_equal("combine", reference.combine(ys, exp, [len(i) for i in ids], gpus)[me], z.cpu())
        buf.check()
    finally:
        buf.close()
    return True


@pytest.mark.parametrize("path", ["ll", "ht", "inter", "inter_ht", "expert"])
def test_kernels_check_expert_ids(ranks, path):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_device_checks_ids, shape, path, "float8_e4m3fn"))


def _disagreeing_buffers(ctx, shape):
    """Ranks that build their Buffers differently each get the same ValueError naming the field,
    before anything is allocated (no hang in a barrier, no shared memory left); then alike, it works."""
    import glob

    base = moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * ctx.world_size,
                           topk=shape.topk, max_tokens_per_rank=shape.max_tokens_per_rank)
    before = set(glob.glob("/dev/shm/moe_ep-*"))
    messages = {}
    for name, other in (("hidden", shape.hidden + 128), ("num_experts", 2 * base.num_experts), ("topk", 1),
                        ("mode", "ht"), ("max_tokens_per_rank", shape.max_tokens_per_rank + 1)):
        cfg = dataclasses.replace(base, **{name: other}) if ctx.rank == 1 else base
        with pytest.raises(ValueError, match=f"disagree on EpConfig.{name}") as err:
            moe_ep.Buffer(ctx.group, cfg)
        messages[name] = str(err.value).split(": ", 1)[1]  # (after "rank r: ")
    assert set(glob.glob("/dev/shm/moe_ep-*")) <= before, "a refused Buffer left shared memory behind"
    moe_ep.Buffer(ctx.group, base).close()
    return messages


def test_ranks_that_disagree_are_refused(ranks):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    messages = ranks.run(_disagreeing_buffers, shape)
    assert all(m == messages[0] for m in messages), messages  # every rank says the same
    assert f"rank 0 {shape.hidden}, rank 1 {shape.hidden + 128}" in messages[0]["hidden"], messages[0]["hidden"]


def _paths_that_disagree(ctx, shape, case: str):
    """A dispatch call for which the ranks take different paths (rank 1 passes another
    num_tokens_hint, or another layout) raises PathMismatchError on every rank, naming the peer and
    both paths, long before the kernels' timeout (an hour here, far beyond the harness's limit); a
    call the ranks agree on works before it, and close() returns after it."""
    import time

    world, me, dev = ctx.world_size, ctx.rank, ctx.device
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * world, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=torch.bfloat16, mode="auto",
                          crossover_tokens=4, timeout_s=3600.0, layouts=("flat", "expert"))
    buf = moe_ep.Buffer(ctx.group, cfg)
    try:
        xs, ids, weights = make_inputs(0, "uniform", shape, world, seed=31)
        x, i, w = xs[me][:3].to(dev), ids[me][:3].to(dev), weights[me][:3].to(dev)
        agreed = buf.dispatch(x, i, w, num_tokens_hint=3)
        exp = reference.dispatch([t[:3] for t in xs], [t[:3] for t in ids], [t[:3] for t in weights],
                                 cfg.num_experts, cfg.dispatch_dtype)
        check_dispatch(agreed, exp[me], buf.capacity)
        buf.check()
        start = time.monotonic()
        with pytest.raises(moe_ep.PathMismatchError) as err:
            if case == "hint":  # rank 1: HT (a hint above the crossover), the others LL
                buf.dispatch(x, i, w, num_tokens_hint=shape.max_tokens_per_rank if me == 1 else 3)
            else:  # rank 1: the expert layout, the others flat (LL)
                buf.dispatch(x, i, w, num_tokens_hint=3, layout="expert" if me == 1 else "flat")
            buf.check()
        elapsed = time.monotonic() - start
        with pytest.raises(moe_ep.PathMismatchError):  # the Buffer refuses further calls
            buf.dispatch(x, i, w, num_tokens_hint=3)
    finally:
        buf.close()
    return str(err.value), err.value.peer, elapsed


@pytest.mark.parametrize("case", ["hint", "layout"])
def test_paths_that_disagree_fail_fast(ranks, case):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    theirs = "ht" if case == "hint" else "expert"
    for rank, (message, peer, elapsed) in enumerate(ranks.run(_paths_that_disagree, shape, case)):
        # rank 1 waits for the others, which wait for rank 1 (a rank may also name another on its own path)
        mine = theirs if rank == 1 else "ll"
        assert f"took the '{mine}' path here" in message, message
        if rank != 1:
            assert peer == 1 and f"the '{theirs}' path on rank 1" in message, message
        else:
            assert peer != 1 and f"the 'll' path on rank {peer}" in message, message
        assert "num_tokens_hint" in message and "layout" in message, message
        assert elapsed < (10 if ranks.device != "cpu" else 200), elapsed  # the timeout is an hour


def _inter_node_variants_mixed(ctx, shape):
    """Across nodes the two variants of the inter-node path (LL, HT staged) share one protocol, the
    regions and the counters: ranks whose hints pick different variants for one call still get the
    reference's dispatch and combine (which is why their calls are not announced)."""
    from ep_cases import expert_outputs
    from rank_checks import assert_equal

    world, me, dev = ctx.world_size, ctx.rank, ctx.device
    per_node = world // 2 if world % 2 == 0 else 1
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=shape.num_experts_per_rank * world, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=torch.float8_e4m3fn,
                          mode="auto", crossover_tokens=4, gpus_per_node=per_node)
    buf = moe_ep.Buffer(ctx.group, cfg)
    try:
        for call in range(2):
            xs, ids, weights = make_inputs(call, "uniform", shape, world, seed=41)
            xs, ids, weights = [t[:4] for t in xs], [t[:4] for t in ids], [t[:4] for t in weights]
            hint = 4 if (me + call) % 2 == 0 else shape.max_tokens_per_rank  # inter here, inter_ht there
            out = buf.dispatch(xs[me].to(dev), ids[me].to(dev), weights[me].to(dev), num_tokens_hint=hint)
            assert out.handle.path == ("inter" if hint == 4 else "inter_ht")
            exp = reference.dispatch(xs, ids, weights, cfg.num_experts, cfg.dispatch_dtype)
            check_dispatch(out, exp[me], buf.capacity)
            ys = [expert_outputs(exp[r], r) for r in range(world)]
            y = torch.zeros(buf.capacity, shape.hidden, dtype=torch.bfloat16)
            y[:exp[me].num_tokens] = ys[me]
            z = buf.combine(y.to(dev), out.handle)
            assert_equal("combine", reference.combine(ys, exp, [len(i) for i in ids], per_node)[me], z.cpu())
        buf.check()
    finally:
        buf.close()
    return True


def test_inter_node_variants_interoperate(ranks):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_inter_node_variants_mixed, shape))


def _stale_and_own_memory(ctx, shape):
    """A handle whose outputs a later dispatch rewrote (out=), and dispatch inputs that are views of
    the Buffer's own receive memory, are refused before any launch; the Buffer stays usable; an LL
    call's outputs may be reused by an HT call."""
    from ep_cases import check_dispatch, check_part_rows
    from expert_cases import expert_config
    from moe_ep import reference

    cfg = expert_config(ctx, shape, "bfloat16")
    buf = moe_ep.Buffer(ctx.group, moe_ep.EpConfig(**{**cfg.__dict__, "mode": "auto", "crossover_tokens": 4}))
    try:
        # Three tokens on every rank (every rank then refuses the same calls).
        gens = [torch.Generator().manual_seed(r) for r in range(ctx.world_size)]
        xs = [torch.randn(3, shape.hidden, generator=g).to(torch.bfloat16) for g in gens]
        all_ids = [torch.stack([torch.randperm(cfg.num_experts, generator=g)[:shape.topk] for _ in range(3)])
                   for g in gens]
        ws = [torch.rand(3, shape.topk, generator=g) for g in gens]
        expected = reference.dispatch(xs, all_ids, ws, cfg.num_experts, cfg.dispatch_dtype)[ctx.rank]
        x, ids, w = (t[ctx.rank].to(ctx.device) for t in (xs, all_ids, ws))
        out = buf.empty_dispatch_output()
        first = buf.dispatch(x, ids, w, out=out)
        second = buf.dispatch(x, ids, w, out=first)
        y = torch.zeros(buf.capacity, shape.hidden, dtype=torch.bfloat16, device=ctx.device)
        with pytest.raises(ValueError, match="stale handle"):
            buf.combine(y, first.handle)
        buf.combine(y, second.handle)
        check_dispatch(second, expected, buf.capacity)
        views = buf.dispatch(x, ids, w, zero_copy=True, num_tokens_hint=shape.max_tokens_per_rank)
        assert views.handle.path == "ht"
        with pytest.raises(ValueError, match="view of this Buffer's receive memory"):
            buf.dispatch(views.x[:x.shape[0]], ids, w)
        buf.combine(y, views.handle)
        pairs = buf.dispatch(x, ids, w, layout="expert")
        with pytest.raises(ValueError, match="view of this Buffer's receive memory"):
            buf.dispatch(pairs.x[0, :3], ids, w, layout="expert")
        buf.combine(torch.zeros(pairs.x.shape, dtype=torch.bfloat16, device=ctx.device), pairs.handle)
        again = buf.dispatch(pairs.x[0, :3].clone(), ids, w)  # a copy is fine
        buf.combine(y, again.handle)
        # An LL call's outputs (made without HT's part_rows) reused by an HT call: part_rows comes
        # from their allocation, and the results are the reference's.
        ll = buf.dispatch(x, ids, w, num_tokens_hint=3)
        assert ll.handle.path == "ll" and ll.handle.part_rows is None
        ht = buf.dispatch(x, ids, w, out=ll, num_tokens_hint=shape.max_tokens_per_rank)
        assert ht.handle.path == "ht" and ht.handle.part_rows is not None
        check_dispatch(ht, expected, buf.capacity)
        check_part_rows(ht, expected, [3] * ctx.world_size, cfg.ht_parts)
        buf.combine(y, ht.handle)
        # Outputs built without their dataclass's __init__ (make_frozen) carry every field.
        for made in (ht, ht.handle, views, views.handle, pairs, pairs.handle, buf.empty_dispatch_output()):
            assert set(vars(made)) == {f.name for f in dataclasses.fields(made)}, type(made).__name__
            assert dataclasses.replace(made) == made
        buf.check()
    finally:
        buf.close()
    return True


def test_stale_handles_and_own_memory_are_refused(ranks):
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    assert all(ranks.run(_stale_and_own_memory, shape))
