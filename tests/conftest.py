"""The multi-rank fixture: a test written once runs on CPU ranks in CI and on GPUs with -m gpu."""

import os

import pytest
import torch

from moe_ep.testing import RankPool

# CPU rank counts. Every multi-rank test runs on 2 CPU ranks in CI; those marked
# ``@pytest.mark.cpu_worlds(2, 3, 4)`` (a test, or one parameter set) also on those (each kernel family
# and path keeps cases at 3 and 4 ranks). MOE_EP_CPU_WORLDS="2,3,4" runs every test on each of those
# (``make test-full``; 8 works too, slowly: 8 processes on few cores). GPU rank counts: 2, 4 and 8
# where that many GPUs are visible.
CPU_WORLDS_ALL = os.environ.get("MOE_EP_CPU_WORLDS")
CPU_WORLD_SIZES = tuple(int(w) for w in (CPU_WORLDS_ALL or "2,3,4").split(","))
CI_CPU_WORLDS = (2,)
GPU_WORLD_SIZES = (2, 4, 8)
# MOE_EP_GPU_SHARED=1: the GPU cases on however many GPUs there are, every rank on GPU 0 (a gloo
# group, torch symmetric memory mapping one device into each rank): correctness on real GPU memory
# ordering where fewer GPUs than ranks are lent; timings mean nothing there. HT's default grids do
# not fit twice on one GPU, so its cases fail there (benchmarks/NOTES.md, session 11);
# test_single_rank.py checks HT on one GPU instead.
GPU_SHARED = os.environ.get("MOE_EP_GPU_SHARED") == "1"
_pools: dict[tuple[str, int], RankPool] = {}


def _rank_params(cpu_worlds=CPU_WORLD_SIZES):
    params = [pytest.param(("cpu", w), id=f"cpu{w}") for w in cpu_worlds]
    params += [pytest.param(("cuda", w), id=f"gpu{w}", marks=pytest.mark.gpu) for w in GPU_WORLD_SIZES]
    return params


@pytest.fixture(params=_rank_params())
def ranks(request) -> RankPool:
    """A pool of rank processes ('cpu' under the interpreter, or one GPU each), kept between
    tests and replaced after a failure. ``ranks.run(fn, *args)`` runs ``fn(ctx, *args)`` on all."""
    return _pool(request)


@pytest.fixture(scope="session")
def rank_pools():
    """``rank_pools(device, world_size)``: the kept pool (``rank_pool``), for tests that choose
    the world size themselves (the randomized ones draw it)."""
    return rank_pool


def _pool(request) -> RankPool:
    device, world_size = request.param
    if device == "cuda" and not gpus_for(world_size):
        pytest.skip(f"needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    return rank_pool(device, world_size)


def gpus_for(world_size: int) -> bool:
    """Whether GPU ranks of ``world_size`` can run here (one GPU each, or all on GPU 0 shared)."""
    return GPU_SHARED or torch.cuda.device_count() >= world_size


def rank_pool(device: str, world_size: int) -> RankPool:
    """The kept pool of ``world_size`` rank processes on ``device`` ('cpu' under the interpreter,
    or one GPU each, or GPU 0 shared), started on first use and replaced after a failure."""
    pool = _pools.get((device, world_size))
    if pool is None or pool.closed:
        pool = _pools[(device, world_size)] = RankPool(world_size, device, share_device=GPU_SHARED and device == "cuda")
    return pool


def pytest_collection_modifyitems(config, items):
    """Deselect CPU-rank cases outside their test's worlds (``cpu_worlds`` marker, else CI_CPU_WORLDS),
    unless MOE_EP_CPU_WORLDS asks for every test on its worlds."""
    if CPU_WORLDS_ALL:
        return
    keep, drop = [], []
    for item in items:
        param = getattr(getattr(item, "callspec", None), "params", {}).get("ranks")
        marker = item.get_closest_marker("cpu_worlds")
        worlds = marker.args if marker else CI_CPU_WORLDS
        chosen = any("ranks" in str(m.args[0]) for m in item.iter_markers("parametrize"))  # worlds of its own
        (drop if param and param[0] == "cpu" and param[1] not in worlds and not chosen else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_worlds(*sizes): CPU rank counts this test runs on in CI (default 2)")


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
