"""moe_ep's vLLM adapter against vLLM 0.33's own classes, on 2 CPU ranks (``make test-integrations``;
the marker keeps it out of the default run). The cases live in vllm_cases.py, imported inside the
tests: collecting this file needs no vLLM."""

import pytest

pytestmark = pytest.mark.integrations
WORLD = 2


@pytest.mark.parametrize("fmt, dtype, hooks, padded, round_robin", [
    pytest.param("standard", "bfloat16", True, False, False, id="standard-bf16-hooks-factory"),
    pytest.param("standard", "float8_e4m3fn", False, False, False, id="standard-fp8-sync"),
    pytest.param("standard", "float8_e4m3fn", True, True, False, id="standard-fp8-hooks-padded"),
    pytest.param("batched", "bfloat16", False, False, False, id="batched-bf16-sync"),
    pytest.param("batched", "float8_e4m3fn", True, False, False, id="batched-fp8-hooks-factory"),
    pytest.param("batched", "bfloat16", True, False, True, id="batched-bf16-hooks-round-robin"),
])
def test_prepare_finalize_match_reference(rank_pools, fmt, dtype, hooks, padded, round_robin):
    """prepare (or prepare_async, its hook and receiver) and finalize: every row, scale, id, weight,
    count and combined value bit-exact against moe_ep.reference; the Standard format takes moe_ep's
    LL and HT paths as the shared token count says."""
    import vllm_cases

    paths = rank_pools("cpu", WORLD).run(vllm_cases.run_prepare_finalize, fmt, dtype, hooks, padded, 4,
                                         round_robin, timeout=900)
    assert all(p == paths[0] for p in paths), paths  # every rank took the same path each call
    assert set(paths[0]) == ({"ll", "ht"} if fmt == "standard" else {"expert"}), paths[0]


@pytest.mark.parametrize("fmt, dtype, hooks, padded, reduce", [
    pytest.param("standard", "bfloat16", False, False, True, id="standard-bf16-sync"),
    pytest.param("standard", "float8_e4m3fn", True, False, False, id="standard-fp8-hooks-delegate"),
    pytest.param("standard", "bfloat16", True, True, True, id="standard-bf16-hooks-padded"),
    pytest.param("batched", "bfloat16", False, False, True, id="batched-bf16-sync"),
    pytest.param("batched", "float8_e4m3fn", True, False, True, id="batched-fp8-hooks"),
])
def test_modular_kernel_matches_dense_moe(rank_pools, fmt, dtype, hooks, padded, reduce):
    """vLLM's FusedMoEKernel with moe_ep's prepare/finalize and SwiGLU experts (vLLM experts
    subclasses in torch) against the dense single-process MoE."""
    import vllm_cases

    stats = rank_pools("cpu", WORLD).run(vllm_cases.run_modular_kernel, fmt, dtype, hooks, padded, reduce, 3,
                                         timeout=900)
    assert all(len(s) == 3 for s in stats), stats
    print(stats)


def test_plugin_entry_point_installs_moe_ep():
    """vLLM's plugin loader finds moe_ep's entry point (installed into the lane's venv) and, with
    MOE_EP_VLLM=1, routes the DeepEP backends to moe_ep; without it nothing changes."""
    import vllm_cases

    print(vllm_cases.check_registration())
