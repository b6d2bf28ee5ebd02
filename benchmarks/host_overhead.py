"""Host time of eager dispatch / combine calls, and where it goes (one GPU, or CPU ranks for a smoke).

    python benchmarks/host_overhead.py                       # one GPU: world 1, DeepSeek-V3 shape
    python benchmarks/host_overhead.py --profile --out DIR   # plus a cProfile of each path's calls (profiles.txt)

A serving stack captures decode in CUDA graphs, but prefill runs eagerly, and every eager call
pays Python, validation and Triton's launch before the GPU sees a kernel. This script times just
that: the wall-clock time of the call itself (the GPU runs asynchronously and is never the
bottleneck here: the calls are few and spaced by a device synchronisation every ``--batch``
calls), median over ``--calls`` calls, per path and op. One rank suffices (the host path is the
same at any world size), so a one-GPU machine measures it. ``--profile`` adds the top functions
by own time of each (path, op), to find what to cut.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PATHS = ("ll", "expert", "ht", "ht_zc")


def _buffer(path: str, hidden: int, num_experts: int, topk: int, tokens: int, device):
    import moe_ep

    layouts = ("expert",) if path == "expert" else ("flat",)
    cfg = moe_ep.EpConfig(hidden=hidden, num_experts=num_experts, topk=topk, max_tokens_per_rank=tokens,
                          dispatch_dtype=torch.float8_e4m3fn, mode="ht" if path.startswith("ht") else "ll",
                          layouts=layouts)
    return moe_ep.Buffer(dist.group.WORLD, cfg, device=device)


def measure(path: str, args, device) -> dict:
    tokens = args.ht_tokens if path.startswith("ht") else args.ll_tokens
    buf = _buffer(path, args.hidden, args.num_experts, args.topk, tokens, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, args.hidden, generator=gen).to(torch.bfloat16).to(device)
    ids = torch.stack([torch.randperm(args.num_experts, generator=gen)[:args.topk] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, args.topk, generator=gen).to(device)
    kwargs = {"layout": "expert"} if path == "expert" else {"zero_copy": True} if path == "ht_zc" else {}
    out = buf.dispatch(x, ids, weights, **kwargs)
    y = torch.randn(out.x.shape[:-1] + (args.hidden,), generator=gen).to(torch.bfloat16).to(device) \
        if path == "expert" else torch.randn(buf.capacity, args.hidden, generator=gen).to(torch.bfloat16).to(device)
    buf.combine(y, out.handle)
    buf.check()
    times = {"dispatch": [], "combine": []}

    def one(op):
        nonlocal out
        start = time.perf_counter()
        if op == "dispatch":
            out = buf.dispatch(x, ids, weights, **kwargs)
        else:
            buf.combine(y, out.handle)
        times[op].append((time.perf_counter() - start) * 1e6)

    for i in range(args.calls):
        one("dispatch")
        one("combine")
        if i % args.batch == args.batch - 1:
            buf.check()  # a device synchronisation, outside the timed calls
    buf.check()
    result = {"path": path, "tokens": tokens,
              **{f"{op}_host_us": statistics.median(t) for op, t in times.items()},
              **{f"{op}_host_p90_us": sorted(t)[int(0.9 * len(t))] for op, t in times.items()}}
    if args.breakdown:
        from host_breakdown import Sections, instrument

        for op in ("dispatch", "combine"):
            sections = Sections()
            instrument(sections)
            totals = []
            try:
                for i in range(args.calls):
                    start = time.perf_counter()
                    if op == "dispatch":
                        out = buf.dispatch(x, ids, weights, **kwargs)
                    else:
                        buf.combine(y, out.handle)
                    totals.append((time.perf_counter() - start) * 1e6)
                    sections.end_call()
                    if op == "dispatch":
                        buf.combine(y, out.handle)
                    if i % args.batch == args.batch - 1:
                        buf.check()
                    sections.discard()  # the untimed calls
            finally:
                sections.restore()
            buf.check()
            result[f"{op}_breakdown"] = {"wrapped_total_us": statistics.median(totals),
                                         "sections": sections.medians(args.calls)}
    if args.profile:
        for op in ("dispatch", "combine"):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                one(op)
                if op == "dispatch":
                    buf.combine(y, out.handle)
            prof.disable()
            buf.check()
            stream = __import__("io").StringIO()
            pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(25)
            result[f"{op}_profile"] = stream.getvalue()
    buf.close()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--ll-tokens", type=int, default=128)
    p.add_argument("--ht-tokens", type=int, default=4096)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="time the sections of each call (host_breakdown.py)")
    p.add_argument("--inference-mode", action="store_true",
                   help="make every call under torch.inference_mode(), as vLLM and SGLang run their forward passes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # a smoke on one CPU rank: tiny shapes, the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.hidden, args.num_experts, args.topk, args.ll_tokens, args.ht_tokens = 256, 8, 2, 4, 8
        args.calls, args.batch = min(args.calls, 4), 2
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0,
                            world_size=1)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    import triton

    env = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "inference_mode": args.inference_mode}
    with torch.inference_mode(args.inference_mode):
        results = [measure(path, args, device) for path in args.paths.split(",")]
    floor = None
    if args.breakdown and on_gpu:
        from host_breakdown import floors

        floor = floors(device)
    print(f"host time per eager call, {env['device']}, torch {env['torch']}, triton {env['triton']}"
          f"{', under torch.inference_mode()' if args.inference_mode else ''} (median / p90 us)")
    for r in results:
        print(f"  {r['path']:7s} {r['tokens']:5d} tokens: dispatch {r['dispatch_host_us']:7.1f} / "
              f"{r['dispatch_host_p90_us']:7.1f}   combine {r['combine_host_us']:7.1f} / {r['combine_host_p90_us']:7.1f}")
    for r in results:
        for op in ("dispatch", "combine"):
            b = r.get(f"{op}_breakdown")
            if b:
                print(f"  {r['path']} {op}: {b['wrapped_total_us']:.1f} us wrapped; sections (median us, calls per call):")
                for label, v in b["sections"].items():
                    print(f"      {v['median_us']:7.1f}  x{v['per_op_call']:.0f}  {label}")
    if floor:
        print("  floors on this machine (median us):")
        for label, v in floor.items():
            print(f"      {v:7.1f}  {label}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results, "floors": floor}, f, indent=1)
        profiles = [f"== {r['path']} {op}\n{r[f'{op}_profile']}" for r in results for op in ("dispatch", "combine")
                    if f"{op}_profile" in r]
        if profiles:
            with open(os.path.join(args.out, "profiles.txt"), "w") as f:
                f.write("\n".join(profiles))
    dist.destroy_process_group()


def _port() -> int:
    from moe_ep.testing import free_port

    return free_port()


if __name__ == "__main__":
    main()
