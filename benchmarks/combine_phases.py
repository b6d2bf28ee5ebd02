"""Where a combine's time goes: the whole combine against its send phase alone, beside a plain
peer copy of the same bytes, on the GPUs at hand (a diagnostic, not a benchmark of record).

The send phase alone is the same kernel on a handle that claims 0 tokens: every received row
is still sent back and every rank still signals and waits, but no sum is computed.

    python benchmarks/combine_phases.py --world 4 --tokens 4096 --paths ht,ll --variants "block_h=8192" --ht-parts 1,4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository may not be installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _phases(ctx, opts):
    import moe_ep
    from bench_ep import copy_chunk, make_inputs
    from moe_ep.kernels.peer_copy import launch_peer_copy, peer_copy_regions
    from moe_ep.timing import DeviceBarrier, batch_seconds, median

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, tokens = opts["hidden"], opts["tokens"]
    barrier = DeviceBarrier(ctx.group, rank, world, dev, peer_copy_regions(world, tokens * hidden * 2 * 2))
    t_b = median(batch_seconds(dev, lambda i: barrier(), opts["iters"], 3, True, opts["batch"]))
    xs, ids, ws = make_inputs(0, "uniform", tokens, hidden, opts["num_experts"], opts["topk"], world, dev)
    y = torch.randn(tokens * world, hidden, device=dev).to(torch.bfloat16)
    out = {}
    for path, parts in [(p, n) for p in opts["paths"] for n in (opts["ht_parts"] if p == "ht" else [1])]:
        name = f"ht/parts{parts}" if path == "ht" else path
        cfg = moe_ep.EpConfig(hidden=hidden, num_experts=opts["num_experts"], topk=opts["topk"],
                              max_tokens_per_rank=tokens, dispatch_dtype=torch.float8_e4m3fn, mode=path,
                              ht_combine_parts=parts)
        buf = moe_ep.Buffer(ctx.group, cfg, check_inputs=False)
        d = buf.dispatch(xs[rank], ids[rank], ws[rank])
        remote = int((d.src[:int(d.num_tokens.item())].cpu()[:, 0] != rank).sum())
        empty = dataclasses.replace(d.handle, num_tokens=0)
        z0 = torch.empty(0, hidden, dtype=torch.bfloat16, device=dev)

        def timed(fn):
            return median(batch_seconds(dev, lambda i: (barrier(), fn()), opts["iters"], 3, True, opts["batch"])) - t_b

        chunk = copy_chunk(remote * hidden * 2, world)  # the bf16 rows it sends back
        src = torch.randint(0, 1 << 30, (world, chunk), dtype=torch.int32, device=dev)
        out[name] = {"remote_rows": remote}
        for parts in opts["copy_parts"]:  # bench_ep's p2p limit: the fastest of these
            copy = timed(lambda: launch_peer_copy(barrier.heap, barrier.sync, src, None, parts=parts, num_warps=8))
            out[name][f"p2p_copy_us_parts{parts}"] = round(copy * 1e6, 1)
        base = buf.launch_params(path, tokens)
        for variant in [""] + opts["variants"]:
            fields = {k: int(v) for k, v in (f.split("=") for f in variant.split(",") if f)}
            choice = dataclasses.replace(base, combine=dataclasses.replace(base.combine, **fields))
            for n in (tokens, 0):  # the send-phase-only call's bucket too
                buf.set_launch_params(path, n, choice)
            full = timed(lambda: buf.combine(y, d.handle))
            send = timed(lambda: buf.combine(y, empty, out=z0))
            out[name][variant or "default"] = {"combine_us": round(full * 1e6, 1), "send_phase_us": round(send * 1e6, 1)}
        out[name]["params"] = dataclasses.asdict(base.combine)
        buf.close()
    barrier.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--paths", default="ht,ll")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--variants", default="", help="combine-parameter overrides to time too, e.g. "
                   "'block_h=8192;num_warps=4,send_programs=528' (';' between variants)")
    p.add_argument("--ht-parts", default="4", help="EpConfig.ht_combine_parts values to time the HT path with")
    p.add_argument("--copy-parts", default="32,64,128", help="programs per peer of the p2p copies to time, e.g. 16,64")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    args = p.parse_args()
    from moe_ep.testing import RankPool

    opts = dict(vars(args), paths=args.paths.split(","), variants=[v for v in args.variants.split(";") if v],
                copy_parts=[int(v) for v in args.copy_parts.split(",")],
                ht_parts=[int(v) for v in args.ht_parts.split(",")])
    with RankPool(args.world, "cuda" if torch.cuda.is_available() else "cpu") as pool:
        results = pool.run(_phases, opts, timeout=600)
    for rank, r in enumerate(results):
        print(f"rank {rank}: {json.dumps(r)}")


if __name__ == "__main__":
    main()
