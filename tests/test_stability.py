"""Worst-case inputs and repeatability on every path, on CPU ranks and (-m gpu) on GPUs: full
receive capacity; the same inputs twice, and on a second Buffer, give the same bytes.

Paths: the LL and HT paths (HT with copied-out and zero-copy outputs) and, across two simulated
nodes (2 x 2 on four CPU ranks; 2 x 1, 2 x 2, 2 x 4 on GPUs), the inter-node path's LL and HT
variants. Every call is checked bit for bit against ``moe_ep.reference`` by tests/contract.py.
"""

import pytest

import moe_ep
from contract import Call, Case, Setup, run_call, run_case
from ep_cases import GPU_SHAPE, Shape

# Full-capacity calls move max_tokens_per_rank x world rows into every rank: a smaller shape than
# the other CPU tests' keeps them quick on CPU ranks.
CPU_SHAPE = Shape(hidden=128, num_experts_per_rank=2, topk=2, max_tokens_per_rank=6)

# path id -> (EpConfig mode, across two nodes, zero-copy outputs, dispatch dtype)
PATHS = {
    "ll": ("ll", False, False, "float8_e4m3fn"),
    "ht": ("ht", False, False, "bfloat16"),
    "ht-zero-copy": ("ht", False, True, "float8_e4m3fn"),
    "inter-ll": ("ll", True, False, "bfloat16"),
    "inter-ht": ("ht", True, False, "float8_e4m3fn"),
}


def _path_params():
    """Every path on GPUs (2, 4, 8 ranks where visible); on CPU ranks (CI) the one-node paths on
    two ranks and the inter-node ones on four (2 x 2: proxies forward and pre-sum)."""
    params = [pytest.param(("cpu", 4 if PATHS[p][1] else 2), p, id=f"cpu{4 if PATHS[p][1] else 2}-{p}")
              for p in PATHS]
    return params + [pytest.param(("cuda", w), p, id=f"gpu{w}-{p}", marks=pytest.mark.gpu)
                     for w in (2, 4, 8) for p in PATHS]


def _setup(ranks, path: str) -> Setup:
    """The path's Buffer at the test shape, with topk = world size (so a token can reach every rank)."""
    mode, across_nodes, _, dtype = PATHS[path]
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    world = ranks.world_size
    return Setup(world_size=world, hidden=shape.hidden, experts_per_rank=shape.num_experts_per_rank,
                 topk=max(world, shape.topk), max_tokens_per_rank=shape.max_tokens_per_rank, dtype=dtype, mode=mode,
                 gpus_per_node=world // 2 if across_nodes else None)


def _outputs(ranks, path: str) -> tuple:
    """Zero-copy outputs on the zero-copy path, else poisoned outputs passed as out= (every row
    of a full output must be written)."""
    return (("zero_copy" if PATHS[path][2] else "out"),) * ranks.world_size


def _problems(results) -> list:
    return [f"rank {rank}, call {c}: {error}" for rank, per_call in enumerate(results)
            for c, result in enumerate(per_call) for error in result.errors]


@pytest.mark.parametrize("ranks, path", _path_params(), indirect=["ranks"])
def test_full_capacity(ranks, path):
    """Every rank sends max_tokens_per_rank tokens, first all to the last rank (it receives the
    full capacity, max_tokens_per_rank x world rows, the others none), then each token to every
    rank (every rank receives the full capacity)."""
    setup = _setup(ranks, path)
    world, full = setup.world_size, setup.max_tokens_per_rank
    outputs = _outputs(ranks, path)
    case = Case(setup, (Call(seed=101, tokens=(full,) * world, routing="one_rank", target=world - 1, outputs=outputs),
                        Call(seed=102, tokens=(full,) * world, routing="every_rank", outputs=outputs)))
    results = ranks.run(run_case, case)
    problems = _problems(results)
    assert not problems, f"{len(problems)} failed checks:\n" + "\n".join(problems[:10])
    capacity = full * world
    to_one = [per_call[0].received for per_call in results]
    to_all = [per_call[1].received for per_call in results]
    assert to_one == [0] * (world - 1) + [capacity], f"all to rank {world - 1}: rows received {to_one}"
    assert to_all == [capacity] * world, f"each token to every rank: rows received {to_all}"


def _same_bytes_again(ctx, setup: Setup, call_a: Call, call_b: Call) -> list:
    """A, B, A on one Buffer, then A on a second one (made while the first is open), each checked
    against the reference; returns every failed check and every output of a repeated A whose
    bytes differ from the first A's."""
    first, second = moe_ep.Buffer(ctx.group, setup.config()), None
    try:
        runs = [run_call(ctx, first, setup, call, keep_outputs=True) for call in (call_a, call_b, call_a)]
        second = moe_ep.Buffer(ctx.group, setup.config())
        runs.append(run_call(ctx, second, setup, call_a, keep_outputs=True))
        first.check()
        second.check()
    finally:
        first.close()
        if second is not None:
            second.close()
    problems = [f"run {i}: {error}" for i, run in enumerate(runs) for error in run.errors]
    for name, original in runs[0].outputs.items():
        for where, run in (("the same Buffer", runs[2]), ("a second Buffer", runs[3])):
            again = run.outputs[name]
            if not (original.shape == again.shape and bool((original == again).all())):
                problems.append(f"{name}: other bytes on {where}")
    return problems


@pytest.mark.parametrize("ranks, path", _path_params(), indirect=["ranks"])
def test_same_inputs_same_bytes(ranks, path):
    """The same inputs (token counts from 0 to max_tokens_per_rank, -1 slots) give identical bytes
    in every output (each dispatch output's valid rows, num_tokens, tokens_per_expert, the
    handle's send_mask, part_rows and forwarded counts, the combine's result): twice on one
    Buffer, with another call between, and once on a second Buffer."""
    setup = _setup(ranks, path)
    world, full = setup.world_size, setup.max_tokens_per_rank
    outputs = _outputs(ranks, path)
    tokens = tuple((0, full, full // 2 + 1)[r % 3] for r in range(world))
    call_a = Call(seed=201, tokens=tokens, routing="uniform", masked=True, outputs=outputs)
    call_b = Call(seed=202, tokens=tokens[1:] + tokens[:1], routing="duplicates", outputs=outputs)
    problems = ranks.run(_same_bytes_again, setup, call_a, call_b)
    flat = [f"rank {rank}: {p}" for rank, per_rank in enumerate(problems) for p in per_rank]
    assert not flat, f"{len(flat)} problems:\n" + "\n".join(flat[:10])
