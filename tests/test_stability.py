"""Worst-case inputs on every path: full receive capacity, on CPU ranks and (-m gpu) on GPUs.

Paths: the LL and HT paths (HT with copied-out and zero-copy outputs) and, across two simulated
nodes (2 x 1 on two ranks, 2 x 2 on four), the inter-node path's LL and HT variants. Every call
is checked bit for bit against ``moe_ep.reference`` by tests/contract.py.
"""

import pytest

from contract import Call, Case, Setup, run_case
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


@pytest.mark.parametrize("path", list(PATHS))
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
