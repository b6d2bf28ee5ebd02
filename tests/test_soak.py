"""Stability: many dispatch + combine pairs on one Buffer, every output against the reference.

    pytest -m soak tests/test_soak.py                      # CPU ranks, and GPU ranks where there are GPUs
    pytest -m "soak and gpu" tests/test_soak.py            # GPU ranks only
    MOE_EP_SOAK_CALLS=2000 MOE_EP_SOAK_SECONDS=1800 pytest -m soak tests/test_soak.py
    MOE_EP_SOAK_HIDDEN=2048 ...                            # another hidden than the shape's (GPU: 7168)

The Buffer runs in mode "auto" with crossover_tokens = max_tokens_per_rank / 2. Each call draws
a routing (uniform, masked ids, experts on one rank, all on rank 0, skewed: the first five
calls take each once), a token bound every rank shares and passes as num_tokens_hint (at most
the crossover: the LL path; above it: the HT path) and token counts under it (one rank sends
none, one sends the bound, the others a random count; some calls no rank sends any). Odd calls
pass int64 ids, even ones int32; some calls write into poisoned outputs, some fp8 calls pass
pre-quantised rows. The run stops after MOE_EP_SOAK_CALLS calls (default 200 on CPU ranks,
10000 on GPUs) or once MOE_EP_SOAK_SECONDS (default 300) have passed, whichever comes first;
all ranks agree on where to stop. A mismatch is recorded and the run goes on, so one report
lists them all; the test wants none, and a hang ends in PeerTimeoutError or in the harness's
timeout. ``test_short_soak`` is the same loop, ten calls on two ranks, in normal CI.
"""

import dataclasses
import os
import time

import pytest
import torch
import torch.distributed as dist

from ep_cases import (CPU_SHAPE, GPU_SHAPE, check_dispatch, check_untouched, expert_outputs, make_inputs,
                      poisoned_dispatch_output)
from rank_checks import assert_equal

KINDS = ("uniform", "masked", "one_rank", "to_rank0", "skewed")
SOAK_SECONDS = float(os.environ.get("MOE_EP_SOAK_SECONDS", "300"))
SOAK_SEED = int(os.environ.get("MOE_EP_SOAK_SEED", "0"))
SOAK_HIDDEN = os.environ.get("MOE_EP_SOAK_HIDDEN")  # a smaller hidden for long GPU soaks (the CPU reference's cost)


def soak_calls(device_type: str) -> int:
    return int(os.environ.get("MOE_EP_SOAK_CALLS", "200" if device_type == "cpu" else "10000"))


def _soak(ctx, shape, dtype_name: str, calls: int, seconds: float, seed: int) -> dict:
    """Up to ``calls`` checked pairs within ``seconds``; returns what ran and every mismatch."""
    import moe_ep
    from moe_ep import reference

    me, world = ctx.rank, ctx.world_size
    dtype = getattr(torch, dtype_name)
    num_experts = shape.num_experts_per_rank * world
    crossover = shape.max_tokens_per_rank // 2
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                          max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=dtype, mode="auto",
                          crossover_tokens=crossover)
    buf = moe_ep.Buffer(ctx.group, cfg)
    pick = torch.Generator().manual_seed(seed)  # the same draws on every rank
    mismatches, kinds_run, paths_run, received = [], {}, {}, 0
    start = time.monotonic()
    call = 0
    try:
        while call < calls:
            # Stop together: a rank that stopped alone would leave its peers waiting in a kernel.
            stop = torch.tensor([float(time.monotonic() - start > seconds)], device=ctx.device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=ctx.group)
            if stop.item():
                break
            # Every kind once, then random kinds; LL and HT alternate for four calls, then either.
            kind = KINDS[call] if call < len(KINDS) else KINDS[int(torch.randint(len(KINDS), (1,), generator=pick))]
            ll = call % 2 == 0 if call < 4 else bool(torch.randint(2, (1,), generator=pick))
            hint = int(torch.randint(1, crossover + 1, (1,), generator=pick)) if ll else \
                int(torch.randint(crossover + 1, shape.max_tokens_per_rank + 1, (1,), generator=pick))
            xs, ids, weights = make_inputs(call, kind, dataclasses.replace(shape, max_tokens_per_rank=hint), world, seed)
            if call % 11 == 5:  # no rank sends a token
                xs, ids, weights = [x[:0] for x in xs], [i[:0] for i in ids], [w[:0] for w in weights]
            if cfg.fp8 and call % 4 == 3:
                xs = [reference.quantize_fp8(x) for x in xs]
            expected = reference.dispatch(xs, ids, weights, num_experts, dtype)
            x_in = tuple(t.to(ctx.device) for t in xs[me]) if isinstance(xs[me], tuple) else xs[me].to(ctx.device)
            ids_in = ids[me].to(ctx.device) if call % 2 else ids[me].int().to(ctx.device)
            poisoned = call % 3 != 2
            out = buf.dispatch(x_in, ids_in, weights[me].to(ctx.device),
                               out=poisoned_dispatch_output(buf) if poisoned else None, num_tokens_hint=hint)
            path = out.handle.path
            where = f"call {call} ({path}, {kind}, {len(ids[me])} tokens sent, bound {hint})"
            if path != ("ll" if ll else "ht"):
                mismatches.append(f"{where}: took the {path} path")
            try:
                n = check_dispatch(out, expected[me], buf.capacity)
                if poisoned:
                    check_untouched(out, n)
            except AssertionError as err:
                mismatches.append(f"{where}: dispatch: {err}")
            n = expected[me].num_tokens
            received += n
            ys = [expert_outputs(expected[r], r) for r in range(world)]
            y = torch.full((buf.capacity, shape.hidden), float("nan"), dtype=torch.bfloat16)
            y[:n] = ys[me]  # rows past num_tokens stay NaN: combine must never read them
            z = buf.combine(y.to(ctx.device), out.handle)
            try:
                assert_equal("combine", reference.combine(ys, expected, [len(i) for i in ids])[me], z.cpu())
            except AssertionError as err:
                mismatches.append(f"{where}: {err}")
            kinds_run[kind] = kinds_run.get(kind, 0) + 1
            paths_run[path] = paths_run.get(path, 0) + 1
            call += 1
        buf.check()
    finally:
        buf.close()
    return {"calls": call, "seconds": time.monotonic() - start, "mismatches": mismatches, "kinds": kinds_run,
            "paths": paths_run, "received": received}


def _run_soak(ranks, dtype: str, calls: int, seconds: float) -> list[dict]:
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    if SOAK_HIDDEN:
        shape = dataclasses.replace(shape, hidden=int(SOAK_HIDDEN))
    results = ranks.run(_soak, shape, dtype, calls, seconds, SOAK_SEED, timeout=seconds + 300)
    done = results[0]["calls"]
    print(f"\n{ranks.device}{ranks.world_size} {dtype} hidden {shape.hidden}: {done} of {calls} calls in {results[0]['seconds']:.0f} s "
          f"(seed {SOAK_SEED}), paths {results[0]['paths']}, routings {results[0]['kinds']}, "
          f"rows received per rank {[r['received'] for r in results]}")
    assert all(r["calls"] == done for r in results), [r["calls"] for r in results]
    assert done == calls or results[0]["seconds"] > seconds, f"stopped after {done} calls for no reason"
    assert done > 0, "no call ran"
    mismatches = [f"rank {rank}: {m}" for rank, r in enumerate(results) for m in r["mismatches"]]
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:10])
    return results


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 600)
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
    """Ten calls of the soak loop (every routing kind, both paths, a call where no rank sends), fp8."""
    results = _run_soak(ranks, "float8_e4m3fn", 10, 600.0)
    assert results[0]["calls"] == 10
    assert set(results[0]["paths"]) == {"ll", "ht"}, results[0]["paths"]
