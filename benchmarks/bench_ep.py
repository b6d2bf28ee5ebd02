"""Token sweeps of moe_ep dispatch/combine against the baselines of the same run.

    python benchmarks/bench_ep.py                      # every GPU count >= 2 the machine has
    python benchmarks/bench_ep.py --worlds 4 --tokens 128,4096 --dtypes fp8
    python benchmarks/bench_ep.py --smoke              # tiny CPU run (the tests use it)

For each world size, dispatch dtype (fp8, bf16), routing (uniform; skewed: a few hot experts)
and tokens per rank it:
  1. checks one dispatch + combine against moe_ep.reference (a failing case is not reported);
  2. times, per rank, dispatch and combine: CUDA events around CUDA-graph replays of --batch
     calls, each call preceded by a device barrier (so rank skew is not counted; the barrier's
     own time is subtracted), input sets rotated — for moe_ep's paths, for the NCCL path a
     torch user writes (benchmarks/baselines.py; it synchronises with the host, so it runs
     eagerly, host time included), and for the peer-to-peer limit: moe_ep's plain peer copy of
     the same bytes to the same peers. The host time of an eager moe_ep call is reported apart;
  3. reports per-rank min/avg/max latency (us), bandwidth = bytes received from other ranks /
     time, and mori's bandwidth = all received rows x row bytes / time.
Writes results.json, results.csv, results.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_ep.config import INTER_PATHS  # noqa: E402  (after the path: the repository may not be installed)
from moe_ep.timing import median  # noqa: E402

NUM_INPUT_SETS = 3
VDEV = "nvshmem-vdev2d"  # torch's NVSHMEM all_to_all_vdev_2d baseline


# -- inputs ---------------------------------------------------------------------------------------

def make_inputs(set_index, routing, num_tokens, hidden, num_experts, topk, world, device):
    """Every rank's (x, topk_ids, topk_weights); the same on every rank (seeded)."""
    gen = torch.Generator(device=device).manual_seed(1234 + set_index)
    xs, ids, weights = [], [], []
    for _ in range(world):
        xs.append(torch.randn(num_tokens, hidden, generator=gen, device=device).to(torch.bfloat16))
        scores = torch.rand(num_tokens, num_experts, generator=gen, device=device)
        if routing == "skewed":  # a few hot experts draw most tokens
            hot = torch.arange(num_experts, device=device) < max(topk, num_experts // 32)
            scores = scores + hot * 0.9
        ids.append(scores.topk(topk, dim=1).indices)
        weights.append(torch.rand(num_tokens, topk, generator=gen, device=device))
    return xs, ids, weights


# -- one rank -------------------------------------------------------------------------------------

def _points(opts, world, device):
    """(routing, tokens per rank, input sets) of every point of the sweep: skewed routing only at
    --skewed-tokens."""
    for routing in opts["routings"]:
        for num_tokens in opts["tokens"]:
            if routing != "uniform" and num_tokens not in opts["skewed_tokens"]:
                continue
            yield routing, num_tokens, [make_inputs(i, routing, num_tokens, opts["hidden"], opts["num_experts"],
                                                    opts["topk"], world, device) for i in range(NUM_INPUT_SETS)]


def copy_chunk(remote_bytes: int, world: int) -> int:
    """int32 words per peer of the peer-copy limit for ``remote_bytes`` sent to the other ranks:
    their mean share, a multiple of 16 words (Triton then knows the row ends are aligned and
    copies in vectors)."""
    return -(-max(1, remote_bytes // max(world - 1, 1) // 4) // 16) * 16


def _minus(times, barrier_times):
    """Per-rep op times without the barrier's median time."""
    b = median(barrier_times)
    return [max(t - b, 1e-9) for t in times]


def _bench_rank(ctx, opts):
    import torch.distributed as dist

    import moe_ep
    from baselines import nccl_combine, nccl_dispatch
    from moe_ep import reference
    from moe_ep.kernels.peer_copy import launch_peer_copy, peer_copy_regions
    from moe_ep.timing import DeviceBarrier, batch_seconds, host_seconds

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, topk = opts["hidden"], opts["topk"]
    num_experts = opts["num_experts"]
    _SWEEP_CLOCK[(world, "moe_ep")] = (time.monotonic(), 0)
    max_tokens = max(opts["tokens"])
    # A side heap for the barrier before each timed op and for the peer-copy limit.
    max_copy_bytes = max_tokens * (hidden * 2 + 64)
    barrier = DeviceBarrier(ctx.group, rank, world, dev, peer_copy_regions(world, max_copy_bytes))
    side, side_sync = barrier.heap, barrier.sync

    # Every timed call is preceded by a device barrier (so rank skew is not counted); its own
    # time, measured alone, is subtracted.
    t_b = batch_seconds(dev, lambda i: barrier(), opts["iters"], opts["warmup"], True, opts["batch"])

    rows = []
    for dtype_name in opts["dtypes"]:
        dtype = torch.float8_e4m3fn if dtype_name == "fp8" else torch.bfloat16
        row_bytes = hidden + 4 * (hidden // 128) if dtype_name == "fp8" else 2 * hidden
        buffers = {}
        for path in opts["paths"]:
            cfg = moe_ep.EpConfig(hidden=hidden, num_experts=num_experts, topk=topk, max_tokens_per_rank=max_tokens,
                                  dispatch_dtype=dtype, **moe_ep.EpConfig.path_options(path, opts["gpus_per_node"]),
                                  **({"inter_transport": opts["inter_transport"]} if path in INTER_PATHS else {}))
            buffers[path] = moe_ep.Buffer(ctx.group, cfg, check_inputs=False)
        for routing, num_tokens, sets in _points(opts, world, dev):
            # The oracle runs on the CPU, as in the tests: torch's CUDA division by a Python
            # scalar (amax / 448) rounds differently (benchmarks/NOTES.md, run 1).
            cpu_set = [[t.cpu() for t in part] for part in sets[0]]
            expected = reference.dispatch(*cpu_set, num_experts, dtype)
            y = torch.randn(max_tokens * world, hidden, device=dev,  # the same on every rank
                            generator=torch.Generator(device=dev).manual_seed(99)).to(torch.bfloat16)
            ys = [y[:e.num_tokens].cpu() for e in expected]
            z_expected = {path: reference.combine(ys, expected, [num_tokens] * world,
                                                  opts["gpus_per_node"] if path in INTER_PATHS else None)[rank]
                          for path in buffers}
            mine = expected[rank]
            remote_rows = int((mine.src[:, 0] != rank).sum())
            # Rows this rank sends across nodes (the inter path): one per (token, other node).
            per_node = opts["gpus_per_node"] or world
            node_hit = reference.destinations(cpu_set[1][rank], num_experts, world).view(-1, world // per_node,
                                                                                          per_node).any(dim=2)
            node_hit[:, rank // per_node] = False
            inter_rows = int(node_hit.sum())
            point = dict(world=world, dtype=dtype_name, routing=routing, tokens=num_tokens)
            for path, buf in buffers.items():
                xs, ids, ws = sets[0]
                out = buf.dispatch(xs[rank], ids[rank], ws[rank], num_tokens_hint=num_tokens)
                n = int(out.num_tokens.item())
                ok = (n == mine.num_tokens
                      and torch.equal(out.x[:n].cpu().view(torch.uint8), mine.x.view(torch.uint8))
                      and torch.equal(out.src[:n].cpu(), mine.src)
                      and torch.equal(out.topk_ids[:n].cpu(), mine.topk_ids)
                      and torch.equal(out.tokens_per_expert.cpu(), mine.tokens_per_expert))
                z = buf.combine(y, out.handle)
                ok = ok and torch.equal(z.cpu(), z_expected[path])
                all_ok = [None] * world
                dist.all_gather_object(all_ok, bool(ok), group=ctx.group)
                if not all(all_ok):
                    raise AssertionError(f"moe_ep {path} failed its check at {point}: ranks ok = {all_ok}; "
                                         "refusing to report it")
                held = {}

                def dispatch_call(i, buf=buf):
                    xs, ids, ws = sets[i % NUM_INPUT_SETS]
                    held["out"] = buf.dispatch(xs[rank], ids[rank], ws[rank], num_tokens_hint=num_tokens)

                def with_barrier(*ops):
                    def enqueue(i):
                        for op in ops:
                            barrier()
                            op(i)
                    return enqueue

                t_d = batch_seconds(dev, with_barrier(dispatch_call), opts["iters"], opts["warmup"], True, opts["batch"])
                # Combine is timed on one dispatch's handle (a combine reads it, never changes it).
                dispatch_call(0)
                t_c = batch_seconds(dev, with_barrier(lambda i, buf=buf: buf.combine(y, held["out"].handle)),
                                     opts["iters"], opts["warmup"], True, opts["batch"])
                host_calls = min(5, opts["iters"])
                host_d = host_seconds(dev, lambda: dispatch_call(0), host_calls)
                host_c = host_seconds(dev, lambda buf=buf: buf.combine(y, held["out"].handle), host_calls)
                buf.check()
                rows += _report(ctx, point, f"moe_ep-{path}", _minus(t_d, t_b), _minus(t_c, t_b), host_d, host_c,
                                remote_rows, mine.num_tokens, row_bytes, hidden,
                                inter_rows if path in INTER_PATHS else 0)
                # Dispatch variants: pre-quantised input (fp8), zero-copy outputs (HT).
                for prequantized in (False, True) if dtype_name == "fp8" and opts.get("prequantized") else (False,):
                    for zero_copy in (False, True) if path == "ht" and opts.get("zero_copy") else (False,):
                        if prequantized or zero_copy:
                            rows += _time_dispatch_variant(ctx, buf, path, sets, mine, num_tokens, barrier, t_b,
                                                           point, opts, remote_rows, row_bytes, hidden, prequantized,
                                                           zero_copy)
            # The NCCL path (it synchronises with the host, so it runs eagerly).
            nccl_held = {}

            def nccl_dispatch_call(i):
                xs, ids, ws = sets[i % NUM_INPUT_SETS]
                nccl_held["out"] = nccl_dispatch(xs[rank], ids[rank], ws[rank], num_experts, dtype_name == "fp8", ctx.group)

            def nccl_combine_call(i):
                received, state = nccl_held["out"]
                nccl_combine(y[:received.shape[0]], state, ctx.group)

            t_d = batch_seconds(dev, lambda i: (barrier(), nccl_dispatch_call(i)), opts["iters"], opts["warmup"], False, opts["batch"])
            nccl_dispatch_call(0)
            t_c = batch_seconds(dev, lambda i: (barrier(), nccl_combine_call(i)), opts["iters"], opts["warmup"], False,
                                 opts["batch"])
            rows += _report(ctx, point, "nccl", _minus(t_d, t_b), _minus(t_c, t_b), None, None,
                            remote_rows, mine.num_tokens, row_bytes, hidden)
            # The peer-to-peer limit: each rank sends, to every rank, the mean bytes it
            # dispatches there (a plain copy, no packing, no layout), with the fastest of the
            # programs-per-peer counts tried (a copy with too few programs is latency-bound:
            # 2 x H100, 58 MB a peer, 274 us with 16 a peer, 177 with 64; benchmarks/NOTES.md run 12).
            chunk = copy_chunk(remote_rows * row_bytes, world)
            src = torch.randint(0, 1 << 30, (world, chunk), dtype=torch.int32, device=dev)
            t_copy = min((_minus(batch_seconds(dev, lambda i: (barrier(), launch_peer_copy(
                side, side_sync, src, None, parts=parts, num_warps=opts["copy_warps"])),
                opts["iters"], opts["warmup"], True, opts["batch"]), t_b) for parts in opts["copy_parts"]), key=median)
            side_sync.check()
            rows += _report(ctx, point, "p2p-copy", t_copy, None, None, None,
                            (world - 1) * chunk * 4 / row_bytes, mine.num_tokens, row_bytes, hidden)
            if rank == 0 and opts["progress"]:
                _progress(rows, point, opts, "moe_ep")
        for buf in buffers.values():
            buf.close()
    barrier.close()
    return rows if rank == 0 else None


def _pairs_received(ids, rank, per_rank):
    """(pairs from other ranks, all pairs) whose expert lives on ``rank``: what the NVSHMEM
    baseline moves (one row per pair, not per token and rank)."""
    mine = [int(((i >= rank * per_rank) & (i < (rank + 1) * per_rank)).sum()) for i in ids]
    return sum(mine) - mine[rank], sum(mine)


def _bench_vdev_rank(ctx, opts):
    """torch's NVSHMEM all_to_all_vdev_2d path (benchmarks/baselines.py), in its own processes:
    NVSHMEM must be the symmetric-memory backend before the first allocation. Timed eagerly (its
    combine sums on the host's stream; no graph), each call after a device barrier. Rank 0 returns
    {"rows": the points measured, "error": None, or why the op stopped (it may not run here)}."""
    import torch.distributed as dist

    from baselines import VdevBaseline
    from moe_ep.timing import DeviceBarrier, batch_seconds

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, topk, num_experts = opts["hidden"], opts["topk"], opts["num_experts"]
    per_rank = num_experts // world
    max_tokens = max(opts["tokens"])
    rows = []
    _SWEEP_CLOCK[(world, "nvshmem")] = (time.monotonic(), 0)
    try:
        barrier = DeviceBarrier(ctx.group, rank, world, dev, backend="nvshmem")
        t_b = batch_seconds(dev, lambda i: barrier(), opts["iters"], opts["warmup"], False, opts["batch"])
        for dtype_name in opts["dtypes"]:
            vdev = VdevBaseline(ctx.group, max_tokens, hidden, num_experts, topk, dtype_name == "fp8", dev)
            payload_bytes = vdev.row_bytes - 4
            for routing, num_tokens, sets in _points(opts, world, dev):
                remote, everything = _pairs_received(sets[0][1], rank, per_rank)
                # The check a baseline gets: every pair arrived (splits summed on the device).
                xs, ids, ws = sets[0]
                _, splits_offsets = vdev.dispatch(xs[rank], ids[rank], ws[rank])
                got = int(splits_offsets[0].sum())
                if got != everything:
                    raise AssertionError(f"all_to_all_vdev_2d: rank {rank} received {got} pairs, "
                                         f"expected {everything}")
                vdev.combine()

                def dispatch_call(i):
                    xs, ids, ws = sets[i % NUM_INPUT_SETS]
                    vdev.dispatch(xs[rank], ids[rank], ws[rank])

                t_d = batch_seconds(dev, lambda i: (barrier(), dispatch_call(i)), opts["iters"], opts["warmup"],
                                    False, opts["batch"])
                dispatch_call(0)
                t_c = batch_seconds(dev, lambda i: (barrier(), vdev.combine()), opts["iters"], opts["warmup"],
                                    False, opts["batch"])
                point = dict(world=world, dtype=dtype_name, routing=routing, tokens=num_tokens)
                rows += _report(ctx, point, VDEV, _minus(t_d, t_b), _minus(t_c, t_b), None, None,
                                remote, everything, payload_bytes, hidden)
                if rank == 0 and opts["progress"]:
                    _progress(rows, point, opts, "nvshmem")
        barrier.close()
    except Exception as err:  # noqa: BLE001 — a baseline that cannot run here is reported, not fatal
        msg = f"{type(err).__name__}: {err}"
        every = [None] * world
        dist.all_gather_object(every, msg, group=ctx.group)
        return {"error": every[0], "rows": rows} if rank == 0 else None
    return {"error": None, "rows": rows} if rank == 0 else None


def _sweep_size(opts) -> int:
    """Points per world size: dtypes x (uniform token counts + skewed ones)."""
    per_routing = [len(opts["tokens"]) if r == "uniform" else len([t for t in opts["tokens"] if t in opts["skewed_tokens"]])
                   for r in opts["routings"]]
    return len(opts["dtypes"]) * sum(per_routing)


_SWEEP_CLOCK: dict = {}  # (world, "moe_ep" or "nvshmem") -> (start, points done), in rank 0's process


def _time_dispatch_variant(ctx, buf, path, sets, mine, num_tokens, barrier, t_b, point, opts, remote_rows, row_bytes,
                           hidden, prequantized, zero_copy):
    """Dispatch only, of already-quantised rows (``prequantized``: (codes, scales) in, no
    quantisation in the kernel; row ``moe_ep-<path>-prequant``) and / or with ``zero_copy``
    outputs (views of the receive regions; row suffix ``-zc``). Quantised by the reference on
    the CPU, which the kernels match bit for bit, so the outputs must equal the bf16-input
    dispatch's."""
    import torch.distributed as dist

    from moe_ep import reference
    from moe_ep.timing import batch_seconds

    dev, rank, world = ctx.device, ctx.rank, ctx.world_size
    if prequantized:
        sets = [([tuple(t.to(dev) for t in reference.quantize_fp8(x.cpu())) for x in xs], ids, ws)
                for xs, ids, ws in sets]
    name = f"moe_ep-{path}" + ("-prequant" if prequantized else "") + ("-zc" if zero_copy else "")
    xs, ids, ws = sets[0]
    out = buf.dispatch(xs[rank], ids[rank], ws[rank], num_tokens_hint=num_tokens, zero_copy=zero_copy)
    n = int(out.num_tokens.item())
    ok = n == mine.num_tokens and torch.equal(out.x[:n].cpu().view(torch.uint8), mine.x.view(torch.uint8)) \
        and torch.equal(out.src[:n].cpu(), mine.src) and torch.equal(out.topk_ids[:n].cpu(), mine.topk_ids)
    if mine.x_scales is not None:
        ok = ok and torch.equal(out.x_scales[:n].cpu(), mine.x_scales)
    all_ok = [None] * world
    dist.all_gather_object(all_ok, bool(ok), group=ctx.group)
    if not all(all_ok):
        raise AssertionError(f"{name} failed its check at {point}: ranks ok = {all_ok}")

    def call(i):
        barrier()
        xs, ids, ws = sets[i % NUM_INPUT_SETS]
        buf.dispatch(xs[rank], ids[rank], ws[rank], num_tokens_hint=num_tokens, zero_copy=zero_copy)

    t_d = batch_seconds(dev, call, opts["iters"], opts["warmup"], True, opts["batch"])
    buf.check()
    return _report(ctx, point, name, _minus(t_d, t_b), None, None, None, remote_rows, mine.num_tokens, row_bytes,
                   hidden)


def _progress(rows, point, opts, family):
    """A progress line per finished point on stderr ([done/total], elapsed, ETA), and the point's
    rows appended to a JSON-lines file, so a run cut short (a lease's time limit) keeps what it
    measured."""
    mine = [r for r in rows if all(r[k] == v for k, v in point.items())]
    key = (point["world"], family)
    start, done = _SWEEP_CLOCK.get(key, (time.monotonic(), 0))
    done += 1
    _SWEEP_CLOCK[key] = (start, done)
    total = _sweep_size(opts)
    elapsed = time.monotonic() - start
    eta = f", ETA {elapsed / done * (total - done):.0f} s" if total >= done else ""
    summary = ", ".join(f"{r['impl']} {r['op']} {r['lat_avg_us']:.1f}us" for r in mine)
    print(f"  [{done}/{total}] {elapsed:.0f} s{eta} EP{point['world']} {point['dtype']} {point['routing']} "
          f"{point['tokens']} tokens: {summary}", file=sys.stderr, flush=True)
    if opts.get("partial"):
        with open(opts["partial"], "a") as f:
            for r in mine:
                f.write(json.dumps(r) + "\n")


def _report(ctx, point, impl, dispatch_s, combine_s, dispatch_host, combine_host, remote_rows, all_rows,
            row_bytes, hidden, inter_rows=0):
    """Gather each rank's median times and bytes; rank 0 gets one row per op. ``inter_rows``: rows
    this rank sends across nodes (inter path), for the bytes-between-nodes bandwidth."""
    import torch.distributed as dist

    mine = {"dispatch": median(dispatch_s), "combine": median(combine_s) if combine_s else None,
            "dispatch_host": dispatch_host, "combine_host": combine_host,
            "remote_rows": remote_rows, "all_rows": all_rows, "inter_rows": inter_rows}
    every = [None] * ctx.world_size
    dist.all_gather_object(every, mine, group=ctx.group)
    rows = []
    for op, bytes_per_row in (("dispatch", row_bytes), ("combine", 2 * hidden)):
        if every[0][op] is None:
            continue
        lat = [e[op] * 1e6 for e in every]
        bw = [e["remote_rows"] * bytes_per_row / e[op] / 1e9 for e in every]
        bw_mori = [e["all_rows"] * bytes_per_row / e[op] / 1e9 for e in every]
        bw_inter = [e["inter_rows"] * bytes_per_row / e[op] / 1e9 for e in every]
        op_name = "copy" if impl == "p2p-copy" else op
        rows.append(dict(point, impl=impl, op=op_name, lat_min_us=min(lat), lat_avg_us=sum(lat) / len(lat),
                         lat_max_us=max(lat),
                         host_us=sum(e[op + "_host"] for e in every) * 1e6 / len(every) if every[0][op + "_host"] else None,
                         bw_gbps=sum(bw) / len(bw), bw_mori_gbps=sum(bw_mori) / len(bw_mori),
                         bw_internode_gbps=sum(bw_inter) / len(bw_inter),
                         remote_mb_per_rank=sum(e["remote_rows"] for e in every) * bytes_per_row / len(every) / 1e6))
    return rows


# -- the run --------------------------------------------------------------------------------------

def _environment(device_kind, gpus):
    import triton

    commit = os.environ.get("MOE_EP_COMMIT", "")  # set by the caller where the tree has no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            pass
    commit = commit or "unknown"
    card = torch.cuda.get_device_name(0) if device_kind == "cuda" else platform.processor() or "cpu"
    return dict(card=card, gpus=gpus, torch=torch.__version__, triton=triton.__version__, commit=commit,
                date=datetime.date.today().isoformat(), host_python=platform.python_version())


def _write(rows, env, opts, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "options": opts, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(_markdown(rows, env, opts))
    try:
        _plots(rows, env, out_dir)
    except ImportError:
        print("matplotlib is missing: no plots", file=sys.stderr)


def _lookup(rows, **keys):
    for row in rows:
        if all(row[k] == v for k, v in keys.items()):
            return row
    return None


def _markdown(rows, env, opts):
    lines = [f"# moe_ep benchmark: {env['gpus']} x {env['card']}",
             "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}; hidden "
             f"{opts['hidden']}, {opts['num_experts']} experts, top-{opts['topk']}; {opts['iters']} timed batches "
             f"of {opts['batch']} calls (median per rank) after {opts['warmup']} warm-up batches.",
             "",
             "Latency: per-rank median, min/avg/max over ranks (us). BW: bytes received from other ranks / time "
             "(GB/s, mean over ranks). mori BW: all received rows x row bytes / time. p2p: moe_ep's plain peer "
             "copy of the same remote bytes. Inter-node BW (in the JSON/CSV, moe_ep-inter rows): bytes a rank "
             "sends across nodes / time (mori's RDMA figure). Speedup: NCCL path latency / moe_ep latency. Host: time the "
             "call takes on the host (Python, checks, launch; the GPU work is asynchronous except NCCL's). "
             "nvshmem-vdev2d: torch's all_to_all_vdev_2d / _offset (one row per (token, expert) pair; its BW "
             "counts the pairs' bytes), timed eagerly.",
             ""] + [f"Not run: {note}" for note in env.get("baselines_not_run", [])] + [""]
    impls = sorted({r["impl"] for r in rows if r["impl"].startswith(("moe_ep", "nvshmem"))})
    for world in sorted({r["world"] for r in rows}):
        for dtype in sorted({r["dtype"] for r in rows}):
            for routing in sorted({r["routing"] for r in rows}):
                sel = [r for r in rows if r["world"] == world and r["dtype"] == dtype and r["routing"] == routing]
                if not sel:
                    continue
                vdev = any(r["impl"] == VDEV for r in sel)
                lines += [f"## EP{world}, {dtype} dispatch, {routing} routing", "",
                          "| tokens | impl | op | latency min/avg/max (us) | host (us) | BW (GB/s) | mori BW | NCCL (us) | "
                          "speedup | " + ("vdev2d (us) | speedup vs vdev2d | " if vdev else "") + "p2p copy BW |",
                          "|---:|---|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if vdev else "") + "---:|"]
                for tokens in sorted({r["tokens"] for r in sel}):
                    copy = _lookup(sel, tokens=tokens, impl="p2p-copy")
                    for impl in impls:
                        for op in ("dispatch", "combine"):
                            r = _lookup(sel, tokens=tokens, impl=impl, op=op)
                            n = _lookup(sel, tokens=tokens, impl="nccl", op=op)
                            v = _lookup(sel, tokens=tokens, impl=VDEV, op=op)
                            if r is None:
                                continue
                            vcols = ""
                            if vdev:
                                vcols = "- | - | " if v is None else \
                                    f"{v['lat_avg_us']:.1f} | {v['lat_avg_us'] / r['lat_avg_us']:.2f}x | "
                            host = "-" if r["host_us"] is None else f"{r['host_us']:.0f}"
                            lines.append(
                                f"| {tokens} | {impl} | {op} | {r['lat_min_us']:.1f} / {r['lat_avg_us']:.1f} / "
                                f"{r['lat_max_us']:.1f} | {host} | {r['bw_gbps']:.1f} | {r['bw_mori_gbps']:.1f} | "
                                f"{n['lat_avg_us']:.1f} | {n['lat_avg_us'] / r['lat_avg_us']:.2f}x | {vcols}"
                                f"{copy['bw_gbps']:.1f} |")
                lines.append("")
    return "\n".join(lines)


def _plots(rows, env, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["routing"] == "uniform"]
    worlds, dtypes = sorted({r["world"] for r in sel}), sorted({r["dtype"] for r in sel})
    impls = sorted({r["impl"] for r in sel})
    for kind in ("latency", "bandwidth", "speedup"):
        fig, axes = plt.subplots(len(worlds), len(dtypes), figsize=(6 * len(dtypes), 4 * len(worlds)), squeeze=False)
        for i, world in enumerate(worlds):
            for j, dtype in enumerate(dtypes):
                ax = axes[i][j]
                for impl in impls:
                    for op in ("dispatch", "combine", "copy"):
                        pts = sorted((r["tokens"], r) for r in sel if r["world"] == world and r["dtype"] == dtype
                                     and r["impl"] == impl and r["op"] == op)
                        if not pts:
                            continue
                        x = [p[0] for p in pts]
                        if kind == "latency" and impl != "p2p-copy":
                            ax.plot(x, [p[1]["lat_avg_us"] for p in pts], marker="o", label=f"{impl} {op}")
                            ax.fill_between(x, [p[1]["lat_min_us"] for p in pts], [p[1]["lat_max_us"] for p in pts], alpha=0.2)
                        elif kind == "bandwidth":
                            ax.plot(x, [p[1]["bw_gbps"] for p in pts], marker="o", label=f"{impl} {op}")
                        elif kind == "speedup" and impl.startswith("moe_ep"):
                            for baseline, name in (("nccl", "NCCL"), (VDEV, "vdev2d")):
                                base = {r["tokens"]: r for r in sel if r["world"] == world and r["dtype"] == dtype
                                        and r["impl"] == baseline and r["op"] == op}
                                shared = [(t, p) for t, p in pts if t in base]
                                if shared:
                                    ax.plot([t for t, _ in shared], [base[t]["lat_avg_us"] / p["lat_avg_us"]
                                                                     for t, p in shared],
                                            marker="o" if baseline == "nccl" else "s", label=f"{impl} {op} vs {name}")
                ax.set_xscale("log", base=2)
                if kind in ("latency", "speedup"):
                    ax.set_yscale("log")
                ax.set_xlabel("tokens per rank")
                ax.set_ylabel({"latency": "us (min-max band over ranks)", "bandwidth": "GB/s from other ranks",
                               "speedup": "x over the baseline"}[kind])
                ax.set_title(f"EP{world} {dtype}, {env['card']}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{kind}.png"), dpi=110)
        plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default=None, help="world sizes, e.g. 2,4 (default: 2..all GPUs, powers of two)")
    p.add_argument("--tokens", default=",".join(str(1 << i) for i in range(14)))
    p.add_argument("--skewed-tokens", default="128,4096")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--routings", default="uniform,skewed")
    p.add_argument("--paths", default="ll,ht,auto", help="ll, ht, auto, and inter / inter_ht (need --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="the inter path: ranks form simulated nodes of this many ranks")
    p.add_argument("--prequantized", action="store_true",
                   help="fp8: also time dispatch of already-quantised rows (moe_ep-<path>-prequant rows)")
    p.add_argument("--zero-copy", action="store_true",
                   help="HT: also time dispatch with zero_copy=True (outputs are views of the receive regions; "
                        "moe_ep-ht-zc rows)")
    p.add_argument("--inter-transport", default="auto", choices=("auto", "peer", "put"),
                   help="how the inter paths cross between simulated nodes (EpConfig.inter_transport)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20, help="timed batches (one CUDA-graph replay each)")
    p.add_argument("--batch", type=int, default=10, help="calls per timed batch")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copy-parts", default="32,64,128",
                   help="programs per peer of the p2p copies tried; the fastest is the limit")
    p.add_argument("--copy-warps", type=int, default=8)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<card>-x<gpus>)")
    p.add_argument("--nvshmem", choices=("auto", "on", "off"), default="auto",
                   help="time torch's NVSHMEM all_to_all_vdev_2d baseline (auto: on GPUs)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run: 2 ranks (also as 2 simulated nodes), small shape, 1 call")
    return p.parse_args(argv)


def main(argv=None):
    from moe_ep.testing import RankPool

    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.smoke:
        device_kind, worlds = "cpu", [2]
        # uniform routing only: the skewed one differs in its inputs alone (and CI's minutes count)
        args.tokens, args.routings, args.hidden, args.num_experts, args.topk = "3", "uniform", 256, 8, 2
        args.iters, args.warmup, args.batch, args.copy_parts, args.copy_warps = 1, 0, 1, "1", 4
        args.paths, args.gpus_per_node = "ll,ht,inter_ht", 1  # the other paths run the same code
    else:
        if gpus < 2:
            raise SystemExit("the benchmark needs at least 2 GPUs (or --smoke for a CPU run)")
        device_kind = "cuda"
        worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else \
            [w for w in (2, 4, 8, 16) if w <= gpus]
    opts = dict(tokens=[int(t) for t in args.tokens.split(",")], skewed_tokens=[int(t) for t in args.skewed_tokens.split(",")],
                dtypes=args.dtypes.split(","), routings=args.routings.split(","), paths=args.paths.split(","),
                hidden=args.hidden, num_experts=args.num_experts, topk=args.topk, iters=args.iters, warmup=args.warmup,
                batch=args.batch, gpus_per_node=args.gpus_per_node, inter_transport=args.inter_transport,
                prequantized=args.prequantized or args.smoke, zero_copy=args.zero_copy or args.smoke,
                copy_parts=[int(v) for v in args.copy_parts.split(",")], copy_warps=args.copy_warps, progress=not args.smoke)
    env = _environment(device_kind, max(worlds) if device_kind == "cuda" else 0)
    slug = env["card"].replace("NVIDIA ", "").replace(" ", "-").lower()
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{slug}-x{env['gpus']}")
    os.makedirs(out_dir, exist_ok=True)
    opts["partial"] = os.path.join(out_dir, "results.partial.jsonl")
    if os.path.exists(opts["partial"]):
        os.remove(opts["partial"])
    rows = []
    for world in worlds:
        print(f"EP{world}: {len(opts['tokens'])} token counts x {opts['dtypes']} x {opts['routings']}", file=sys.stderr)
        with RankPool(world, device_kind) as pool:
            rows += pool.run(_bench_rank, opts, timeout=3600)[0]
        if args.nvshmem == "on" or (args.nvshmem == "auto" and device_kind == "cuda"):
            with RankPool(world, device_kind) as pool:  # fresh processes: NVSHMEM backend from the start
                vdev = pool.run(_bench_vdev_rank, opts, timeout=3600)[0]
            rows += vdev["rows"]
            if vdev["error"]:
                print(f"EP{world}: the NVSHMEM all_to_all_vdev_2d baseline did not run: {vdev['error']}", file=sys.stderr)
                env.setdefault("baselines_not_run", []).append(f"EP{world} nvshmem-vdev2d: {vdev['error']}")
    _write(rows, env, opts, out_dir)
    if os.path.exists(opts["partial"]):
        os.remove(opts["partial"])
    print(_markdown(rows, env, opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
