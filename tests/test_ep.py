"""Dispatch and combine against moe_ep.reference, on real rank processes (CPU and -m gpu)."""

import pytest
import torch

from ep_cases import CPU_SHAPE, GPU_SHAPE, run_calls

CALLS = 5

CASES = [
    # id, routing, dispatch dtype, extra
    pytest.param("uniform", "bfloat16", {}, id="bf16-uniform"),
    pytest.param("uniform", "float8_e4m3fn", {}, id="fp8-uniform"),
    pytest.param("masked", "float8_e4m3fn", {}, id="fp8-masked-ids"),
    pytest.param("one_rank", "bfloat16", {}, id="bf16-experts-on-one-rank"),
    pytest.param("to_rank0", "float8_e4m3fn", {}, id="fp8-others-receive-nothing"),
    pytest.param("skewed", "bfloat16", {"hidden_cpu": 200, "hidden_gpu": 7000}, id="bf16-skewed-odd-hidden"),
    pytest.param("uniform", "bfloat16", {"topk": 1}, id="bf16-topk1"),
    pytest.param("masked", "float8_e4m3fn", {"prequantized": True}, id="fp8-prequantized"),
]


@pytest.mark.parametrize("kind, dtype, extra", CASES)
def test_dispatch_combine_match_reference(ranks, kind, dtype, extra):
    """Five dispatch + combine pairs on one Buffer, fresh inputs each call, a rank with no token
    and one with max_tokens_per_rank, outputs poisoned; every valid row checked bit-exact."""
    on_cpu = ranks.device == "cpu"
    shape = CPU_SHAPE if on_cpu else GPU_SHAPE
    hidden = extra.get("hidden_cpu" if on_cpu else "hidden_gpu")
    received = ranks.run(run_calls, kind, dtype, shape, CALLS, prequantized=extra.get("prequantized", False),
                         hidden=hidden, topk=extra.get("topk"))
    if kind == "to_rank0":
        assert received[0] > 0 and not any(received[1:]), received
    else:
        assert all(r > 0 for r in received), f"some rank received nothing: {received}"
