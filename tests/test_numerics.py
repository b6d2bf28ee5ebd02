"""The kernels' conversions (fp8 quantisation, float32 -> bf16, bf16 -> float32) match torch bit
for bit, on the CPU interpreter and (-m gpu) on GPUs, including ties and subnormals; dispatch and
combine move and sum bf16 subnormals exactly."""

import pytest
import torch
import triton
import triton.language as tl

import moe_ep  # noqa: F401 (chooses the interpreter on a CPU-only machine)
from moe_ep.kernels.numerics import _quantize_fp8, _to_bf16
from contract import Call, Case, Setup, run_case
from ep_cases import CPU_SHAPE, GPU_SHAPE
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
