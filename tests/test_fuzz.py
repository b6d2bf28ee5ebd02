"""Randomized contract test: hypothesis draws Buffer set-ups and calls, every output is checked
bit for bit against ``moe_ep.reference`` (tests/contract.py runs and checks them).

A drawn case is a world size (2, 3, 4), a Buffer set-up (hidden: multiples of 128 for fp8, odd
and other sizes for bf16; experts per rank; topk among them 1 and experts per rank; dtype bf16,
float8_e4m3fn or float8_e4m3fnuz; mode "ll", "ht" or "auto", on one node or across nodes of
gpus_per_node with either inter-node transport; crossover and ht_parts) and 1-3 calls on it (token
counts per rank from 0 to the capacity, sometimes every rank at it; a routing among uniform,
every token on one rank, every token on every rank, duplicate ids within a token, every token
naming one expert, each optionally with -1 slots; per rank fresh, out= or zero-copy outputs;
int32 or int64 ids, pre-quantised fp8 input, an unaligned payload, values in bf16's subnormal
range). Expert-layout cases (``test_contract_fuzz_expert``) are on one node, with layouts
("expert",) or ("flat", "expert") and expert_slots from the most pairs any expert of the case
gets up to the default (or the default): their calls are flat-layout calls where the Buffer has
that layout, and expert-layout calls with or without receive hooks, a weighted or unweighted
combine, poisoned out= for the combine or not, alone or as two micro-batches in flight (A then B,
each drawn as above). Rank processes are expensive, so a case runs on the kept pool of its world
size (one per size, shared with the other tests) on a Buffer of its own (tens of milliseconds to
make), every rank regenerating the inputs from the case's seeds.

    pytest tests/test_fuzz.py                     # CI: a bounded, derandomized run (CPU ranks)
    pytest -m gpu tests/test_fuzz.py              # the same on GPUs, at GPU shapes
    pytest -m soak tests/test_fuzz.py             # many more examples, a fresh random seed each run
    MOE_EP_FUZZ_EXAMPLES=2000 pytest -m soak -k "soak and cpu" tests/test_fuzz.py

A failure prints the case (``Case(...)``) hypothesis shrank it to; ``tests/contract.py``'s
``run_case`` replays it on a pool of its world size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import gpus_for
from contract import VARIANTS, Call, Case, Setup, Variant, call_inputs, run_case
from ep_cases import FUZZ_ROUTINGS


@dataclass(frozen=True)
class Limits:
    """The shapes a device draws from."""

    worlds: tuple
    fp8_hidden_blocks: int  # fp8 hidden = 128 * [1, this]
    bf16_hidden: int  # bf16 hidden in [1, this]
    experts_per_rank: int
    topk: int
    tokens: int  # max_tokens_per_rank in [1, this]
    calls: int  # calls per Buffer in [1, this]


CPU_LIMITS = Limits(worlds=(2, 3, 4), fp8_hidden_blocks=3, bf16_hidden=300, experts_per_rank=5, topk=8, tokens=12,
                    calls=3)
GPU_LIMITS = Limits(worlds=(2, 3, 4), fp8_hidden_blocks=56, bf16_hidden=7168, experts_per_rank=64, topk=9, tokens=512,
                    calls=3)

# CI: a fixed sequence of examples (derandomize), no deadline (a call takes seconds on CPU ranks),
# no example database (nothing written into the tree). The soak profile draws afresh each run.
# CI_EXAMPLES flat-layout cases and CI_EXPERT_EXAMPLES expert-layout ones.
CI_EXAMPLES = int(os.environ.get("MOE_EP_FUZZ_CI_EXAMPLES", "12"))
CI_EXPERT_EXAMPLES = int(os.environ.get("MOE_EP_FUZZ_CI_EXPERT_EXAMPLES", "8"))
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.filter_too_much]
settings.register_profile("moe_ep-ci", max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("moe_ep-soak", max_examples=int(os.environ.get("MOE_EP_FUZZ_EXAMPLES", "500")),
                          deadline=None, database=None, suppress_health_check=_QUIET, print_blob=True)


@st.composite
def setups(draw, limits: Limits, expert: bool) -> Setup:
    """A Buffer set-up; ``expert``: one with the expert layout (on one node)."""
    world = draw(st.sampled_from(limits.worlds))
    dtype = draw(st.sampled_from(("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz")))
    if dtype != "bfloat16":
        hidden = 128 * draw(st.integers(1, limits.fp8_hidden_blocks))
    else:
        hidden = draw(st.one_of(st.integers(0, limits.bf16_hidden // 2 - 1).map(lambda h: 2 * h + 1),
                                st.integers(1, limits.bf16_hidden)))
    experts_per_rank = draw(st.integers(1, limits.experts_per_rank))
    num_experts = experts_per_rank * world
    topk = draw(st.one_of(st.just(1), st.just(experts_per_rank),
                          st.integers(1, min(num_experts, limits.topk))))
    max_tokens = draw(st.integers(1, limits.tokens))
    mode = draw(st.sampled_from(("ll", "ht", "auto")))
    per_node = [g for g in range(1, world) if world % g == 0]
    gpus_per_node = None if expert else draw(st.one_of(st.none(), st.sampled_from(per_node)))
    return Setup(world_size=world, hidden=hidden, experts_per_rank=experts_per_rank, topk=topk,
                 max_tokens_per_rank=max_tokens, dtype=dtype, mode=mode, gpus_per_node=gpus_per_node,
                 inter_transport=draw(st.sampled_from(("peer", "put"))) if gpus_per_node else "auto",
                 crossover_tokens=draw(st.integers(1, max_tokens)) if mode == "auto" else None,
                 ht_parts=draw(st.one_of(st.none(), st.integers(1, 7))),
                 layouts=draw(st.sampled_from((("expert",), ("flat", "expert")))) if expert else ("flat",))


@st.composite
def calls(draw, setup: Setup, partner: Variant | None = None) -> Call:
    """A call on ``setup``'s Buffer in one of its layouts; ``partner``: micro-batch B of the
    expert-layout call whose variant it is (same hooks, its own weighting)."""
    world, fp8 = setup.world_size, setup.dtype != "bfloat16"
    layout = "expert" if partner else draw(st.sampled_from(setup.layouts))
    if layout == "expert":
        variant = Variant("expert", partner.recv_hook, draw(st.booleans())) if partner else \
            draw(st.sampled_from([v for v in VARIANTS if v.layout == "expert"]))
        hint, most, outputs = None, setup.config().expert_tokens, ("fresh", "out")
    else:
        variant = Variant()
        hint = draw(st.integers(1, setup.max_tokens_per_rank)) if setup.mode == "auto" else None
        most, outputs = hint or setup.max_tokens_per_rank, ("fresh", "out", "zero_copy")
    count = st.one_of(st.just(0), st.just(most), st.integers(0, most))
    return Call(seed=draw(st.integers(0, 2**31 - 1)),
                tokens=draw(st.one_of(st.tuples(*[count] * world), st.just((most,) * world))),
                routing=draw(st.sampled_from(FUZZ_ROUTINGS)), target=draw(st.integers(0, world - 1)),
                masked=draw(st.booleans()), hint=hint,
                outputs=tuple(draw(st.sampled_from(outputs)) for _ in range(world)),
                ids_int32=draw(st.booleans()), prequantized=fp8 and draw(st.booleans()),
                unaligned=draw(st.booleans()), magnitude=draw(st.sampled_from((0, 0, 0, -133))),
                variant=variant)


def most_pairs(setup: Setup, drawn: list) -> int:
    """The most (token, expert) pairs any expert gets in one expert-layout call of ``drawn``."""
    most = 0
    for call in drawn:
        if call.variant.layout == "expert":
            _, ids, _ = call_inputs(setup, call)
            every = torch.cat([i.flatten() for i in ids])
            counts = torch.bincount(every[every >= 0], minlength=setup.experts_per_rank * setup.world_size)
            most = max(most, int(counts.max()))
    return most


@st.composite
def cases(draw, limits: Limits, expert: bool) -> Case:
    setup = draw(setups(limits, expert))
    drawn = []
    for _ in range(draw(st.integers(1, limits.calls))):
        drawn.append(draw(calls(setup)))
        if drawn[-1].variant.two_in_flight:
            drawn.append(draw(calls(setup, partner=drawn[-1].variant)))
    if expert:
        # Slots from what the calls need up to the default (duplicate ids can need more than the
        # default, expert_tokens x world: then at least what they need).
        need, default = max(most_pairs(setup, drawn), 1), setup.config().slots(setup.world_size)
        slots = st.integers(need, max(need, default))
        setup = dataclasses.replace(setup, expert_slots=draw(st.one_of(st.none(), slots) if need <= default
                                                                 else slots))
    return Case(setup, tuple(drawn))


def _limits(device: str) -> Limits:
    if device == "cpu":
        return CPU_LIMITS
    visible = tuple(w for w in GPU_LIMITS.worlds if gpus_for(w))
    if not visible:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    return Limits(visible, *(getattr(GPU_LIMITS, f) for f in ("fp8_hidden_blocks", "bf16_hidden", "experts_per_rank",
                                                                "topk", "tokens", "calls")))


def check_case(rank_pools, device: str, case: Case) -> None:
    """Run ``case`` on the kept pool of its world size; fail with every rank's failed checks."""
    pool = rank_pools(device, case.setup.world_size)
    results = pool.run(run_case, case, timeout=600)
    problems = [f"rank {rank}, call {c}: {error}" for rank, per_call in enumerate(results)
                for c, result in enumerate(per_call) for error in result.errors]
    assert not problems, f"{len(problems)} failed checks:\n" + "\n".join(problems[:10])
    for call, result in zip(case.calls, results[0]):
        variant = call.variant
        event(f"path {result.path}" + (f"{' hooks' * variant.recv_hook}{' weighted' * variant.weighted}"
                                       f"{' two in flight' * variant.two_in_flight}" if variant.layout == "expert"
                                       else ""))
    event(f"world {case.setup.world_size}, {case.setup.dtype}")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile("moe_ep-ci"))
@given(data=st.data())
def test_contract_fuzz(rank_pools, device, data):
    """A bounded, derandomized sample of flat-layout cases (MOE_EP_FUZZ_CI_EXAMPLES, default 12)."""
    check_case(rank_pools, device, data.draw(cases(_limits(device), expert=False), label="case"))


@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile("moe_ep-ci"), max_examples=CI_EXPERT_EXAMPLES)
@given(data=st.data())
def test_contract_fuzz_expert(rank_pools, device, data):
    """A bounded, derandomized sample of expert-layout cases (MOE_EP_FUZZ_CI_EXPERT_EXAMPLES,
    default 8)."""
    check_case(rank_pools, device, data.draw(cases(_limits(device), expert=True), label="case"))


@pytest.mark.soak
@pytest.mark.timeout(6 * 3600)
@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile("moe_ep-soak"))
@given(data=st.data())
def test_contract_fuzz_soak(pytestconfig, rank_pools, device, data):
    """MOE_EP_FUZZ_EXAMPLES cases (default 500), drawn afresh each run (hypothesis prints the seed
    of a failing run, and ``--hypothesis-seed`` replays it)."""
    if "soak" not in pytestconfig.getoption("markexpr"):  # "-m gpu" alone selects it too
        pytest.skip("the soak runs only when -m names it")
    expert = data.draw(st.booleans(), label="expert layout")
    check_case(rank_pools, device, data.draw(cases(_limits(device), expert), label="case"))
