"""Inputs and checks of dispatch/combine tests, importable by rank processes.

Every rank draws every rank's inputs from one seed, so each can run the reference for the
whole group and check its own outputs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moe_ep
from moe_ep import reference
from rank_checks import assert_equal

POISON_INT = -7777


@dataclass(frozen=True)
class Shape:
    hidden: int
    num_experts_per_rank: int
    topk: int
    max_tokens_per_rank: int


CPU_SHAPE = Shape(hidden=256, num_experts_per_rank=4, topk=3, max_tokens_per_rank=12)
GPU_SHAPE = Shape(hidden=7168, num_experts_per_rank=64, topk=8, max_tokens_per_rank=128)  # DeepSeek-V3 at EP4


def routing(kind: str, num_tokens: int, num_experts: int, topk: int, world_size: int, gen) -> torch.Tensor:
    """``[num_tokens, topk]`` int64 global expert ids of one rank for a routing ``kind``."""
    per_rank = num_experts // world_size
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, topk, dtype=torch.int64)
    if kind == "uniform":
        pass
    elif kind == "masked":  # some ids -1, and some tokens with no expert at all
        ids[torch.rand(ids.shape, generator=gen) < 0.25] = -1
        ids[torch.rand(num_tokens, generator=gen) < 0.2] = -1
    elif kind == "one_rank":  # every expert of a token on one rank
        for t in range(num_tokens):
            r = int(torch.randint(0, world_size, (1,), generator=gen))
            ids[t] = r * per_rank + torch.randperm(per_rank, generator=gen)[:topk]
    elif kind == "to_rank0":  # every expert on rank 0: the other ranks receive nothing
        ids = torch.stack([torch.randperm(per_rank, generator=gen)[:topk] for _ in range(num_tokens)]) \
            if num_tokens else ids
    elif kind == "skewed":  # most ids on a few hot experts of rank 0, so other ranks get little
        hot = torch.rand(ids.shape, generator=gen) < 0.8
        hot_ids = torch.randint(0, min(per_rank, 2 * topk), ids.shape, generator=gen)
        ids = torch.where(hot, hot_ids, ids)
        # keep ids of a token distinct (as a router's top-k are)
        for t in range(num_tokens):
            seen = set()
            for k in range(topk):
                v = int(ids[t, k])
                if v in seen:
                    ids[t, k] = -1
                seen.add(v)
    else:
        raise ValueError(kind)
    return ids


# Routings of the randomized tests (tests/contract.py): each may also mask slots (-1) on top.
FUZZ_ROUTINGS = ("uniform", "one_rank", "every_rank", "duplicates", "one_expert")


def hot_expert(target: int, num_experts: int, world_size: int) -> int:
    """The expert every token names in routing "one_expert": the last of rank ``target``'s."""
    return (target + 1) * (num_experts // world_size) - 1


def fuzz_routing(kind: str, num_tokens: int, num_experts: int, topk: int, world_size: int, gen,
                 target: int = 0, masked: bool = False) -> torch.Tensor:
    """``[num_tokens, topk]`` int64 global expert ids of one rank for a randomized test:
    "uniform" distinct random experts; "one_rank" every expert of every token on rank ``target``
    (distinct where that rank has topk experts, else repeated); "every_rank" each token on every
    rank (one expert on each of min(topk, world) distinct ranks, the other slots random, in a
    random slot order); "duplicates" random experts, a token's last id repeating its first;
    "one_expert" every token names ``hot_expert(target)`` in a random slot, its other slots distinct
    random experts (a full expert: the expert layout's capacity when every rank sends its maximum).
    With ``masked`` about a quarter of the slots are -1 and about one token in six has none."""
    per_rank = num_experts // world_size
    if num_tokens == 0:
        return torch.zeros(0, topk, dtype=torch.int64)
    if kind == "uniform":
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(num_tokens)])
    elif kind == "one_rank":
        local = torch.stack([torch.randperm(per_rank, generator=gen)[:topk] for _ in range(num_tokens)]) \
            if topk <= per_rank else torch.randint(0, per_rank, (num_tokens, topk), generator=gen)
        ids = target * per_rank + local
    elif kind == "every_rank":
        ids = torch.randint(0, num_experts, (num_tokens, topk), generator=gen)
        reach = min(topk, world_size)
        for t in range(num_tokens):
            ranks = torch.randperm(world_size, generator=gen)[:reach]
            ids[t, :reach] = ranks * per_rank + torch.randint(0, per_rank, (reach,), generator=gen)
            ids[t] = ids[t, torch.randperm(topk, generator=gen)]
    elif kind == "duplicates":
        ids = torch.randint(0, num_experts, (num_tokens, topk), generator=gen)
        ids[:, -1] = ids[:, 0]
    elif kind == "one_expert":
        hot = hot_expert(target, num_experts, world_size)
        others = torch.tensor([e for e in range(num_experts) if e != hot], dtype=torch.int64)
        ids = torch.stack([torch.cat([torch.tensor([hot]), others[torch.randperm(num_experts - 1, generator=gen)
                                                                  [:topk - 1]]])
                           [torch.randperm(topk, generator=gen)] for _ in range(num_tokens)])
    else:
        raise ValueError(kind)
    if masked:
        ids[torch.rand(ids.shape, generator=gen) < 0.25] = -1
        ids[torch.rand(num_tokens, generator=gen) < 0.15] = -1
    return ids


def make_inputs(call: int, kind: str, shape: Shape, world_size: int, seed: int = 0):
    """Every rank's (x, topk_ids, topk_weights) for one call: rank (call % R) sends no token,
    rank (call + 1) % R sends max_tokens_per_rank, the others a random count."""
    gen = torch.Generator().manual_seed(seed * 7919 + call)
    num_experts = shape.num_experts_per_rank * world_size
    counts = [int(torch.randint(1, shape.max_tokens_per_rank + 1, (1,), generator=gen)) for _ in range(world_size)]
    counts[call % world_size] = 0
    counts[(call + 1) % world_size] = shape.max_tokens_per_rank
    xs = [(torch.randn(t, shape.hidden, generator=gen) * (1 + 3 * torch.rand(t, 1, generator=gen))).to(torch.bfloat16)
          for t in counts]
    ids = [routing(kind, t, num_experts, shape.topk, world_size, gen) for t in counts]
    weights = [torch.rand(t, shape.topk, generator=gen) for t in counts]
    return xs, ids, weights


def poisoned_dispatch_output(buf: moe_ep.Buffer) -> moe_ep.DispatchOutput:
    out = buf.empty_dispatch_output()
    poison_rows(out)
    return out


def x_poison(dtype: torch.dtype) -> int:
    """The byte that fills poisoned payload rows: NaN, which no dispatch of finite inputs writes
    (0xFF in bf16 and float8_e4m3fn; 0x80, the only NaN of float8_e4m3fnuz, whose 0xFF is -240)."""
    return 0x80 if dtype == torch.float8_e4m3fnuz else 0xFF


def poison_rows(out: moe_ep.DispatchOutput) -> None:
    """Every output row and count of ``out`` set to values no dispatch writes."""
    out.x.view(torch.uint8).fill_(x_poison(out.x.dtype))
    if out.x_scales is not None:
        out.x_scales.fill_(float("nan"))
    out.topk_ids.fill_(POISON_INT)
    out.topk_weights.fill_(float("nan"))
    out.src.fill_(POISON_INT)
    out.num_tokens.fill_(POISON_INT)
    out.tokens_per_expert.fill_(POISON_INT)
    if out.handle.part_rows is not None:
        out.handle.part_rows.fill_(POISON_INT)


def check_part_rows(out: moe_ep.DispatchOutput, exp: reference.RankDispatch, tokens: list, parts: int) -> None:
    """HT: ``handle.part_rows[s, q]`` is the first received row of source s whose token is at or
    past min(q * cdiv(T_s, parts), T_s), T_s = ``tokens[s]`` (rows of s are in token order)."""
    src = exp.src
    expected = torch.empty(len(tokens), parts + 1, dtype=torch.int32)
    for s, t in enumerate(tokens):
        mine = src[src[:, 0] == s, 1]
        for q in range(parts + 1):
            bound = min(q * -(-t // parts), t)
            expected[s, q] = int((src[:, 0] < s).sum()) + int((mine < bound).sum())
    assert_equal("part_rows", expected, out.handle.part_rows.cpu())


def expert_outputs(received: reference.RankDispatch, rank: int) -> torch.Tensor:
    """A stand-in for the experts of ``rank``: bf16(x * (rank + 1) * sum of local weights)."""
    x = received.x.float() if received.x_scales is None else reference.dequantize_fp8(received.x, received.x_scales)
    return (x * (rank + 1) * received.topk_weights.sum(dim=1, keepdim=True)).to(torch.bfloat16)


def check_dispatch(out: moe_ep.DispatchOutput, exp: reference.RankDispatch, capacity: int) -> int:
    """Every valid row bit-exact against the reference; rows past num_tokens untouched."""
    n = int(out.num_tokens.item())
    assert n == exp.num_tokens, f"num_tokens: expected {exp.num_tokens}, got {n}"
    assert_equal("x", exp.x.view(torch.uint8), out.x[:n].cpu().view(torch.uint8))
    if exp.x_scales is not None:
        assert_equal("x_scales", exp.x_scales, out.x_scales[:n].cpu())
    assert_equal("topk_ids", exp.topk_ids, out.topk_ids[:n].cpu())
    assert_equal("topk_weights", exp.topk_weights, out.topk_weights[:n].cpu())
    assert_equal("src", exp.src, out.src[:n].cpu())
    assert_equal("tokens_per_expert", exp.tokens_per_expert, out.tokens_per_expert.cpu())
    return n


def check_untouched(out: moe_ep.DispatchOutput, n: int) -> None:
    """Rows past num_tokens still hold the poison (no stray writes), but their topk_ids, which are
    -1 (padding rows route to no expert)."""
    assert bool((out.x[n:].view(torch.uint8) == x_poison(out.x.dtype)).all()), "x written past num_tokens"
    assert bool((out.topk_ids[n:] == -1).all()), "topk_ids past num_tokens are not -1"
    assert bool((out.src[n:] == POISON_INT).all()), "src written past num_tokens"


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` one element past a 16-byte boundary (a valid input whose rows
    the kernels must not declare aligned)."""
    flat = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    view = flat[1:1 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def run_calls(ctx, kind: str, dtype_name: str, shape: Shape, calls: int, prequantized: bool = False,
              hidden: int | None = None, topk: int | None = None, seed: int = 0, mode: str = "auto",
              crossover_tokens: int | None = None, hints: list | None = None, nodes: int = 1,
              inter_transport: str = "auto", backend: str | None = None, ht_parts: int | None = None):
    """``calls`` dispatch + combine pairs on one Buffer with fresh inputs, each checked against the
    reference; returns the rows this rank received over all calls (or, with ``hints``, the path
    each call took; in "auto" mode a call with hint h holds at most h tokens per rank)."""
    import dataclasses

    shape = dataclasses.replace(shape, hidden=hidden or shape.hidden, topk=topk or shape.topk)
    dtype = getattr(torch, dtype_name)
    world = ctx.world_size
    num_experts = shape.num_experts_per_rank * world
    extra = {} if crossover_tokens is None else {"crossover_tokens": crossover_tokens}
    if nodes > 1:  # ranks as `nodes` simulated nodes of world / nodes consecutive ranks
        extra["gpus_per_node"] = world // nodes
        extra["inter_transport"] = inter_transport
    if backend is not None:
        extra["backend"] = backend
    if ht_parts is not None:
        extra["ht_parts"] = ht_parts
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=dtype, mode=mode, **extra)
    buf = moe_ep.Buffer(ctx.group, cfg)
    received = 0
    paths = []
    views = []  # data_ptr of each zero-copy HT call's x
    try:
        for call in range(calls):
            hint = hints[call] if hints else None
            xs, ids, weights = make_inputs(call, kind, dataclasses.replace(shape, max_tokens_per_rank=hint)
                                           if hint else shape, world, seed)
            if prequantized:
                xs = [reference.quantize_fp8(x, dtype) for x in xs]
            expected = reference.dispatch(xs, ids, weights, num_experts, dtype)
            me = ctx.rank
            x_in = tuple(t.to(ctx.device) for t in xs[me]) if prequantized else xs[me].to(ctx.device)
            if call == 4:  # the payload at an address that is not 16-byte aligned
                x_in = (unaligned(x_in[0]), x_in[1]) if prequantized else unaligned(x_in)
                payload = x_in[0] if prequantized else x_in
                assert payload.numel() == 0 or payload.data_ptr() % 16, "the copy should be unaligned"
            ids_in = ids[me].to(ctx.device) if call % 2 else ids[me].int().to(ctx.device)
            # Outputs: poisoned ones passed as out, the Buffer's own (zero_copy: on the HT path views
            # of its receive regions, poisoned after each check), or freshly allocated.
            use_out, zero_copy = call % 3 == 0, call % 3 == 1
            out = buf.dispatch(x_in, ids_in, weights[me].to(ctx.device),
                               out=poisoned_dispatch_output(buf) if use_out else None, num_tokens_hint=hint,
                               zero_copy=zero_copy)
            paths.append(out.handle.path)
            if zero_copy and out.handle.path == "ht":
                views.append(out.x.data_ptr())
                assert len(set(views)) == 1, "zero-copy outputs should be the same receive region every call"
            assert (out.handle.path in ("inter", "inter_ht")) == (nodes > 1), out.handle.path
            n = check_dispatch(out, expected[me], buf.capacity)
            if out.handle.path == "ht":
                check_part_rows(out, expected[me], [len(i) for i in ids], cfg.ht_parts)
            if use_out:
                check_untouched(out, n)
            received += n
            ys = [expert_outputs(expected[r], r) for r in range(world)]
            y = torch.full((buf.capacity, shape.hidden), float("nan"), dtype=torch.bfloat16)
            y[:n] = ys[me]  # rows past num_tokens stay NaN: combine must never read them
            z_out = torch.full((xs[me][0].shape[0] if prequantized else xs[me].shape[0], shape.hidden),
                               float("nan"), dtype=torch.bfloat16, device=ctx.device)
            z = buf.combine(y.to(ctx.device), out.handle, out=z_out if use_out else None)
            z_expected = reference.combine(ys, expected, [len(i) for i in ids], extra.get("gpus_per_node"))[me]
            assert_equal(f"combine (call {call})", z_expected, z.cpu())
            if zero_copy:  # the next call must rewrite every row it returns (receive regions included)
                poison_rows(out)
        buf.check()
    finally:
        buf.close()
    return paths if hints else received


def inputs_on_rank(ctx, buf, call: int, shape, kind: str = "uniform", seed: int = 0):
    """This rank's (x, topk_ids, topk_weights) of a call on its device, and its reference dispatch."""
    xs, ids, weights = make_inputs(call, kind, shape, ctx.world_size, seed)
    expected = reference.dispatch(xs, ids, weights, buf.cfg.num_experts, buf.cfg.dispatch_dtype)[ctx.rank]
    me = ctx.rank
    return (xs[me].to(ctx.device), ids[me].to(ctx.device), weights[me].to(ctx.device)), expected
