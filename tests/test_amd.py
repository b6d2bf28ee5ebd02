"""AMD specifics that need no AMD GPU: the fp8 format of each target (see also test_numerics.py
and the fnuz cases of test_ep.py)."""

import pytest
import torch

import moe_ep
from moe_ep import _platform


@pytest.mark.parametrize("arch, dtype", [("gfx942:sramecc+:xnack-", torch.float8_e4m3fnuz), ("gfx942", torch.float8_e4m3fnuz),
                                         ("gfx940", torch.float8_e4m3fnuz), ("gfx950", torch.float8_e4m3fn),
                                         ("gfx950:sramecc+:xnack-", torch.float8_e4m3fn), ("90", torch.float8_e4m3fn)])
def test_fp8_dtype_of_each_target(arch, dtype):
    assert _platform.fp8_dtype_for_arch(arch) == dtype


def test_native_fp8_on_the_cpu_is_ocp():
    assert moe_ep.native_fp8_dtype() == torch.float8_e4m3fn
    assert moe_ep.native_fp8_dtype("cpu") == torch.float8_e4m3fn


def test_fnuz_travels_as_bytes_where_triton_lacks_the_type():
    """Under the interpreter (and on NVIDIA) a float8_e4m3fnuz tensor reaches kernels as a uint8
    view of the same memory; other tensors as they are."""
    q = torch.zeros(2, 128, dtype=torch.float8_e4m3fnuz)
    arg = _platform.kernel_arg(q)
    assert arg.dtype == torch.uint8 and arg.data_ptr() == q.data_ptr() and arg.shape == q.shape
    for t in (torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(3, dtype=torch.bfloat16)):
        assert _platform.kernel_arg(t) is t


def test_config_takes_both_fp8_formats():
    for dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        cfg = moe_ep.EpConfig(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=4, dispatch_dtype=dtype)
        assert cfg.fp8 and cfg.num_scales == 2
    with pytest.raises(ValueError, match="dispatch_dtype"):
        moe_ep.EpConfig(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=4, dispatch_dtype=torch.float8_e5m2)
