"""moe_ep's SGLang adapter against SGLang 0.5.23's own classes, on 2 CPU ranks (``make
test-integrations``; the marker keeps it out of the default run). The cases live in
sglang_cases.py, imported inside the tests: collecting this file needs no SGLang."""

import pytest

pytestmark = pytest.mark.integrations
WORLD = 2


@pytest.mark.parametrize("mode, dtype, split", [
    pytest.param("normal", "bfloat16", False, id="normal-bf16"),
    pytest.param("normal", "float8_e4m3fn", True, id="normal-fp8-split"),
    pytest.param("low_latency", "bfloat16", True, id="low_latency-bf16-split"),
    pytest.param("low_latency", "float8_e4m3fn", False, id="low_latency-fp8"),
    pytest.param("auto", "float8_e4m3fn", True, id="auto-fp8-split"),
])
def test_dispatcher_matches_reference(rank_pools, mode, dtype, split):
    """dispatch / combine (or their _a/_b halves): SGLang's DEEPEP_NORMAL and DEEPEP_LL dataclasses
    and the combined rows bit-exact against moe_ep.reference; the normal mode takes moe_ep's LL and
    HT paths as the shared token count says."""
    import sglang_cases

    paths = rank_pools("cpu", WORLD).run(sglang_cases.run_dispatcher, mode, dtype, split, 4, timeout=900)
    assert all(p == paths[0] for p in paths), paths
    expected = {"normal": {"ll", "ht"}, "low_latency": {"expert"}, "auto": {"ll", "ht", "expert"}}[mode]
    assert set(paths[0]) == expected, paths[0]


def test_plugin_and_two_batch_overlap(rank_pools):
    """SGLang's plugin loader installs moe_ep (MOE_EP_SGLANG=1); SGLang's two-batch-overlap
    dispatcher then runs two interleaved micro-batches on moe_ep, extend and decode in turn."""
    import sglang_cases

    dtypes = rank_pools("cpu", WORLD).run(sglang_cases.run_registered_tbo, 4, timeout=900)
    assert dtypes[0] == {"normal": "bfloat16", "low_latency": "float8_e4m3fn"}, dtypes


@pytest.mark.parametrize("mode, dtype", [
    pytest.param("normal", "float8_e4m3fn", id="normal-fp8"),
    pytest.param("low_latency", "bfloat16", id="low_latency-bf16"),
])
def test_moe_layer_matches_dense_moe(rank_pools, mode, dtype):
    """Router, dispatcher, SwiGLU experts on SGLang's output dataclasses, combine: against the
    dense single-process MoE."""
    import sglang_cases

    stats = rank_pools("cpu", WORLD).run(sglang_cases.run_moe, mode, dtype, 3, timeout=900)
    assert all(len(s) == 3 for s in stats), stats
    print(stats)
