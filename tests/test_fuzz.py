"""Randomized contract test: hypothesis draws Buffer set-ups and calls, every output is checked
bit for bit against ``moe_ep.reference`` (tests/contract.py runs and checks them).

A drawn case is a world size (2, 3, 4), a Buffer set-up (hidden: multiples of 128 for fp8, odd
and other sizes for bf16; experts per rank; topk among them 1 and experts per rank; dtype; mode
"ll", "ht" or "auto", on one node or across nodes of gpus_per_node with either inter-node
transport; crossover and ht_parts) and 1-3 calls on it (token counts per rank from 0 to the
capacity, a routing among uniform, every token on one rank, every token on every rank, duplicate
ids within a token, each optionally with -1 slots; per rank fresh, out= or zero-copy outputs;
int32 or int64 ids, pre-quantised fp8 input, an unaligned payload, values in bf16's subnormal
range). Rank processes are expensive, so a case runs on the kept pool of its world size (one per
size, shared with the other tests) on a Buffer of its own (tens of milliseconds to make), every
rank regenerating the inputs from the case's seeds.

    pytest tests/test_fuzz.py                     # CI: a bounded, derandomized run (CPU ranks)
    pytest -m gpu tests/test_fuzz.py              # the same on GPUs, at GPU shapes
    pytest -m soak tests/test_fuzz.py             # many more examples, a fresh random seed each run
    MOE_EP_FUZZ_EXAMPLES=2000 pytest -m soak -k "soak and cpu" tests/test_fuzz.py

A failure prints the case (``Case(...)``) hypothesis shrank it to; ``tests/contract.py``'s
``run_case`` replays it on a pool of its world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import gpus_for
from contract import VARIANTS, Call, Case, Setup, run_case
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
CI_EXAMPLES = int(os.environ.get("MOE_EP_FUZZ_CI_EXAMPLES", "30"))
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.filter_too_much]
settings.register_profile("moe_ep-ci", max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("moe_ep-soak", max_examples=int(os.environ.get("MOE_EP_FUZZ_EXAMPLES", "500")),
                          deadline=None, database=None, suppress_health_check=_QUIET, print_blob=True)


@st.composite
def setups(draw, limits: Limits) -> Setup:
    world = draw(st.sampled_from(limits.worlds))
    dtype = draw(st.sampled_from(("bfloat16", "float8_e4m3fn")))
    if dtype == "float8_e4m3fn":
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
    gpus_per_node = draw(st.one_of(st.none(), st.sampled_from(per_node)))
    return Setup(world_size=world, hidden=hidden, experts_per_rank=experts_per_rank, topk=topk,
                 max_tokens_per_rank=max_tokens, dtype=dtype, mode=mode, gpus_per_node=gpus_per_node,
                 inter_transport=draw(st.sampled_from(("peer", "put"))) if gpus_per_node else "auto",
                 crossover_tokens=draw(st.integers(1, max_tokens)) if mode == "auto" else None,
                 ht_parts=draw(st.one_of(st.none(), st.integers(1, 7))))


@st.composite
def calls(draw, setup: Setup) -> Call:
    world, fp8 = setup.world_size, setup.dtype == "float8_e4m3fn"
    hint = draw(st.integers(1, setup.max_tokens_per_rank)) if setup.mode == "auto" else None
    most = hint or setup.max_tokens_per_rank
    count = st.one_of(st.just(0), st.just(most), st.integers(0, most))
    return Call(seed=draw(st.integers(0, 2**31 - 1)), tokens=tuple(draw(count) for _ in range(world)),
                routing=draw(st.sampled_from(FUZZ_ROUTINGS)), target=draw(st.integers(0, world - 1)),
                masked=draw(st.booleans()), hint=hint,
                outputs=tuple(draw(st.sampled_from(("fresh", "out", "zero_copy"))) for _ in range(world)),
                ids_int32=draw(st.booleans()), prequantized=fp8 and draw(st.booleans()),
                unaligned=draw(st.booleans()), magnitude=draw(st.sampled_from((0, 0, 0, -133))),
                variant=draw(st.sampled_from(VARIANTS)))


@st.composite
def cases(draw, limits: Limits) -> Case:
    setup = draw(setups(limits))
    return Case(setup, tuple(draw(st.lists(calls(setup), min_size=1, max_size=limits.calls))))


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
    for result in results[0]:
        event(f"path {result.path}")
    event(f"world {case.setup.world_size}, {case.setup.dtype}")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@settings(settings.get_profile("moe_ep-ci"))
@given(data=st.data())
def test_contract_fuzz(rank_pools, device, data):
    """A bounded, derandomized sample of cases (MOE_EP_FUZZ_CI_EXAMPLES, default 30)."""
    check_case(rank_pools, device, data.draw(cases(_limits(device)), label="case"))


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
    check_case(rank_pools, device, data.draw(cases(_limits(device)), label="case"))
