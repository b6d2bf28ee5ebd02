"""Stability: many dispatch + combine pairs on every path, every output checked.

    pytest -m soak tests/test_soak.py                       # CPU ranks, and GPU ranks where there are GPUs
    pytest -m "soak and gpu" -s tests/test_soak.py          # GPU ranks only (-s shows the progress lines)
    MOE_EP_SOAK_CALLS=100000 MOE_EP_SOAK_SECONDS=1200 pytest -m "soak and gpu" -s -k "gpu4" tests/test_soak.py
    MOE_EP_SOAK_HIDDEN=2048 ...                             # another hidden than the shape's (GPU: 7168)

Buffers (all made at the start, every call on one of them): one node in mode "auto" with
crossover_tokens = max_tokens_per_rank / 2 (LL up to it, HT above, HT also with zero-copy
outputs) and the expert layout beside the flat one (up to crossover_tokens tokens a rank; slots
for the worst case of any routing, crossover_tokens x world x topk, as duplicate ids within a
token may give an expert more pairs than the default), and, on an even number of ranks, the same
across two nodes (flat only; 2 x 1 on two ranks, 2 x 2 on four: the inter-node path's LL and HT
variants). Each call draws, from a generator every rank seeds alike: the Buffer and the path (a
token bound every rank passes as num_tokens_hint) or, one call in four, the expert layout on the
one-node Buffer (with or without receive hooks, weighted or unweighted combine; the oracle is
computed while the sends are in flight); a routing of ep_cases.FUZZ_ROUTINGS (uniform, all on one
rank, each token on every rank, duplicate ids, every token naming one expert), -1 slots or not,
the token counts under the bound, or full capacity (every rank sends the bound: with "all on one
rank" or "every rank" a rank receives the path's full capacity), zero-copy or poisoned (out=; the
expert layout: poisoned combine out= and receive rows, checked untouched past each count when
their half comes back) or fresh outputs, int32 or int64 ids, pre-quantised fp8 input, and now and
then values in bf16's subnormal range; some calls no rank sends a token. The first twelve calls
take each Buffer, path, layout, routing and option at least once (``FIRST``).

Checks: tests/fast_reference.py computes this rank's expected outputs on its own device (checked
against moe_ep.reference by test_fast_reference_matches_reference in CI), compared in a few device
operations with one host round trip per op; a mismatch is re-checked with ep_cases' checks on the
host for its message, recorded, and the run goes on, so one report lists them all (the test
wants none; a hang ends in PeerTimeoutError or in the harness's timeout). The expert stand-in is
bf16(row * (rank + 1)), in the expert layout bf16(row * (rank + 1) * (local expert + 1)).

Length: MOE_EP_SOAK_CALLS pairs (default 200 on CPU ranks, 10000 on GPUs) or MOE_EP_SOAK_SECONDS
(default 300), whichever comes first; the ranks agree on stopping every progress interval. Rank 0
prints a progress line every MOE_EP_SOAK_PROGRESS pairs (default 1000 on GPUs, 50 on CPU ranks),
flushed, and the test a final line with the pairs checked and the mismatches.

Expected rate on 4 GPUs at hidden 7168 (an estimate: not measured on GPUs yet): host-bound. A pair
costs two eager calls (25-100 us of host time each: README, Performance), about 190 small tensor operations
for its inputs and the oracle (counted with torch's profiler at 4 ranks, 128 tokens each;
moe_ep.reference needs 944 for the same pair, growing with the world size's square) and some 40
for the checks, and 3 host round trips: about 2-4 ms, so 100,000 pairs in 4-7 minutes (set
MOE_EP_SOAK_SECONDS above that). An expert-layout pair (one in four) costs about the same: two
eager calls and their hooks, 3 host round trips, about 210-240 tensor operations for its inputs,
oracle and checks (counted the same way, 64 tokens a rank), and on the device, after a poisoned
call (one in three), a poison fill and a check of its half (bf16 at 64 experts x 2048 slots:
1.9 GB written, 3.8 GB read, about 2 ms): about 3-5 ms. ``test_short_soak`` is the same loop,
twelve calls on two ranks, in normal CI.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import expert_cases
import fast_reference
from ep_cases import (CPU_SHAPE, FUZZ_ROUTINGS, GPU_SHAPE, POISON_INT, check_dispatch, check_part_rows,
                      check_untouched, poison_rows, poisoned_dispatch_output, x_poison)
from rank_checks import assert_equal

SOAK_SECONDS = float(os.environ.get("MOE_EP_SOAK_SECONDS", "300"))
SOAK_SEED = int(os.environ.get("MOE_EP_SOAK_SEED", "0"))
SOAK_HIDDEN = os.environ.get("MOE_EP_SOAK_HIDDEN")  # a smaller hidden than the shape's
MAX_REPORTED = 20  # mismatches kept with their message (all are counted)


def soak_calls(device_type: str) -> int:
    return int(os.environ.get("MOE_EP_SOAK_CALLS", "200" if device_type == "cpu" else "10000"))


def progress_every(device_type: str) -> int:
    return int(os.environ.get("MOE_EP_SOAK_PROGRESS", "50" if device_type == "cpu" else "1000"))


@dataclass
class Plan:
    """One call of the soak, the same on every rank."""

    buffer: int  # index into the Buffers
    ll: bool  # the LL path (or the inter-node path's LL variant), else HT; the expert layout: True
    kind: str  # routing, one of FUZZ_ROUTINGS
    expert: bool = False  # the expert layout (Buffer 0)
    hook: bool = False  # expert layout: receive hooks
    weighted: bool = False  # expert layout: weighted combine
    masked: bool = False
    full: bool = False  # every rank sends the bound
    empty: bool = False  # no rank sends a token
    zero_copy: bool = False  # zero-copy outputs (HT on one node; every rank alike here)
    poisoned: bool = False  # poisoned outputs passed as out= (the expert layout: see the module docstring)
    prequantized: bool = False
    subnormal: bool = False  # values in bf16's subnormal range
    ids_int32: bool = False


# The first calls: each Buffer (1: across nodes, where there is such a Buffer), path, layout,
# routing, full capacity, an empty call, zero-copy, poisoned outputs, pre-quantised and subnormal
# input, receive hooks, weighted and unweighted combines.
FIRST = [
    dict(buffer=0, ll=True, kind="one_expert", full=True, expert=True, hook=True, weighted=True, poisoned=True),
    dict(buffer=0, ll=True, kind="duplicates", masked=True, expert=True, prequantized=True, ids_int32=True),
    dict(buffer=0, ll=True, kind="uniform", poisoned=True),
    dict(buffer=0, ll=False, kind="one_rank", full=True, poisoned=True),
    dict(buffer=0, ll=False, kind="every_rank", full=True, zero_copy=True),
    dict(buffer=1, ll=True, kind="duplicates", masked=True),
    dict(buffer=1, ll=False, kind="uniform", full=True, poisoned=True, ids_int32=True),
    dict(buffer=0, ll=True, kind="uniform", empty=True),
    dict(buffer=0, ll=True, kind="every_rank", full=True, ids_int32=True),
    dict(buffer=1, ll=False, kind="one_rank", full=True, prequantized=True),
    dict(buffer=0, ll=False, kind="duplicates", subnormal=True, zero_copy=True),
    dict(buffer=0, ll=True, kind="uniform", masked=True, prequantized=True, subnormal=True),
]


def _plan(call: int, pick: torch.Generator, buffers: int, fp8: bool) -> Plan:
    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=pick))

    plan = Plan(buffer=draw(buffers), ll=bool(draw(2)), kind=FUZZ_ROUTINGS[draw(len(FUZZ_ROUTINGS))],
                masked=draw(3) == 0, full=draw(6) == 0, empty=draw(20) == 0, zero_copy=bool(draw(2)),
                poisoned=draw(3) == 0, prequantized=draw(4) == 0, subnormal=draw(10) == 0, ids_int32=bool(draw(2)),
                expert=draw(4) == 0, hook=bool(draw(2)), weighted=bool(draw(2)))
    if call < len(FIRST):
        plan = Plan(**FIRST[call])
        plan.buffer %= buffers
    plan.prequantized &= fp8
    if plan.expert:  # the one-node Buffer, up to crossover_tokens tokens a rank
        plan.buffer, plan.ll = 0, True
    plan.hook &= plan.expert
    plan.weighted &= plan.expert
    # Zero-copy outputs: the HT path on one node (Buffer 0) only (other paths ignore the option),
    # never with out=.
    plan.zero_copy &= plan.buffer == 0 and not plan.ll and not plan.poisoned
    return plan


def _soak(ctx, shape, dtype_name: str, calls: int, seconds: float, seed: int, every: int) -> dict:
    """Up to ``calls`` checked pairs within ``seconds``; returns what ran and every mismatch."""
    import moe_ep

    me, world, dev = ctx.rank, ctx.world_size, ctx.device
    dtype = getattr(torch, dtype_name)
    fp8 = dtype == torch.float8_e4m3fn
    num_experts = shape.num_experts_per_rank * world
    most, crossover = shape.max_tokens_per_rank, shape.max_tokens_per_rank // 2
    base = dict(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk, max_tokens_per_rank=most,
                dispatch_dtype=dtype, mode="auto", crossover_tokens=crossover)
    configs = [moe_ep.EpConfig(**base, layouts=("flat", "expert"), expert_slots=crossover * world * shape.topk)]
    if world % 2 == 0:
        configs.append(moe_ep.EpConfig(**base, gpus_per_node=world // 2))
    buffers = [moe_ep.Buffer(ctx.group, cfg) for cfg in configs]
    pick = torch.Generator().manual_seed(seed)  # the same draws on every rank
    data = torch.Generator(device=dev)
    expert = ExpertState()
    stats = {"mismatches": [], "mismatch_count": 0, "paths": {}, "kinds": {}, "full": 0, "received": 0,
             "weighted": 0}
    start = time.monotonic()
    call = 0
    try:
        while call < calls:
            if call % every == 0 and call:
                # Stop together: a rank that stopped alone would leave its peers waiting in a kernel.
                stop = torch.tensor([float(time.monotonic() - start > seconds)], device=dev)
                dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=ctx.group)
                if me == 0:
                    elapsed = time.monotonic() - start
                    print(f"soak {dev.type}{world} {dtype_name} hidden {shape.hidden}: {call} pairs in {elapsed:.0f} s "
                          f"({call / elapsed:.1f} pairs/s), {stats['mismatch_count']} with mismatches on rank 0",
                          flush=True)
                if stop.item():
                    break
            plan = _plan(call, pick, len(buffers), fp8)
            buf = buffers[plan.buffer]
            bound = int(torch.randint(1, crossover + 1, (1,), generator=pick)) if plan.ll else \
                int(torch.randint(crossover + 1, most + 1, (1,), generator=pick))
            if plan.full:  # the path's capacity: every rank's rows may fill a receiver
                bound = crossover if plan.ll else most
            tokens = [int(t) for t in torch.randint(0, bound + 1, (world,), generator=pick)]
            if plan.full:
                tokens = [bound] * world
            elif plan.empty:
                tokens = [0] * world
            target = int(torch.randint(world, (1,), generator=pick))
            data.manual_seed(seed * 1_000_003 + call)
            problems, received = _one_pair(ctx, buf, plan, tokens, bound, target, data, expert)
            stats["received"] += received
            path = "expert" if plan.expert else "ll" if plan.ll else "ht"
            where = f"call {call} ({'inter ' if buf.nodes > 1 else ''}{path}, {plan}, tokens {tokens})"
            stats["mismatch_count"] += bool(problems)
            if problems and len(stats["mismatches"]) < MAX_REPORTED:
                stats["mismatches"].append(f"{where}: " + "; ".join(problems))
            name = ("inter_" if buf.nodes > 1 else "") + path + ("_zero_copy" if plan.zero_copy else "") + \
                ("_hook" if plan.hook else "")
            stats["paths"][name] = stats["paths"].get(name, 0) + 1
            stats["kinds"][plan.kind] = stats["kinds"].get(plan.kind, 0) + 1
            stats["full"] += plan.full
            stats["weighted"] += plan.weighted
            call += 1
        for buf in buffers:
            buf.check()
    finally:
        for buf in buffers:
            buf.close()
    stats.update(calls=call, seconds=time.monotonic() - start)
    return stats


class ExpertState:
    """What the soak keeps between expert-layout calls: combine's ``y`` (NaN but in the rows the
    last call filled) and which halves of the receive regions were poisoned after their last use."""

    def __init__(self):
        self.y = None  # [experts_per_rank, slots, hidden] bf16
        self.y_rows = None  # rows of y (flat index) the last call filled
        self.poisoned = set()  # halves poisoned after their last use


def _one_pair(ctx, buf, plan: Plan, tokens: list, bound: int, target: int, data: torch.Generator,
              expert: ExpertState) -> list:
    """Dispatch and combine one call's inputs (made on the device from ``data``); returns this
    rank's mismatches as text (none: every output right) and the rows (expert layout: pairs) it
    received."""
    from moe_ep import reference

    me, dev, cfg = ctx.rank, ctx.device, buf.cfg
    num_rows = sum(tokens)
    x = torch.randn(num_rows, cfg.hidden, generator=data, device=dev) * \
        (1 + 3 * torch.rand(num_rows, 1, generator=data, device=dev))
    x = (x * 2.0 ** -133 if plan.subnormal else x).to(torch.bfloat16)
    ids = fast_reference.routing(plan.kind, num_rows, cfg.num_experts, cfg.topk, ctx.world_size, data, dev,
                                 target, plan.masked)
    weights = torch.rand(num_rows, cfg.topk, generator=data, device=dev)
    scales = None
    if plan.prequantized:
        x, scales = reference.quantize_fp8(x, cfg.dispatch_dtype)
    batch = fast_reference.Batch(x, scales, ids, weights, tokens)
    if plan.expert:
        return _expert_pair(ctx, buf, plan, batch, bound, expert)
    values, value_scales = fast_reference.payload(batch, cfg.dispatch_dtype)
    expected = fast_reference.expected_dispatch(batch, values, value_scales, cfg.num_experts, me)
    x_in, ids_in, weights_in = batch.inputs(me)
    out = buf.dispatch(x_in, ids_in.int() if plan.ids_int32 else ids_in, weights_in,
                       out=poisoned_dispatch_output(buf) if plan.poisoned else None, num_tokens_hint=bound,
                       zero_copy=plan.zero_copy)
    path_expected = ("inter" if plan.ll else "inter_ht") if buf.nodes > 1 else ("ll" if plan.ll else "ht")
    rows = expected.num_tokens
    bad = [_differs(expected.x, out.x[:rows]), _differs(expected.topk_ids, out.topk_ids[:rows]),
           _differs(expected.topk_weights, out.topk_weights[:rows]), _differs(expected.src, out.src[:rows]),
           _differs(expected.tokens_per_expert, out.tokens_per_expert),
           out.num_tokens[0] != rows]
    if expected.x_scales is not None:
        bad.append(_differs(expected.x_scales, out.x_scales[:rows]))
    if out.handle.path == "ht":
        bad.append(_differs(fast_reference.expected_part_rows(expected, tokens, cfg.ht_parts), out.handle.part_rows))
    if plan.poisoned:
        bad += [(out.x[rows:].view(torch.uint8) != x_poison(out.x.dtype)).any(),
                (out.topk_ids[rows:] != -1).any(), (out.src[rows:] != POISON_INT).any()]
    y = torch.full((buf.capacity, cfg.hidden), float("nan"), dtype=torch.bfloat16, device=dev)
    y[:rows] = fast_reference.expert_rows(expected.x, expected.x_scales, me)  # rows past num_tokens: never read
    z = buf.combine(y, out.handle)
    z_expected = fast_reference.expected_combine(batch, values, value_scales, cfg.num_experts, me,
                                                 cfg.gpus_per_node if buf.nodes > 1 else None)
    combine_bad = _differs(z_expected, z)
    problems = []
    if out.handle.path != path_expected:
        problems.append(f"took the {out.handle.path} path, expected {path_expected}")
    if bool(torch.stack(bad).any()):
        problems.append(_dispatch_message(out, expected, tokens, cfg.ht_parts, plan.poisoned, buf.capacity))
    if bool(combine_bad):
        problems.append(_combine_message(z_expected, z))
    if plan.zero_copy:  # the next call must rewrite every row it returns (receive regions included)
        poison_rows(out)
    return problems, rows


def _expert_pair(ctx, buf, plan: Plan, batch, bound: int, state: ExpertState) -> list:
    """One expert-layout dispatch + combine of ``batch``; the oracle is computed while the sends
    are in flight (before the hooks, with ``plan.hook``). Returns (mismatches, pairs received)."""
    me, dev, cfg = ctx.rank, ctx.device, buf.cfg
    experts, slots = buf.experts_per_rank, cfg.slots(ctx.world_size)
    x_in, ids_in, weights_in = batch.inputs(me)
    made = buf.dispatch(x_in, ids_in.int() if plan.ids_int32 else ids_in, weights_in, num_tokens_hint=bound,
                        layout="expert", return_recv_hook=plan.hook)
    out, hook = made if plan.hook else (made, None)
    values, value_scales = fast_reference.payload(batch, cfg.dispatch_dtype)
    expected = fast_reference.expected_dispatch_expert(batch, values, value_scales, cfg.num_experts, me)
    pairs = expected.x.shape[0]
    local, rows = fast_reference.expert_row_index(expected.tokens_per_expert, pairs, slots)
    if hook is not None:
        hook()
    half = out.handle.half
    bad = [_differs(expected.tokens_per_expert, out.tokens_per_expert),
           _differs(expected.x, out.x.reshape(experts * slots, cfg.hidden)[rows]),
           _differs(expected.src, out.src.reshape(experts * slots, 2)[rows]),
           _differs(expected.topk_weights, out.topk_weights.reshape(experts * slots)[rows])]
    if expected.x_scales is not None:
        bad.append(_differs(expected.x_scales, out.x_scales.reshape(experts * slots, cfg.num_scales)[rows]))
    untouched = half in state.poisoned
    if untouched:  # rows past each count still poisoned
        bad.append(_written_past_counts(out, expected.tokens_per_expert))
        state.poisoned.discard(half)
    if state.y is None:
        state.y = torch.full((experts, slots, cfg.hidden), float("nan"), dtype=torch.bfloat16, device=dev)
    flat_y = state.y.view(experts * slots, cfg.hidden)
    if state.y_rows is not None:
        flat_y[state.y_rows] = float("nan")  # rows past each count stay NaN: combine must never read them
    flat_y[rows] = fast_reference.expert_pair_rows(expected.x, expected.x_scales, me, local)
    state.y_rows = rows
    z_out = torch.full((batch.tokens[me], cfg.hidden), float("nan"), dtype=torch.bfloat16, device=dev) \
        if plan.poisoned else None
    made = buf.combine(state.y, out.handle, out=z_out, weighted=plan.weighted, return_recv_hook=plan.hook)
    z, hook = made if plan.hook else (made, None)
    z_expected = fast_reference.expected_combine_expert(batch, values, value_scales, cfg.num_experts, me,
                                                        plan.weighted)
    if hook is not None:
        hook()
    combine_bad = _differs(z_expected, z)
    problems = []
    if out.handle.path != "expert":
        problems.append(f"took the {out.handle.path} path, expected expert")
    if bool(torch.stack(bad).any()):
        host = _on_host(expected)
        try:
            expert_cases.check_expert_dispatch(out, host, "")
            if untouched:
                expert_cases.check_expert_untouched(out, host.tokens_per_expert)
            problems.append("dispatch: the device comparison differed, the host checks did not")
        except AssertionError as err:
            problems.append(f"dispatch: {err}")
    if bool(combine_bad):
        problems.append(_combine_message(z_expected, z))
    if plan.poisoned:  # the call that reuses this half must rewrite every valid row and no other
        expert_cases.poison(out)
        state.poisoned.add(half)
    return problems, pairs


def _written_past_counts(out, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """A device bool: some row past an expert's count no longer holds ``expert_cases.poison``'s
    values (row-wise reductions: no temporary the size of the payload)."""
    slots = out.x.shape[1]
    past = torch.arange(slots, device=out.x.device)[None, :] >= tokens_per_expert[:, None]  # [experts, slots]
    payload = out.x.view(torch.uint8)
    poison = x_poison(out.x.dtype)
    kept = (payload.amin(dim=2) == poison) & (payload.amax(dim=2) == poison) & (out.src == POISON_INT).all(dim=2) \
        & out.topk_weights.isnan()
    if out.x_scales is not None:
        kept &= out.x_scales.isnan().all(dim=2)
    return (past & ~kept).any()


def _differs(expected: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """A device bool: shapes or bytes differ."""
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return torch.ones((), dtype=torch.bool, device=got.device)
    return (expected.contiguous().reshape(-1).view(torch.uint8) != got.contiguous().reshape(-1).view(torch.uint8)).any()


def _on_host(expected):
    """A reference result (a dataclass of tensors) with every tensor copied to the host."""
    return dataclasses.replace(expected, **{f.name: getattr(expected, f.name).cpu() if getattr(expected, f.name)
                                            is not None else None for f in dataclasses.fields(expected)})


def _combine_message(z_expected: torch.Tensor, z: torch.Tensor) -> str:
    """The host check's message for a combine the device comparison found different."""
    try:
        assert_equal("combine", z_expected.cpu(), z.cpu())
    except AssertionError as err:
        return str(err)
    return "combine: the device comparison differed, the host check did not"


def _dispatch_message(out, expected, tokens, parts, poisoned, capacity) -> str:
    """ep_cases' checks on host copies, for the message of a dispatch mismatch."""
    host = _on_host(expected)
    try:
        n = check_dispatch(out, host, capacity)
        if out.handle.path == "ht":
            check_part_rows(out, host, tokens, parts)
        if poisoned:
            check_untouched(out, n)
    except AssertionError as err:
        return f"dispatch: {err}"
    return "dispatch: the device comparison differed, the host checks did not"


def _run_soak(ranks, dtype: str, calls: int, seconds: float) -> list[dict]:
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    if SOAK_HIDDEN:
        shape = dataclasses.replace(shape, hidden=int(SOAK_HIDDEN))
    results = ranks.run(_soak, shape, dtype, calls, seconds, SOAK_SEED, progress_every(ranks.device),
                        timeout=seconds + 600)
    done = results[0]["calls"]
    mismatches = [f"rank {rank}: {m}" for rank, r in enumerate(results) for m in r["mismatches"]]
    count = sum(r["mismatch_count"] for r in results)
    took = results[0]["seconds"]
    print(f"\n{ranks.device}{ranks.world_size} {dtype} hidden {shape.hidden}: {done} pairs checked on every rank, "
          f"{count} mismatches (a pair with a wrong output on a rank), in {took:.0f} s "
          f"({done / took:.1f} pairs/s, seed {SOAK_SEED}); paths {results[0]['paths']}, "
          f"routings {results[0]['kinds']}, {results[0]['full']} at full capacity, "
          f"{results[0]['weighted']} weighted expert-layout combines, rows (expert layout: pairs) received per "
          f"rank {[r['received'] for r in results]}", flush=True)
    assert all(r["calls"] == done for r in results), [r["calls"] for r in results]
    assert done == calls or took > seconds, f"stopped after {done} calls for no reason"
    assert done > 0, "no call ran"
    assert not count, f"{count} mismatches (the first {len(mismatches)}):\n" + "\n".join(mismatches)
    return results


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 900)
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"], ids=["bf16", "fp8"])
def test_soak(request, ranks, dtype):
    # "-m gpu" (the GPU pass) would select the GPU soak cases too: they run only when the marker
    # expression names soak ("-m soak", "-m 'soak and gpu'").
    if "soak" not in request.config.getoption("markexpr"):
        pytest.skip("the soak runs only when -m names it")
    _run_soak(ranks, dtype, soak_calls(ranks.device), SOAK_SECONDS)


@pytest.mark.parametrize("ranks", [pytest.param(("cpu", 2), id="cpu2"),
                                   pytest.param(("cuda", 2), id="gpu2", marks=pytest.mark.gpu)], indirect=True)
def test_short_soak(ranks):
    """The soak loop's first twelve calls (``FIRST``: every Buffer, path, layout and routing, full
    capacity, an empty call, zero-copy, pre-quantised and subnormal input, receive hooks), fp8."""
    results = _run_soak(ranks, "float8_e4m3fn", len(FIRST), 600.0)
    assert results[0]["calls"] == len(FIRST)
    assert set(results[0]["paths"]) == {"expert", "expert_hook", "ll", "ht", "ht_zero_copy", "inter_ll",
                                        "inter_ht"}, results[0]["paths"]


def _assert_same_fields(label: str, want, got) -> None:
    """Every field of two reference results (dataclasses of one type) is identical, None included."""
    for f in dataclasses.fields(got):
        a, b = getattr(want, f.name), getattr(got, f.name)
        if a is None or b is None:
            assert a is b, f"{label}{f.name}"
        else:
            assert_equal(f"{label}{f.name}", a, b)


@pytest.mark.parametrize("world, gpus_per_node", [(2, None), (3, None), (4, 2), (4, 1)])
def test_fast_reference_matches_reference(world, gpus_per_node):
    """tests/fast_reference.py against moe_ep.reference, bit for bit, on one process: every
    routing with and without -1 slots, bf16, fp8 and pre-quantised fp8, empty and full ranks; the
    flat layout's dispatch and combine, and the expert layout's (weighted and unweighted), with
    the rows of each expert at their place in the [experts_per_rank, slots, hidden] outputs."""
    from moe_ep import reference

    experts_per_rank, topk, hidden = 3, 4, 256
    num_experts = experts_per_rank * world
    gen = torch.Generator().manual_seed(world)
    for case, (kind, masked, dtype, prequantized) in enumerate(
            [(k, m, d, p) for k in FUZZ_ROUTINGS for m in (False, True)
             for d, p in ((torch.bfloat16, False), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True))]):
        tokens = [(0, 7, 3, 5)[(r + case) % 4] for r in range(world)]
        rows = sum(tokens)
        x = (torch.randn(rows, hidden, generator=gen) * 2.0 ** (-133 if case % 5 == 0 else 0)).to(torch.bfloat16)
        scales = None
        if prequantized:
            x, scales = reference.quantize_fp8(x)
        ids = fast_reference.routing(kind, rows, num_experts, topk, world, gen, "cpu", target=case % world,
                                     masked=masked)
        batch = fast_reference.Batch(x, scales, ids, torch.rand(rows, topk, generator=gen), tokens)
        per_rank = [batch.inputs(r) for r in range(world)]
        expected = reference.dispatch([p[0] for p in per_rank], [p[1] for p in per_rank], [p[2] for p in per_rank],
                                      num_experts, dtype)
        ys = [fast_reference.expert_rows(e.x, e.x_scales, d) for d, e in enumerate(expected)]
        combined = reference.combine(ys, expected, tokens, gpus_per_node)
        values, value_scales = fast_reference.payload(batch, dtype)
        for r in range(world):
            fast = fast_reference.expected_dispatch(batch, values, value_scales, num_experts, r)
            _assert_same_fields(f"case {case}, rank {r}: ", expected[r], fast)
            assert_equal(f"case {case}, rank {r}: combine", combined[r],
                         fast_reference.expected_combine(batch, values, value_scales, num_experts, r, gpus_per_node))
        ids_of, weights_of = [p[1] for p in per_rank], [p[2] for p in per_rank]
        pairs = reference.dispatch_expert([p[0] for p in per_rank], ids_of, weights_of, num_experts, dtype)
        pair_ys = [expert_cases.stand_in_outputs(received, d) for d, received in enumerate(pairs)]
        for weighted in (False, True):
            combined = reference.combine_expert(pair_ys, pairs, ids_of, weights_of, weighted)
            for r in range(world):
                assert_equal(f"case {case}, rank {r}: combine_expert (weighted {weighted})", combined[r],
                             fast_reference.expected_combine_expert(batch, values, value_scales, num_experts, r,
                                                                    weighted))
        for r in range(world):
            fast = fast_reference.expected_dispatch_expert(batch, values, value_scales, num_experts, r)
            _assert_same_fields(f"case {case}, rank {r}: expert layout ", pairs[r], fast)
            slots = int(fast.tokens_per_expert.max()) + 1  # the most pairs of an expert, and a row past them
            local, index = fast_reference.expert_row_index(fast.tokens_per_expert, fast.x.shape[0], slots)
            placed = torch.full((experts_per_rank * slots, hidden), float("nan"), dtype=torch.bfloat16)
            placed[index] = fast_reference.expert_pair_rows(fast.x, fast.x_scales, r, local)
            assert_equal(f"case {case}, rank {r}: expert-major rows",
                         expert_cases.expert_major(pair_ys[r], pairs[r].tokens_per_expert, slots, hidden),
                         placed.view(experts_per_rank, slots, hidden))
