"""The kernels' conversions (fp8 quantisation in both formats, float32 -> bf16, bf16 -> float32)
match moe_ep.reference (torch, with its stated NaN rule) bit for bit, on the CPU interpreter and
(-m gpu) on GPUs, including ties, subnormals, NaN and infinities; dispatch and combine move and
sum bf16 subnormals exactly."""

import pytest
import torch
import triton
import triton.language as tl

from moe_ep import _platform
from moe_ep.kernels.numerics import _quantize_fp8, _to_bf16, fp8_format
from contract import Call, Case, Setup, run_case
from ep_cases import CPU_SHAPE, GPU_SHAPE
from rank_checks import assert_equal

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _probe_inputs(dtype):
    from moe_ep import reference

    fp8_max = reference.FP8_MAX[dtype]
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(4, 256, generator=gen) * 10.0 ** torch.randint(-6, 4, (4, 1), generator=gen)]
    # bf16-valued rows, as dispatch sees them: x / scale often lands exactly on an fp8 tie.
    rows.append(torch.randn(64, 256, generator=gen).to(torch.bfloat16).float())
    # Groups with amax fp8_max (scale exactly 1): every fp8 midpoint, ties to even, subnormals, and
    # negative values that round to zero (-0 in float8_e4m3fn, +0 in float8_e4m3fnuz).
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(dtype).float()
    codes = codes[codes <= fp8_max]
    mids = (codes[:-1] + codes[1:]) / 2
    special = torch.cat([mids, -mids, codes[:4] / 3, -codes[:4] / 3,
                         torch.tensor([fp8_max, -fp8_max, 0.0, -0.0, codes[1] / 4, -codes[1] / 2])])
    special = torch.cat([special, torch.zeros(-special.numel() % 128)]).view(-1, 128)
    special[:, 0] = fp8_max
    rows.append(torch.cat([special, special], dim=1)[:, :256])
    rows.append(torch.zeros(1, 256))  # amax 0: the floor scale
    rows.append(-torch.rand(1, 256, generator=gen) * 1e-9)  # tiny negatives: the floor scale, codes of -0 / 0
    rows.append(_non_finite_rows(gen))
    return torch.cat(rows)


def _non_finite_rows(gen):
    """Rows with NaN (either sign, other payloads: 0x7FFFFFFF is NVIDIA's canonical NaN,
    0x7F800001 a signalling one) and infinities sprinkled into some 128-value groups."""
    rows = torch.randn(4, 256, generator=gen) * 3
    nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7FFFFFFF, 0x7F800001, 0xFFFFFFFF - 2**32],
                        dtype=torch.int32).view(torch.float32)
    rows[0, 5], rows[0, 130], rows[0, 131] = nans[0], float("inf"), float("-inf")  # NaN group, inf group
    rows[1, 0], rows[1, 255] = float("-inf"), nans[1]
    rows[2, 17:22] = nans
    rows[3, 64], rows[3, 200] = float("inf"), float("inf")
    return rows


@triton.jit
def _probe_kernel(x_ptr, q_ptr, scales_ptr, bf16_ptr, HIDDEN: tl.constexpr, FP8_FORMAT: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, HIDDEN)
    x = tl.load(x_ptr + row * HIDDEN + offs)
    q, scales = _quantize_fp8(x, HIDDEN, FP8_FORMAT, q_ptr.dtype.element_ty)
    tl.store(q_ptr + row * HIDDEN + offs, q)
    tl.store(scales_ptr + row * (HIDDEN // 128) + tl.arange(0, HIDDEN // 128), scales)
    tl.store(bf16_ptr + row * HIDDEN + offs, _to_bf16(x * 1.0009765625))


def _run_probe(ctx, dtype_name):
    from moe_ep import reference

    dtype = getattr(torch, dtype_name)
    x = _probe_inputs(dtype)
    rows, hidden = x.shape
    q = torch.empty(rows, hidden, dtype=dtype, device=ctx.device)
    scales = torch.empty(rows, hidden // 128, dtype=torch.float32, device=ctx.device)
    bf16 = torch.empty(rows, hidden, dtype=torch.bfloat16, device=ctx.device)
    _probe_kernel[(rows,)](x.to(ctx.device), _platform.kernel_arg(q), scales, bf16, HIDDEN=hidden,
                           FP8_FORMAT=fp8_format(dtype))
    ref_q, ref_scales = reference.quantize_fp8(x, dtype)
    assert_equal("scales", ref_scales, scales.cpu())
    assert_equal("fp8 codes", ref_q.view(torch.uint8), q.cpu().view(torch.uint8))
    assert_equal("bf16 codes", reference.to_bf16(x * 1.0009765625).view(torch.int16), bf16.cpu().view(torch.int16))
    if dtype == torch.float8_e4m3fnuz:
        finite_groups = x.view(rows, -1, 128).isfinite().all(dim=-1, keepdim=True).expand(-1, -1, 128).reshape(rows, -1)
        emitted = q.cpu().view(torch.uint8)[finite_groups]
        assert not bool((emitted == 0x80).any()), "0x80 (NaN in fnuz) emitted for a finite value"
    return rows


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_rounding_matches_torch(ranks, dtype):
    assert ranks.run(_run_probe, str(dtype).split(".")[-1]) == [_probe_inputs(dtype).shape[0]] * ranks.world_size


def _exact_rne(value: float, dtype) -> int:
    """The code of the finite ``dtype`` value nearest to ``value``, ties to the even code, found by
    search in float64 (no conversion involved); float8_e4m3fnuz has no negative zero."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)
    values = codes.view(dtype).double().tolist()
    best = min(range(len(values)), key=lambda c: (abs(abs(value) - values[c]), c % 2))
    negative = value < 0 or (value == 0 and str(value).startswith("-"))
    if negative and (dtype == torch.float8_e4m3fn or best != 0):
        best |= 0x80
    return best


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_torch_fp8_conversion_is_the_reference_rule(dtype):
    """moe_ep.reference quantises with torch's own conversion: check it is what the reference
    states, for every code, every midpoint between codes (ties to even), just off the midpoints,
    and zeros of both signs (float8_e4m3fnuz: -0 and what rounds to it give 0x00, never 0x80)."""
    from moe_ep import reference

    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(dtype).double()
    codes = codes[codes <= reference.FP8_MAX[dtype]]
    mids = (codes[:-1] + codes[1:]) / 2
    values = torch.cat([codes, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), codes[1:2] / 4])
    values = torch.cat([values, -values, torch.tensor([0.0, -0.0], dtype=torch.float64)]).float()
    got = values.to(dtype).view(torch.uint8)
    expected = torch.tensor([_exact_rne(v, dtype) for v in values.tolist()], dtype=torch.uint8)
    assert_equal(f"torch's {dtype} conversion", expected, got)


@triton.jit
def _widen_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))


def _widen_every_bf16(ctx):
    """Every finite bf16 value (subnormals, zeros of both signs, normals) -> float32 in a kernel."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = every[every.float().isfinite()]
    x = torch.cat([x, torch.zeros(-x.numel() % 1024, dtype=torch.bfloat16)])
    out = torch.empty(x.numel(), dtype=torch.float32, device=ctx.device)
    _widen_kernel[(x.numel() // 1024,)](x.to(ctx.device), out, BLOCK=1024)
    assert_equal("bf16 -> float32", x.float(), out.cpu())
    return x.numel()


def test_bf16_to_float32_is_exact(ranks):
    """Triton 3.6's interpreter gets all 254 non-zero bf16 subnormals wrong in this conversion
    (moe_ep._platform patches it); GPUs shift the bits."""
    assert all(ranks.run(_widen_every_bf16))


@pytest.mark.parametrize("ranks", [pytest.param(("cpu", 4), id="cpu4")] +
                         [pytest.param(("cuda", w), id=f"gpu{w}", marks=pytest.mark.gpu) for w in (2, 4)],
                         indirect=True)
def test_subnormal_rows_move_and_sum_exactly(ranks):
    """Tokens whose values all lie in bf16's subnormal range (expert outputs and their sums partly
    there too): bf16 and fp8 dispatch, on one node (LL then HT) and across two (the inter-node
    path's LL then HT variant; on four ranks proxies pre-sum two partials), every output bit for
    bit against the reference."""
    shape = CPU_SHAPE if ranks.device == "cpu" else GPU_SHAPE
    world, most = ranks.world_size, shape.max_tokens_per_rank
    problems = []
    for dtype, gpus_per_node in (("bfloat16", None), ("float8_e4m3fn", world // 2)):
        setup = Setup(world_size=world, hidden=shape.hidden, experts_per_rank=shape.num_experts_per_rank,
                      topk=shape.topk, max_tokens_per_rank=most, dtype=dtype, mode="auto", gpus_per_node=gpus_per_node,
                      crossover_tokens=most // 2)
        calls = tuple(Call(seed=301 + i, tokens=tuple(hint - r % 2 for r in range(world)), hint=hint, magnitude=-133)
                      for i, hint in enumerate((most // 2, most)))
        results = ranks.run(run_case, Case(setup, calls))
        paths = [result.path for result in results[0]]
        assert paths == ([setup.path(c.hint) for c in calls]) and len(set(paths)) == 2, paths
        problems += [f"{dtype}, rank {rank}, call {c}: {error}" for rank, per_call in enumerate(results)
                     for c, result in enumerate(per_call) for error in result.errors]
    assert not problems, f"{len(problems)} failed checks:\n" + "\n".join(problems[:10])
