"""Dispatch and combine against moe_ep.reference, on real rank processes (CPU and -m gpu)."""

import pytest

from ep_cases import CPU_SHAPE, GPU_SHAPE, run_calls

CALLS = 5

CASES = [
    # routing, dispatch dtype, extra
    ("uniform", "bfloat16", {}, "bf16-uniform"),
    ("uniform", "float8_e4m3fn", {}, "fp8-uniform"),
    ("masked", "float8_e4m3fn", {}, "fp8-masked-ids"),
    ("one_rank", "bfloat16", {}, "bf16-experts-on-one-rank"),
    # MI300X's fp8 (float8_e4m3fnuz) here, quantised by the kernels on every path (LL, HT, and the
    # inter-node HT variant's stage kernel); already quantised on LL below.
    ("to_rank0", "float8_e4m3fnuz", {}, "fnuz-others-receive-nothing"),
    ("skewed", "bfloat16", {"hidden_cpu": 200, "hidden_gpu": 7000}, "bf16-skewed-odd-hidden"),
    ("uniform", "bfloat16", {"topk": 1}, "bf16-topk1"),
    ("masked", "float8_e4m3fn", {"prequantized": True}, "fp8-prequantized"),
    ("uniform", "float8_e4m3fnuz", {"prequantized": True}, "fnuz-prequantized"),
]
# Every case on the LL path (mode "ll"); the HT path (mode "ht") on the cases that differ for it
# (its staging quantises, or not, and lays the routing out); "auto" below.
HT_CASES = ("fp8-uniform", "fp8-masked-ids", "fnuz-others-receive-nothing", "bf16-skewed-odd-hidden",
            "fp8-prequantized")
PARAMS = [pytest.param("ll", *case[:3], id=f"ll-{case[3]}") for case in CASES] + \
         [pytest.param("ht", *case[:3], id=f"ht-{case[3]}") for case in CASES if case[3] in HT_CASES]


@pytest.mark.parametrize("mode, kind, dtype, extra", PARAMS)
def test_dispatch_combine_match_reference(ranks, mode, kind, dtype, extra):
    """Five dispatch + combine pairs on one Buffer, fresh inputs each call, a rank with no token
    and one with max_tokens_per_rank, outputs poisoned; every valid row checked bit-exact."""
    on_cpu = ranks.device == "cpu"
    shape = CPU_SHAPE if on_cpu else GPU_SHAPE
    hidden = extra.get("hidden_cpu" if on_cpu else "hidden_gpu")
    received = ranks.run(run_calls, kind, dtype, shape, CALLS, prequantized=extra.get("prequantized", False),
                         hidden=hidden, topk=extra.get("topk"), mode=mode)
    _check_received(kind, received, "")


def _check_received(kind, received, what):
    """Rows per rank as the routing ``kind`` implies: only rank 0 for "to_rank0", else every rank."""
    if kind == "to_rank0":
        assert received[0] > 0 and not any(received[1:]), f"{what}only rank 0 should receive: {received}"
    else:
        assert all(r > 0 for r in received), f"{what}some rank received nothing: {received}"


def test_auto_switches_between_paths(ranks):
    """mode "auto" on one Buffer: LL, HT, LL, HT, LL chosen from a shared token count, every call
    checked against the reference (the paths' epochs and regions do not disturb each other)."""
    on_cpu = ranks.device == "cpu"
    shape = CPU_SHAPE if on_cpu else GPU_SHAPE
    hints = [4, shape.max_tokens_per_rank, 4, shape.max_tokens_per_rank, 4]
    paths = ranks.run(run_calls, "uniform", "float8_e4m3fn", shape, len(hints), mode="auto", crossover_tokens=4,
                      hints=hints)
    assert all(p == ["ll", "ht", "ll", "ht", "ll"] for p in paths), paths


def test_ht_combine_token_ranges(ranks):
    """The HT combine sums each rank's tokens in ht_parts ranges while later ranges are
    sent (the suite runs the default, 4): here one range (sums after all sends) on 2 ranks, and
    more ranges than some ranks have tokens (empty ranges) on more; skewed routing, five checked
    calls."""
    parts = 1 if ranks.world_size == 2 else 7
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    received = ranks.run(run_calls, "skewed", "bfloat16", shape, 5, mode="ht", ht_parts=parts)
    assert sum(received) > 0, received


# Across nodes: the ranks as simulated nodes — two nodes (2 x 2 on four ranks, 2 x 1 on two) for
# every inter-node case, and one rank per node (4 x 1) for one — every token crossing "the
# network" once per node through its proxy. Each case names how tokens cross: "put" (staged in
# the own arena, put, completed, signalled: the structure real nodes need, its puts emulated
# through peer pointers here) or "peer" (stored straight into the proxy's arena); and the
# variant: mode "ll" (each send program routes and quantises) or "ht" (the stage kernel first).
INTER_CASES = {"bf16-uniform": ("peer", "ht"), "fp8-uniform": ("put", "ll"), "fp8-masked-ids": ("peer", "ll"),
               "bf16-experts-on-one-rank": ("put", "ll"), "fnuz-others-receive-nothing": ("put", "ht"),
               "bf16-skewed-odd-hidden": ("put", "ht"), "bf16-topk1": ("peer", "ll"),
               "fp8-prequantized": ("peer", "ht")}  # every case of the intra-node suite but fnuz-prequantized
PER_RANK_NODES_CASE = "fp8-masked-ids"  # its 4 x 1 layout takes the other transport: both see N > 2


@pytest.mark.parametrize("kind, dtype, extra, one_rank_per_node, transport, mode",
                         [pytest.param(*c[:3], c[3] == PER_RANK_NODES_CASE, *INTER_CASES[c[3]], id=f"{INTER_CASES[c[3]][1]}-{c[3]}")
                          for c in CASES if c[3] in INTER_CASES])
def test_internode_matches_reference(ranks, kind, dtype, extra, one_rank_per_node, transport, mode):
    """The inter-node path (proxy forwarding, per-node pre-summed combine) against the reference
    with its node-ordered combine: five calls, poisoned outputs, every valid row bit-exact."""
    on_cpu = ranks.device == "cpu"
    shape = CPU_SHAPE if on_cpu else GPU_SHAPE
    hidden = extra.get("hidden_cpu" if on_cpu else "hidden_gpu")
    other = {"put": "peer", "peer": "put"}[transport]
    layouts = [(2, transport)] + ([(ranks.world_size, other)] if one_rank_per_node and ranks.world_size > 2 else [])
    for nodes, how in layouts:
        received = ranks.run(run_calls, kind, dtype, shape, CALLS, prequantized=extra.get("prequantized", False),
                             hidden=hidden, topk=extra.get("topk"), mode=mode, nodes=nodes, inter_transport=how)
        _check_received(kind, received, f"{nodes} nodes ({how}): ")


def test_internode_auto_switches_between_variants(ranks):
    """mode "auto" across two nodes: the inter-node path's LL, HT, LL, HT, LL variants chosen
    from a shared token count on one Buffer, every call checked against the reference."""
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    hints = [4, shape.max_tokens_per_rank, 4, shape.max_tokens_per_rank, 4]
    paths = ranks.run(run_calls, "uniform", "float8_e4m3fn", shape, len(hints), mode="auto", crossover_tokens=4,
                      hints=hints, nodes=2, inter_transport="put")
    assert all(p == ["inter", "inter_ht", "inter", "inter_ht", "inter"] for p in paths), paths


@pytest.mark.gpu
@pytest.mark.timeout(600)  # fresh processes, NVSHMEM start-up, kernels linked with its device library
@pytest.mark.parametrize("world, nodes", [(4, 2), (4, 4), (2, 2)], ids=["gpu4-2x2", "gpu4-4x1", "gpu2-2x1"])
def test_internode_nvshmem_puts(world, nodes):
    """The inter-node legs as real NVSHMEM puts (the heap in torch's NVSHMEM symmetric memory,
    the kernels linked with its device library), ranks as simulated nodes: five calls each of the
    LL variant in fp8 and the HT variant in bf16 and fp8 against the reference. Fresh rank
    processes: NVSHMEM must be torch's symmetric-memory backend before a process's first
    allocation."""
    import torch

    from moe_ep.testing import RankPool

    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
    with RankPool(world, "cuda") as pool:
        why = pool.run(_shmem_missing)[0]
        assert why is None, f"NVSHMEM device calls unavailable on the GPU ranks: {why}"
        for dtype, mode in (("float8_e4m3fn", "ll"), ("bfloat16", "ht"), ("float8_e4m3fn", "ht")):
            received = pool.run(run_calls, "uniform", dtype, GPU_SHAPE, CALLS, mode=mode, nodes=nodes,
                                inter_transport="put", backend="nvshmem", timeout=300)
            _check_received("uniform", received, f"{dtype} {mode}: ")


def _shmem_missing(ctx):
    from moe_ep.transport import shmem

    return shmem.available()
