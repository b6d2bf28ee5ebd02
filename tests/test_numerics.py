"""The kernels' rounding (fp8 quantisation, float32 -> bf16) matches torch bit for bit,
on the CPU interpreter and (-m gpu) on GPUs, including ties and subnormals."""

import torch
import triton
import triton.language as tl

from moe_ep.kernels.numerics import _quantize_fp8, _to_bf16
from rank_checks import assert_equal


def _probe_inputs():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(4, 256, generator=gen) * 10.0 ** torch.randint(-6, 4, (4, 1), generator=gen)]
    # bf16-valued rows, as dispatch sees them: x / scale often lands exactly on an fp8 tie.
    rows.append(torch.randn(64, 256, generator=gen).to(torch.bfloat16).float())
    # Groups with amax 448 (scale exactly 1): every fp8 midpoint, ties to even, and subnormals.
    codes = torch.arange(0, 126, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    special = torch.cat([mids, -mids, codes[:4] / 3, torch.tensor([448.0, -448.0, 0.0, -0.0, 2.0 ** -10])])
    special = torch.cat([special, torch.zeros(-special.numel() % 128)]).view(-1, 128)
    special[:, 0] = 448.0
    rows.append(torch.cat([special, special], dim=1)[:, :256])
    rows.append(torch.zeros(1, 256))  # amax 0: the floor scale
    return torch.cat(rows)


@triton.jit
def _probe_kernel(x_ptr, q_ptr, scales_ptr, bf16_ptr, HIDDEN: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, HIDDEN)
    x = tl.load(x_ptr + row * HIDDEN + offs)
    q, scales = _quantize_fp8(x, HIDDEN)
    tl.store(q_ptr + row * HIDDEN + offs, q)
    tl.store(scales_ptr + row * (HIDDEN // 128) + tl.arange(0, HIDDEN // 128), scales)
    tl.store(bf16_ptr + row * HIDDEN + offs, _to_bf16(x * 1.0009765625))


def _run_probe(ctx):
    from moe_ep import reference

    x = _probe_inputs()
    rows, hidden = x.shape
    q = torch.empty(rows, hidden, dtype=torch.float8_e4m3fn, device=ctx.device)
    scales = torch.empty(rows, hidden // 128, dtype=torch.float32, device=ctx.device)
    bf16 = torch.empty(rows, hidden, dtype=torch.bfloat16, device=ctx.device)
    _probe_kernel[(rows,)](x.to(ctx.device), q, scales, bf16, HIDDEN=hidden)
    ref_q, ref_scales = reference.quantize_fp8(x)
    assert_equal("scales", ref_scales, scales.cpu())
    assert_equal("fp8 codes", ref_q.view(torch.uint8), q.cpu().view(torch.uint8))
    assert_equal("bf16 codes", (x * 1.0009765625).to(torch.bfloat16).view(torch.int16), bf16.cpu().view(torch.int16))
    return rows


def test_rounding_matches_torch(ranks):
    assert ranks.run(_run_probe) == [_probe_inputs().shape[0]] * ranks.world_size
