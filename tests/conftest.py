"""The multi-rank fixture: a test written once runs on CPU ranks in CI and on GPUs with -m gpu."""

import os

import pytest
import torch

from moe_ep.testing import RankPool

# CPU rank counts: 2 and 4 in CI; MOE_EP_CPU_WORLDS=8 (or "2,4,8") runs 8 CPU ranks, slowly
# (8 processes on few cores). GPU rank counts: 2, 4 and 8 where that many GPUs are visible.
CPU_WORLD_SIZES = tuple(int(w) for w in os.environ.get("MOE_EP_CPU_WORLDS", "2,4").split(","))
GPU_WORLD_SIZES = (2, 4, 8)
_pools: dict[tuple[str, int], RankPool] = {}


def _rank_params():
    params = [pytest.param(("cpu", w), id=f"cpu{w}") for w in CPU_WORLD_SIZES]
    params += [pytest.param(("cuda", w), id=f"gpu{w}", marks=pytest.mark.gpu) for w in GPU_WORLD_SIZES]
    return params


def rank_pool(device: str, world_size: int) -> RankPool:
    """The kept pool of ``world_size`` rank processes on ``device`` ('cpu' under the interpreter,
    or one GPU each), started on first use and replaced after a failure."""
    pool = _pools.get((device, world_size))
    if pool is None or pool.closed:
        pool = _pools[(device, world_size)] = RankPool(world_size, device)
    return pool


@pytest.fixture(scope="session")
def rank_pools():
    """``rank_pools(device, world_size)``: the kept pool (``rank_pool``), for tests that choose
    the world size themselves (the randomized ones draw it)."""
    return rank_pool


@pytest.fixture(params=_rank_params())
def ranks(request) -> RankPool:
    """A kept pool of rank processes ('cpu' under the interpreter, or one GPU each), replaced after
    a failure. ``ranks.run(fn, *args)`` runs ``fn(ctx, *args)`` on all."""
    device, world_size = request.param
    if device == "cuda" and torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    return rank_pool(device, world_size)


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
