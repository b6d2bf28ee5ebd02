"""Search launch parameters on the GPUs at hand and write the winners to a tuned JSON file.

    python -m moe_ep.tune        # every GPU count >= 2, DeepSeek-V3 shape, into the user's file:
                                 # $XDG_CACHE_HOME/moe_ep/tuned/<card>.json (~/.cache/moe_ep/...),
                                 # which every later Buffer on this machine reads
    python -m moe_ep.tune --worlds 4 --tokens 128,4096 --out my_tuned.json
    MOE_EP_TUNED=my_tuned.json python my_server.py     # Buffer then uses them

The installed package is never written unless ``--out`` names a file there (maintainers
refreshing ``moe_ep/tuned/``); ``moe_ep.tuning`` gives the order in which Buffer reads files.

For each world size, dispatch dtype, path and token bucket it times every candidate of a small
grid (``candidates``) the way the benchmark does (CUDA-graph replays, a device barrier before
each call), then a few one-field changes of the winner (``refinements``), dispatch first, then
combine with the dispatch winner (path ``ht_zc``: the HT dispatch with zero_copy=True, whose
best parameters differ; its entries hold the dispatch only). All ranks launch the same
candidate at a time, and a candidate's time is its slowest rank's median. The defaults are
timed too, so the file records default vs tuned. The file's entries are keyed as
``moe_ep.tuning`` looks them up (GPU, world size, hidden, experts, top-k, dtype, path, bucket).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import torch

from moe_ep.config import INTER_PATHS
from moe_ep.tuning import OFF

ZERO_COPY_PATH = "ht_zc"  # --paths name of the HT dispatch with zero_copy=True (entries keyed zero_copy)
EXPERT_PATH = "expert"  # --paths name of the expert-major LL layout (Buffer.dispatch(layout="expert"))


def candidates(family: str, path: str, default, on_gpu: bool) -> list:
    """The grid searched for ``family`` ("dispatch" or "combine") on ``path`` (or ``ht_zc``): the
    default first."""
    if not on_gpu:  # the interpreter: a tiny grid, enough to exercise the search
        grid = {"dispatch": {"send_programs": (1, 2)}, "combine": {"reduce_programs": (1, 2)}}[family]
    elif path == "inter":
        grid = {"send_programs": (64, 128, 264), "forward_parts": (8, 16, 32), "recv_parts": (8, 16)} \
            if family == "dispatch" else \
            {"send_programs": (64, 128, 264), "proxy_programs": (32, 64, 128), "reduce_programs": (64, 128)}
    elif path == "inter_ht":  # HT-sized grids after the stage kernel
        grid = {"send_programs": (264, 528), "forward_parts": (16, 32, 64), "recv_parts": (16, 32)} \
            if family == "dispatch" else \
            {"send_programs": (528, 1056), "proxy_programs": (128, 256), "reduce_programs": (264, 1056)}
    elif path == EXPERT_PATH:  # the expert layout: LL-sized, a pair's row stored by its token's program(s)
        grid = {"send_programs": (32, 64, 128, 256), "token_parts": (1, 4), "num_warps": (4, 8)} \
            if family == "dispatch" else \
            {"send_programs": (32, 64, 128, 264), "reduce_programs": (32, 64, 128), "num_warps": (4, 8), "rows": (1, 2)}
    elif family == "dispatch":  # token_parts > 1 splits each token's row over programs, in 1024-value chunks
        grid = {"send_programs": (32, 64, 128, 256, 512) if path == "ll" else (132, 264, 528, 1056),
                "recv_parts": (8, 16, 32), "num_warps": (4, 8), "token_parts": (1, 4)}
        if path == ZERO_COPY_PATH:  # its receive programs copy no rows: their count hardly matters
            del grid["recv_parts"]
    else:
        # Send programs from few to many (run 11: 4224 beat 1056; run 15, sends rotated: 1056 beat 4224).
        grid = {"send_programs": (64, 128, 264, 2112) if path == "ll" else (264, 1056, 2112, 4224),
                "reduce_programs": (64, 128, 2112) if path == "ll" else (264, 1056), "num_warps": (4, 8)}
        if path == "ht":  # each token range's reducers right after its senders or one group later (run 12)
            grid["reduce_delay"] = (1, 2)
    names = list(grid)
    out = [default]
    for values in itertools.product(*(grid[n] for n in names)):
        fields = dict(zip(names, values))
        if fields.get("token_parts", 1) > 1:
            fields["block_h"] = min(default.block_h, 1024)
        cand = dataclasses.replace(default, **fields)
        if cand not in out:
            out.append(cand)
    return out


def refinements(family: str, path: str, best, on_gpu: bool) -> list:
    """A second search, one field at a time around the grid's winner ``best`` (first): fields of
    a kernel of their own, or of one phase, which need no product with the grid — the HT stage
    kernel's programs (its quantisation is latency-bound with few of them: run 12) and its
    prefix step (run 13), and (HT) the send groups whose receive overlaps later sends (run 13) and
    where the quantisation runs (run 14)."""
    if family != "dispatch" or path not in ("ht", ZERO_COPY_PATH, "inter_ht"):
        return [best]
    fields = {"stage_programs": (264, 1056, 2112) if on_gpu else (1, 2),
              "block_scan": (256, 512, 1024) if on_gpu else (4, 8)}
    if path == "ht":  # (a zero-copy call sends in one group: nothing to overlap)
        fields["send_groups"] = (1, 2)
    if path in ("ht", ZERO_COPY_PATH):
        fields["send_quantize"] = (False, True)
    out = [best]
    for name, values in fields.items():
        out += [dataclasses.replace(best, **{name: v}) for v in values if v != getattr(best, name)]
    return out


def _tune_rank(ctx, opts):
    import torch.distributed as dist

    import moe_ep
    from moe_ep.timing import DeviceBarrier, batch_seconds, median
    from moe_ep.tuning import Choice

    dev, rank, world = ctx.device, ctx.rank, ctx.world_size
    on_gpu = dev.type == "cuda"
    barrier = DeviceBarrier(ctx.group, rank, world, dev)
    entries = []

    def slowest_rank(times):
        t = torch.tensor([median(times)], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
        return float(t)

    for dtype_name, search_path in itertools.product(opts["dtypes"], opts["paths"]):
        zero_copy = search_path == ZERO_COPY_PATH  # the HT dispatch with zero_copy=True: dispatch entries only
        path = "ht" if zero_copy else search_path
        if path in INTER_PATHS and world // opts["gpus_per_node"] < 2:
            continue  # one node: no inter-node path at this world size
        dtype = moe_ep.native_fp8_dtype(dev) if dtype_name == "fp8" else torch.bfloat16
        expert = path == EXPERT_PATH
        layout = {"mode": "ll", "layouts": ("expert",)} if expert else \
            moe_ep.EpConfig.path_options(path, opts["gpus_per_node"])
        cfg = moe_ep.EpConfig(hidden=opts["hidden"], num_experts=opts["num_experts"], topk=opts["topk"],
                              max_tokens_per_rank=max(opts["tokens"]), dispatch_dtype=dtype, **layout)
        buf = moe_ep.Buffer(ctx.group, cfg, check_inputs=False, tuned=OFF)  # the defaults, not a shipped table
        y = torch.zeros(buf.experts_per_rank, cfg.slots(world), cfg.hidden, dtype=torch.bfloat16, device=dev) \
            if expert else torch.zeros(buf.capacity, cfg.hidden, dtype=torch.bfloat16, device=dev)
        call_kwargs = {"layout": "expert"} if expert else {"zero_copy": zero_copy}
        for num_tokens in opts["tokens"]:
            gen = torch.Generator(device=dev).manual_seed(7 + rank)
            x = torch.randn(num_tokens, cfg.hidden, generator=gen, device=dev).to(torch.bfloat16)
            ids = torch.rand(num_tokens, cfg.num_experts, generator=gen, device=dev).topk(cfg.topk, dim=1).indices
            w = torch.rand(num_tokens, cfg.topk, generator=gen, device=dev)
            default = buf.launch_params(path, num_tokens, zero_copy)
            held = {}

            def dispatch_call(i):
                barrier()
                held["out"] = buf.dispatch(x, ids, w, **call_kwargs)

            def combine_call(i):
                barrier()
                buf.combine(y, held["out"].handle, weighted=expert)

            def timed(cands, enqueue, make_choice):
                out = []
                for cand in cands:
                    buf.set_launch_params(path, num_tokens, make_choice(cand), zero_copy)
                    out.append((slowest_rank(batch_seconds(dev, enqueue, opts["iters"], 1, on_gpu, opts["batch"])),
                                cand))
                return out

            def search_family(family, enqueue, make_choice):
                """(the default's time, (the best time, its parameters)): the grid, then refinements."""
                times = timed(candidates(family, search_path, getattr(default, family), on_gpu), enqueue,
                              make_choice)
                best = min(times, key=lambda tc: tc[0])[1]
                times += timed(refinements(family, search_path, best, on_gpu)[1:], enqueue, make_choice)
                return times[0][0], min(times, key=lambda tc: tc[0])

            t_default_d, (t_d, best_d) = search_family("dispatch", dispatch_call,
                                                       lambda c: Choice(c, default.combine, "tuning"))
            key = dataclasses.asdict(buf.tune_key(path, num_tokens, zero_copy))
            measured = {"dispatch_default_us": t_default_d * 1e6, "dispatch_tuned_us": t_d * 1e6}
            if zero_copy:  # its combine is the HT entry's (a combine does not know how its rows came)
                entries.append(dict(key, dispatch=dataclasses.asdict(best_d), combine=None, measured=measured))
                continue
            buf.set_launch_params(path, num_tokens, Choice(best_d, default.combine, "tuning"))
            dispatch_call(0)
            t_default_c, (t_c, best_c) = search_family("combine", combine_call,
                                                       lambda c: Choice(best_d, c, "tuning"))
            entries.append(dict(key, dispatch=dataclasses.asdict(best_d), combine=dataclasses.asdict(best_c),
                                measured=dict(measured, combine_default_us=t_default_c * 1e6,
                                              combine_tuned_us=t_c * 1e6)))
        buf.check()
        buf.close()
    barrier.close()
    return entries if rank == 0 else None


def main(argv=None) -> int:
    from moe_ep.testing import RankPool
    from moe_ep.tuning import card_file_name, token_bucket, user_dir, write_entries

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default=None, help="world sizes (default: 2..all GPUs, powers of two)")
    p.add_argument("--tokens", default="1,8,32,128,256,512,1024,2048,4096", help="token buckets to tune")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--paths", default="ll,ht,ht_zc,expert",
                   help="ll, ht, ht_zc (the HT dispatch with zero_copy=True), expert (the expert-major LL layout), "
                        "and inter / inter_ht (need --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="the inter path: ranks form simulated nodes of this many ranks")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--out", default=None,
                   help="JSON file to merge into (default: $XDG_CACHE_HOME/moe_ep/tuned/<card>.json, which "
                        "Buffer reads)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: 2 ranks, small shape")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.smoke:
        device, worlds = "cpu", [2]
        args.tokens, args.hidden, args.num_experts, args.topk, args.iters, args.batch = "3", 256, 8, 2, 1, 1
        args.dtypes = "fp8"  # (bf16 takes the same search: the smoke keeps CI's minutes)
        args.paths, args.gpus_per_node = "ll,ht,ht_zc,inter,expert", 1
    elif gpus < 2:
        raise SystemExit("tuning needs at least 2 GPUs (or --smoke for a CPU run)")
    else:
        device = "cuda"
        worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else [w for w in (2, 4, 8) if w <= gpus]
    tokens = sorted({token_bucket(int(t)) for t in args.tokens.split(",")})
    if set(args.paths.split(",")) & set(INTER_PATHS) and not args.gpus_per_node:
        raise SystemExit("--paths inter / inter_ht need --gpus-per-node")
    opts = dict(tokens=tokens, dtypes=args.dtypes.split(","), paths=args.paths.split(","), hidden=args.hidden,
                gpus_per_node=args.gpus_per_node,
                num_experts=args.num_experts, topk=args.topk, iters=args.iters, batch=args.batch)
    entries = []
    for world in worlds:
        with RankPool(world, device) as pool:
            entries += pool.run(_tune_rank, opts, timeout=3600)[0]
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out = args.out or user_dir() / card_file_name(card)
    write_entries(out, entries)
    print(f"{len(entries)} entries written to {out}" + ("" if args.out else " (read by every Buffer: moe_ep.tuning)"))
    for e in entries:
        m = e["measured"]
        combine = f", combine {m['combine_default_us']:.1f} -> {m['combine_tuned_us']:.1f} us" \
            if "combine_default_us" in m else ""
        print(f"  EP{e['world_size']} {e['dispatch_dtype']} {e['path']}{' zero-copy' if e['zero_copy'] else ''} "
              f"{e['bucket']:5d} tokens: dispatch {m['dispatch_default_us']:.1f} -> {m['dispatch_tuned_us']:.1f} us"
              f"{combine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
