"""Where a dispatch's time goes: the whole fp8 dispatch, the same with fp8 input (no
quantisation), and (HT) the stage kernel alone, beside a plain peer copy of the same remote bytes,
on the GPUs at hand (a diagnostic, not a benchmark of record; the dispatch counterpart of
combine_phases.py).

    python benchmarks/dispatch_phases.py --world 2 --tokens 4096 --paths ht --variants "stage_programs=1056"
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
    from moe_ep import reference
    from moe_ep.kernels.dispatch import launch_stage
    from moe_ep.kernels.peer_copy import launch_peer_copy, peer_copy_regions
    from moe_ep.timing import DeviceBarrier, batch_seconds, median

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, tokens = opts["hidden"], opts["tokens"]
    barrier = DeviceBarrier(ctx.group, rank, world, dev, peer_copy_regions(world, tokens * (hidden + 64) * 2))
    t_b = median(batch_seconds(dev, lambda i: barrier(), opts["iters"], 3, True, opts["batch"]))
    xs, ids, ws = make_inputs(0, "uniform", tokens, hidden, opts["num_experts"], opts["topk"], world, dev)
    x, topk_ids, weights = xs[rank], ids[rank], ws[rank]
    x_fp8 = reference.quantize_fp8(x)

    def timed(fn):
        return round((median(batch_seconds(dev, lambda i: (barrier(), fn()), opts["iters"], 3, True,
                                           opts["batch"])) - t_b) * 1e6, 1)

    out = {}
    for path in opts["paths"]:
        cfg = moe_ep.EpConfig(hidden=hidden, num_experts=opts["num_experts"], topk=opts["topk"],
                              max_tokens_per_rank=tokens, dispatch_dtype=torch.float8_e4m3fn, mode=path)
        buf = moe_ep.Buffer(ctx.group, cfg, check_inputs=False)
        d = buf.dispatch(x, topk_ids, weights)
        remote = int((d.src[:int(d.num_tokens.item())].cpu()[:, 0] != rank).sum())
        row_bytes = hidden + 4 * cfg.num_scales  # fp8 values and their scales
        chunk = copy_chunk(remote * row_bytes, world)
        src = torch.randint(0, 1 << 30, (world, chunk), dtype=torch.int32, device=dev)
        out[path] = {"remote_rows": remote}
        for parts in opts["copy_parts"]:
            out[path][f"p2p_copy_us_parts{parts}"] = timed(
                lambda: launch_peer_copy(barrier.heap, barrier.sync, src, None, parts=parts, num_warps=8))
        base = buf.launch_params(path, tokens)
        for variant in [""] + opts["variants"]:
            fields = {k: int(v) for k, v in (f.split("=") for f in variant.split(",") if f)}
            choice = dataclasses.replace(base, dispatch=dataclasses.replace(base.dispatch, **fields))
            buf.set_launch_params(path, tokens, choice)
            row = {"dispatch_us": timed(lambda: buf.dispatch(x, topk_ids, weights, out=d)),
                   "prequantized_us": timed(lambda: buf.dispatch(x_fp8, topk_ids, weights, out=d))}
            if path == "ht":  # the stage kernel alone: routing layout and quantisation
                row["stage_us"] = timed(lambda: launch_stage(buf.heap, buf.sync, cfg, choice.dispatch, buf._staging,
                                                             x, None, topk_ids, d.handle.send_mask, 1))
            out[path][variant or "default"] = row
        out[path]["params"] = dataclasses.asdict(base.dispatch)
        buf.check()
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
    p.add_argument("--variants", default="", help="dispatch-parameter overrides to time too, e.g. "
                   "'stage_programs=1056;recv_parts=16,send_programs=528' (';' between variants)")
    p.add_argument("--copy-parts", default="32,64,128", help="programs per peer of the p2p copies to time")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    args = p.parse_args()
    from moe_ep.testing import RankPool

    opts = dict(vars(args), paths=args.paths.split(","), variants=[v for v in args.variants.split(";") if v],
                copy_parts=[int(v) for v in args.copy_parts.split(",")])
    with RankPool(args.world, "cuda" if torch.cuda.is_available() else "cpu") as pool:
        results = pool.run(_phases, opts, timeout=600)
    for rank, r in enumerate(results):
        print(f"rank {rank}: {json.dumps(r)}")


if __name__ == "__main__":
    main()
