"""The main job: a dispatch + combine across ranks, checked against the reference.

    python -m moe_ep.demo            # all local GPUs when present, otherwise 4 CPU ranks
    python -m moe_ep.demo --ranks 2 --tokens 64 --dtype bf16

On GPUs it runs the DeepSeek-V3 shape (hidden 7168, 256 experts, top-8); on CPU ranks (Triton's
interpreter over shared memory) a small one. Each rank draws every rank's tokens from one seed,
so it can check its own outputs against ``moe_ep.reference`` alone.
"""

from __future__ import annotations

import argparse
import time

import torch


def _rank_main(ctx, hidden, num_experts, topk, tokens, dtype_name, calls):
    import moe_ep
    from moe_ep import reference

    dtype = moe_ep.native_fp8_dtype(ctx.device) if dtype_name == "fp8" else getattr(torch, dtype_name)
    world = ctx.world_size
    cfg = moe_ep.EpConfig(hidden=hidden, num_experts=num_experts, topk=topk, max_tokens_per_rank=tokens,
                          dispatch_dtype=dtype)
    buf = moe_ep.Buffer(ctx.group, cfg)
    report = {"rank": ctx.rank, "heap_mb": buf.heap_bytes / 1e6, "backend": buf.heap.backend, "calls": []}
    for call in range(calls):
        gen = torch.Generator().manual_seed(call)
        xs = [torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16) for _ in range(world)]
        ids = [torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(tokens)])
               for _ in range(world)]
        weights = [torch.rand(tokens, topk, generator=gen) for _ in range(world)]
        expected = reference.dispatch(xs, ids, weights, num_experts, dtype)
        start = time.perf_counter()
        out = buf.dispatch(xs[ctx.rank].to(ctx.device), ids[ctx.rank].to(ctx.device), weights[ctx.rank].to(ctx.device))
        n = int(out.num_tokens.item())
        dispatch_s = time.perf_counter() - start
        mine = expected[ctx.rank]
        dispatch_ok = (n == mine.num_tokens and torch.equal(out.x[:n].cpu().view(torch.uint8), mine.x.view(torch.uint8))
                       and torch.equal(out.src[:n].cpu(), mine.src) and torch.equal(out.topk_ids[:n].cpu(), mine.topk_ids))
        # Stand-in experts: scale each received row by its weights' sum.
        ys = []
        for d in expected:
            x = d.x.float() if d.x_scales is None else reference.dequantize_fp8(d.x, d.x_scales)
            ys.append((x * d.topk_weights.sum(1, keepdim=True)).to(torch.bfloat16))
        y = torch.zeros(buf.capacity, hidden, dtype=torch.bfloat16)
        y[:n] = ys[ctx.rank]
        start = time.perf_counter()
        z = buf.combine(y.to(ctx.device), out.handle).cpu()
        combine_s = time.perf_counter() - start
        combine_ok = torch.equal(z, reference.combine(ys, expected, [tokens] * world)[ctx.rank])
        report["calls"].append({"received": n, "dispatch_ok": dispatch_ok, "combine_ok": combine_ok,
                                "dispatch_ms": dispatch_s * 1e3, "combine_ms": combine_s * 1e3})
    buf.check()
    buf.close()
    return report


def main(argv=None) -> int:
    from moe_ep import _platform
    from moe_ep.testing import run_ranks

    gpus = torch.cuda.device_count() if _platform.gpu_available() else 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=gpus if gpus >= 2 else 4)
    parser.add_argument("--tokens", type=int, default=128 if gpus >= 2 else 8)
    parser.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cuda" if gpus >= 2 else "cpu"
    if device == "cuda":
        hidden, experts_per_rank, topk = 7168, 256 // args.ranks, 8
        where = f"{args.ranks} x {torch.cuda.get_device_name(0)}"
    else:
        hidden, experts_per_rank, topk = 256, 4, 3
        where = f"{args.ranks} CPU processes (Triton interpreter, shared-memory heap)"
    dtype_name = "fp8" if args.dtype == "fp8" else "bfloat16"  # fp8: the GPU's own (moe_ep.native_fp8_dtype)
    print(f"moe_ep demo: {where}; hidden {hidden}, {experts_per_rank * args.ranks} experts, top-{topk}, "
          f"{args.dtype} dispatch, {args.tokens} tokens per rank, {args.calls} calls")
    reports = run_ranks(_rank_main, args.ranks, hidden, experts_per_rank * args.ranks, topk, args.tokens,
                        dtype_name, args.calls, device=device, timeout=900)
    all_ok = True
    for rep in reports:
        oks = [c["dispatch_ok"] and c["combine_ok"] for c in rep["calls"]]
        all_ok &= all(oks)
        last = rep["calls"][-1]
        print(f"  rank {rep['rank']}: heap {rep['heap_mb']:.2f} MB ({rep['backend']}), received "
              f"{[c['received'] for c in rep['calls']]} rows, dispatch+combine == reference: "
              f"{'yes' if all(oks) else 'NO'} (last call, wall clock incl. host checks: dispatch "
              f"{last['dispatch_ms']:.1f} ms, combine {last['combine_ms']:.1f} ms)")
    print("result:", "all ranks match the reference bit for bit" if all_ok else "MISMATCH")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
