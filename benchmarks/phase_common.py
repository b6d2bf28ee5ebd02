"""What benchmarks/dispatch_phases.py and combine_phases.py share: the command line and the rank
pool that runs a script's per-rank function, the timing of one call behind the device barrier,
the peer copy of the same bytes, and launch-parameter variants."""

from __future__ import annotations

import argparse
import json

import torch


def variant_fields(variant: str) -> dict:
    """``"block_h=8192,num_warps=4"`` -> ``{"block_h": 8192, "num_warps": 4}`` ("" -> {})."""
    return {k: int(v) for k, v in (f.split("=") for f in variant.split(",") if f)}


def call_timer(dev, barrier, opts):
    """``timed(fn)``: the median microseconds of ``fn()`` behind ``barrier`` (CUDA-graph replays
    on GPUs), less the barrier's own median."""
    from moe_ep.timing import batch_seconds, median

    t_b = median(batch_seconds(dev, lambda i: barrier(), opts["iters"], 3, True, opts["batch"]))

    def timed(fn):
        return round((median(batch_seconds(dev, lambda i: (barrier(), fn()), opts["iters"], 3, True,
                                           opts["batch"])) - t_b) * 1e6, 1)
    return timed


def copy_times(timed, barrier, remote_bytes: int, opts) -> dict:
    """The peer copy of ``remote_bytes`` (bench_ep's p2p limit: the fastest of these) with each of
    ``opts["copy_parts"]`` programs a peer, stores and (pull) loads from the peers:
    ``{"p2p_copy_us_parts<n>": us, "p2p_pull_us_parts<n>": us}``."""
    from bench_ep import copy_chunk
    from moe_ep.kernels.peer_copy import launch_peer_copy

    world = barrier.heap.world_size
    src = torch.randint(0, 1 << 30, (world, copy_chunk(remote_bytes, world)), dtype=torch.int32,
                        device=barrier.heap.device)
    return {f"p2p_{kind}_us_parts{parts}": timed(lambda: launch_peer_copy(barrier.heap, barrier.sync, src, None,
                                                                          parts=parts, num_warps=8, pull=pull))
            for kind, pull in (("copy", False), ("pull", True)) for parts in opts["copy_parts"]}


# The HT path is timed once per EpConfig.ht_parts value of this flag.
HT_PARTS_FLAG = {"--ht-parts": ("4", "EpConfig.ht_parts values to time the HT path with")}


def path_buffers(ctx, opts, x, topk_ids, weights):
    """For each path of ``opts["paths"]`` (HT once per ``opts["ht_parts"]`` value): ``(name,
    path, buf, d, remote)`` — an fp8 Buffer of the options' shape, its dispatch ``d`` of these
    inputs, and the rows ``d`` received from other ranks. Each Buffer is closed after its turn."""
    import moe_ep

    for path, parts in [(p, n) for p in opts["paths"] for n in (opts["ht_parts"] if p == "ht" else [1])]:
        cfg = moe_ep.EpConfig(hidden=opts["hidden"], num_experts=opts["num_experts"], topk=opts["topk"],
                              max_tokens_per_rank=opts["tokens"], dispatch_dtype=torch.float8_e4m3fn, mode=path,
                              ht_parts=parts)
        buf = moe_ep.Buffer(ctx.group, cfg, check_inputs=False)
        try:
            d = buf.dispatch(x, topk_ids, weights)
            remote = int((d.src[:int(d.num_tokens.item())].cpu()[:, 0] != ctx.rank).sum())
            yield (f"ht/parts{parts}" if path == "ht" else path), path, buf, d, remote
        finally:
            buf.close()


def main(doc: str, phases, variants_example: str, int_lists: dict | None = None) -> None:
    """Parse the shared command line (plus ``int_lists``: flag -> (default, help) of
    comma-separated ints), run ``phases(ctx, opts)`` on every rank and print each rank's result."""
    from moe_ep.testing import RankPool

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--paths", default="ht,ll")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--variants", default="", help=f"launch-parameter overrides to time too, e.g. '{variants_example}' "
                   "(';' between variants)")
    lists = {"--copy-parts": ("32,64,128", "programs per peer of the p2p copies to time"), **(int_lists or {})}
    for flag, (default, help_text) in lists.items():
        p.add_argument(flag, default=default, help=help_text)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    args = p.parse_args()
    opts = dict(vars(args), paths=args.paths.split(","), variants=[v for v in args.variants.split(";") if v])
    for flag in lists:
        name = flag.lstrip("-").replace("-", "_")
        opts[name] = [int(v) for v in opts[name].split(",")]
    with RankPool(args.world, "cuda" if torch.cuda.is_available() else "cpu") as pool:
        results = pool.run(phases, opts, timeout=600)
    for rank, r in enumerate(results):
        print(f"rank {rank}: {json.dumps(r)}")
