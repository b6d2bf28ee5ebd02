"""Token sweeps of moe_ep dispatch/combine against the baselines of the same run.

    python benchmarks/bench_ep.py                      # every GPU count >= 2 the machine has
    python benchmarks/bench_ep.py --worlds 4 --tokens 128,4096 --dtypes fp8
    python benchmarks/bench_ep.py --deepep-site /tmp/site   # also DeepEP, installed there
    python benchmarks/bench_ep.py --smoke              # tiny CPU run (the tests use it)

For each world size, dispatch dtype (fp8, bf16), routing (uniform; skewed: a few hot experts)
and tokens per rank it:
  1. checks one dispatch + combine of every implementation against moe_ep.reference (a failing
     case is not reported: the run stops with the failure);
  2. times every implementation the same way (benchmarks/bench_timing.py): CUDA-graph replays of
     --batch calls, each call behind a device barrier, input sets rotated; the barrier alone is
     timed at each point and subtracted. The implementations (``impl``):
       moe_ep-<path>[-prequant][-zc][-hook]  moe_ep's paths (MOE_EP_VARIANTS: fp8 input, zero-copy
                      outputs; path "expert": the expert-major layout, weighted combine, -hook its
                      receive hooks run right after each call)
       nccl-padded    the strong NCCL baseline: padded, sync-free, graph-captured (baselines.py)
       nccl-naive     what a hurried torch user writes: sort, count exchange, host syncs (eager)
       nvshmem-vdev2d torch's all_to_all_vdev_2d (GPUs, own processes, eager)
       deepep-normal / deepep-ll   DeepEP's intranode and low-latency modes where it loads
                      (deepep_baseline.py; its normal mode takes fp8 input already quantised)
       p2p-copy       moe_ep's plain peer copy of the same remote bytes (the limit)
     and, per implementation, the ops dispatch, combine and ``pair``: a dispatch followed by its
     combine with no barrier between them (mori's "e2e" figure);
  3. writes one row per (point, impl, op) to results.json (with the environment and options),
     results.csv (the same rows) and results.md, plus PNG plots, in --out.

Row fields (JSON and CSV; times in microseconds per call, "per rank" then min/avg/max over ranks):
  world, dtype, routing, tokens, impl, op   the point; op is dispatch, combine, pair or copy
  lat_min_us / lat_avg_us / lat_max_us  per rank: the median over replays of a call's time less
                                        the barrier's median; min / mean / max over ranks
  p50_us / p99_us     per rank: percentiles over every timed call (less the barrier); mean over ranks
  percentiles_over    "calls", or "replays" where CUDA events inside a graph cannot time (then the
                      percentiles are over replays of --batch calls; bench_timing.marks_in_graphs)
  kernel_us           device time of the op's kernels per call (torch.profiler, as DeepEP's
                      bench_kineto), mean over ranks; None where not measured (CPU ranks, --kineto off)
  kernels_per_call    device activities (kernels, copies) per call; None likewise
  barrier_us          the barrier time subtracted at this point (per-rank median, mean over ranks)
  host_us             host time of one eager call (Python, checks, launch); None where not measured
  timed_as            "graph" (CUDA-graph replays), "eager" (the calls synchronise with the host) or
                      "cpu" (host clock, CPU ranks)
  bw_gbps             bytes received from other ranks (the useful rows: the padded baseline moves
                      more) / latency, mean over ranks; pair: dispatch + combine bytes
  bw_mori_gbps        all received rows x row bytes / latency (mori's figure)
  bw_internode_gbps   bytes a rank sends across nodes / latency (inter paths; 0 elsewhere)
  remote_mb_per_rank  the remote bytes behind bw_gbps
results.json's environment also records the DeepEP diagnosis ("deepep") and every baseline that
did not run, with the reason ("baselines_not_run").

results.md, per (world, dtype, routing): a summary table — each moe_ep row's latency against
nccl-padded and DeepEP (the faster of its modes at that point) of the same run, as ratios
(baseline / moe_ep), and against the peer copy of the same bytes (copy / moe_ep) — then a detail
table of every row. Columns that need a GPU are "-" on CPU ranks (and the table says why).
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
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_ep.config import INTER_PATHS  # noqa: E402  (after the path: the repository may not be installed)

from bench_timing import measure, median, percentile  # noqa: E402

NUM_INPUT_SETS = 3
VDEV = "nvshmem-vdev2d"  # torch's NVSHMEM all_to_all_vdev_2d baseline
PADDED, NAIVE, COPY = "nccl-padded", "nccl-naive", "p2p-copy"
DEEPEP = ("deepep-normal", "deepep-ll")
OPS = ("dispatch", "combine", "pair")


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


def points(opts, world, device):
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


def payload_bytes(dtype_name: str, hidden: int) -> int:
    """Bytes of one dispatched row: fp8 codes + float32 scales, or bf16."""
    return hidden + 4 * (hidden // 128) if dtype_name == "fp8" else 2 * hidden


@dataclass
class Expected:
    """The reference at one point, as this rank sees it (CPU tensors unless said)."""

    inputs: tuple  # (xs, topk_ids, topk_weights) of input set 0, every rank's
    everyone: list  # every rank's moe_ep.reference.RankDispatch
    mine: object  # this rank's RankDispatch
    y: torch.Tensor  # [max_tokens * world, hidden] bf16 on the device: the expert output of received row k is y[k]
    z: dict  # gpus_per_node (None: one node) -> this rank's expected combine [T, hidden] bf16


def expected_at(sets, rank, world, num_tokens, opts, dtype, device) -> Expected:
    """The reference's outputs for input set 0. The oracle runs on the CPU, as in the tests:
    torch's CUDA division by a Python scalar (amax / 448) rounds differently (NOTES.md, run 1)."""
    from moe_ep import reference

    cpu_set = tuple([t.cpu() for t in part] for part in sets[0])
    everyone = reference.dispatch(*cpu_set, opts["num_experts"], dtype)
    y = torch.randn(max(opts["tokens"]) * world, opts["hidden"], device=device,  # the same on every rank
                    generator=torch.Generator(device=device).manual_seed(99)).to(torch.bfloat16)
    ys = [y[:e.num_tokens].cpu() for e in everyone]
    z = {gpn: reference.combine(ys, everyone, [num_tokens] * world, gpn)[rank]
         for gpn in {None, opts["gpus_per_node"]}}
    return Expected(cpu_set, everyone, everyone[rank], y, z)


# -- one implementation at one point --------------------------------------------------------------

@dataclass
class Variant:
    """One implementation at one point. ``dispatch(i)`` enqueues a dispatch of input set i and
    returns what ``combine`` takes; ``combine(handle)`` enqueues its combine (None: dispatch
    only). ``check()`` runs a dispatch (and combine) of set 0 and returns (whether it matched
    the reference, that dispatch's handle): the combine is then timed on that handle."""

    impl: str
    dispatch: Callable[[int], object]
    combine: Callable[[object], object] | None
    check: Callable[[], tuple[bool, object]]
    graph: bool = True  # timed in a CUDA graph; False: it synchronises with the host (eager)
    host: bool = True  # also report the host time of an eager call
    after: Callable[[], None] | None = None  # run after the timings (e.g. a Buffer's status check)
    inter_rows: int = 0  # rows this rank sends across nodes (the inter paths)


@dataclass
class Counts:
    """What the bandwidths of a row count, on this rank."""

    remote_rows: float  # rows received from other ranks
    all_rows: float  # all rows received
    row_bytes: int  # bytes of a dispatched row
    hidden: int


class Timer:
    """Times ops behind ``barrier`` at one point (bench_timing.measure); the barrier alone is
    measured once here and subtracted from each op by ``report``."""

    def __init__(self, device, barrier, opts, graph: bool = True):
        self.device, self.barrier, self.opts = device, barrier, opts
        self.kineto = opts.get("kineto", False) and device.type == "cuda"
        self.barrier_timing = self.measure(None, graph)

    def measure(self, enqueue, graph: bool):
        o = self.opts
        return measure(self.device, self.barrier, enqueue, o["iters"], o["warmup"], o["batch"], graph, self.kineto)

    def timed_as(self, graph: bool) -> str:
        return "cpu" if self.device.type != "cuda" else "graph" if graph else "eager"


def run_variant(ctx, timer: Timer, variant: Variant, point: dict, counts: Counts) -> list:
    """Check ``variant`` (every rank must pass, or it raises: a failing case is not reported),
    time its dispatch, combine and pair, and return rank 0's rows (``report``)."""
    import torch.distributed as dist

    from moe_ep.timing import host_seconds

    passed, handle = variant.check()
    ok = [None] * ctx.world_size
    dist.all_gather_object(ok, bool(passed), group=ctx.group)
    if not all(ok):
        raise AssertionError(f"{variant.impl} failed its check at {point}: ranks ok = {ok}; refusing to report it")
    timings, host = {}, {}
    host_calls = min(5, timer.opts["iters"])
    if variant.combine is not None:
        # On the check's dispatch, the latest one: a combine reads its handle, never changes it.
        timings["combine"] = timer.measure(lambda i: variant.combine(handle), variant.graph)
        if variant.host:
            host["combine"] = host_seconds(ctx.device, lambda: variant.combine(handle), host_calls)
    timings["dispatch"] = timer.measure(variant.dispatch, variant.graph)
    if variant.host:
        host["dispatch"] = host_seconds(ctx.device, lambda: variant.dispatch(0), host_calls)
    if variant.combine is not None:
        timings["pair"] = timer.measure(lambda i: variant.combine(variant.dispatch(i)), variant.graph)
    if variant.after is not None:
        variant.after()
    return report(ctx, point, variant.impl, timings, host, timer, counts, variant.graph, variant.inter_rows)


def report(ctx, point, impl, timings: dict, host: dict, timer: Timer, counts: Counts, graph: bool,
           inter_rows: int = 0) -> list:
    """Gather every rank's figures (less the barrier); rank 0 gets one row per op (module
    docstring), the others an empty list. ``timings``: op -> bench_timing.Timing."""
    import torch.distributed as dist

    barrier = median(timer.barrier_timing.replays)

    def less_barrier(values):
        return [max(v - barrier, 1e-9) for v in values]

    mine = {"ops": {op: {"median": median(less_barrier(t.replays)), "p50": percentile(less_barrier(t.calls), 50),
                         "p99": percentile(less_barrier(t.calls), 99), "kernel": t.kernel_s,
                         "kernels": t.kernels_per_call, "host": host.get(op), "samples": t.samples}
                    for op, t in timings.items()},
            "barrier": barrier, "remote_rows": counts.remote_rows, "all_rows": counts.all_rows,
            "inter_rows": inter_rows}
    every = [None] * ctx.world_size
    dist.all_gather_object(every, mine, group=ctx.group)
    if ctx.rank != 0:
        return []

    def mean(values):
        return None if any(v is None for v in values) else sum(values) / len(values)

    bytes_per_row = {"dispatch": counts.row_bytes, "combine": 2 * counts.hidden,
                     "pair": counts.row_bytes + 2 * counts.hidden}
    rows = []
    for op in sorted(timings, key=OPS.index):
        per_rank = [e["ops"][op] for e in every]
        lat = [r["median"] * 1e6 for r in per_rank]
        row_bytes = bytes_per_row[op]
        rows.append(dict(
            point, impl=impl, op="copy" if impl == COPY else op,
            lat_min_us=min(lat), lat_avg_us=sum(lat) / len(lat), lat_max_us=max(lat),
            p50_us=mean([r["p50"] * 1e6 for r in per_rank]), p99_us=mean([r["p99"] * 1e6 for r in per_rank]),
            percentiles_over=per_rank[0]["samples"],
            kernel_us=mean([None if r["kernel"] is None else r["kernel"] * 1e6 for r in per_rank]),
            kernels_per_call=mean([r["kernels"] for r in per_rank]),
            barrier_us=mean([e["barrier"] * 1e6 for e in every]),
            host_us=mean([None if r["host"] is None else r["host"] * 1e6 for r in per_rank]),
            timed_as=timer.timed_as(graph),
            bw_gbps=mean([e["remote_rows"] * row_bytes / r["median"] / 1e9 for e, r in zip(every, per_rank)]),
            bw_mori_gbps=mean([e["all_rows"] * row_bytes / r["median"] / 1e9 for e, r in zip(every, per_rank)]),
            bw_internode_gbps=mean([e["inter_rows"] * row_bytes / r["median"] / 1e9
                                    for e, r in zip(every, per_rank)]),
            remote_mb_per_rank=mean([e["remote_rows"] * row_bytes / 1e6 for e in every])))
    return rows


# -- moe_ep's variants ----------------------------------------------------------------------------

def _flat_dispatch_ok(out, exp: Expected) -> bool:
    """A flat-layout DispatchOutput against the reference: every valid row bit for bit."""
    mine = exp.mine
    n = int(out.num_tokens.item())
    ok = (n == mine.num_tokens and torch.equal(out.x[:n].cpu().view(torch.uint8), mine.x.view(torch.uint8))
          and torch.equal(out.src[:n].cpu(), mine.src) and torch.equal(out.topk_ids[:n].cpu(), mine.topk_ids)
          and torch.equal(out.tokens_per_expert.cpu(), mine.tokens_per_expert))
    if mine.x_scales is not None:
        ok = ok and torch.equal(out.x_scales[:n].cpu(), mine.x_scales)
    return ok


def _flat_y(out, exp: Expected) -> torch.Tensor:
    return exp.y


def _flat_combine_ok(z, exp: Expected, gpus_per_node) -> bool:
    return torch.equal(z.cpu(), exp.z[gpus_per_node])


@dataclass(frozen=True)
class MoeEpVariant:
    """One way of calling moe_ep, timed as its own rows ``moe_ep-<path><suffix>``. Adding one
    (e.g. another output layout) is one more entry in MOE_EP_VARIANTS: when it applies, its
    dispatch keyword arguments, its check against the reference (``Expected`` holds every rank's
    inputs and reference outputs), and, with a combine, the expert outputs it takes and the check
    of its result."""

    suffix: str
    applies: Callable[[str, str, dict], bool]  # (path, dtype name, opts) -> timed at all
    dispatch_kwargs: dict = field(default_factory=dict)
    prequantized: bool = False  # x given as (fp8 codes, scales), quantised by the reference
    combine: bool = False  # also time combine (and the pair) and the host time
    combine_kwargs: dict = field(default_factory=dict)
    dispatch_ok: Callable = _flat_dispatch_ok  # (DispatchOutput, Expected) -> bool
    combine_input: Callable = _flat_y  # (DispatchOutput, Expected) -> y for combine
    combine_ok: Callable = _flat_combine_ok  # (z, Expected, gpus_per_node) -> bool
    hook: bool = False  # return_recv_hook: each call's hook runs right after it
    needs_buffer: bool = False  # the checks and combine_input also take the Buffer (last argument)


def _expert_reference(exp: Expected, buf) -> dict:
    """The expert layout's reference at this point (computed once per point and Buffer): every
    rank's ``RankExpertDispatch``, the expert outputs y [E_local, slots, hidden] on the device (the
    same on every rank), and this rank's weighted combine."""
    from moe_ep import reference

    cached = _EXPERT_CACHE.get(id(exp))
    if cached is not None and cached["buf"] is buf:
        return cached
    xs, ids, ws = exp.inputs
    cfg, world, rank = buf.cfg, buf.world_size, buf.rank
    everyone = reference.dispatch_expert(xs, ids, ws, cfg.num_experts, cfg.dispatch_dtype)
    slots = cfg.slots(world)
    y = torch.randn(buf.experts_per_rank, slots, cfg.hidden, generator=torch.Generator().manual_seed(98)
                    ).to(torch.bfloat16)
    ys = [torch.cat([y[e, :int(d.tokens_per_expert[e])] for e in range(buf.experts_per_rank)]) for d in everyone]
    z = reference.combine_expert(ys, everyone, ids, ws, weighted=True)[rank]
    _EXPERT_CACHE.clear()
    _EXPERT_CACHE[id(exp)] = cached = {"buf": buf, "mine": everyone[rank], "y": y.to(buf.device), "z": z}
    return cached


_EXPERT_CACHE: dict = {}


def _expert_dispatch_ok(out, exp: Expected, buf) -> bool:
    """An ExpertDispatchOutput against the reference: every valid row of every expert bit for bit."""
    mine = _expert_reference(exp, buf)["mine"]
    if not torch.equal(out.tokens_per_expert.cpu(), mine.tokens_per_expert):
        return False
    for e in range(len(mine.tokens_per_expert)):
        n, rows = int(mine.tokens_per_expert[e]), mine.rows(e)
        ok = (torch.equal(out.x[e, :n].cpu().view(torch.uint8), mine.x[rows].view(torch.uint8))
              and torch.equal(out.src[e, :n].cpu(), mine.src[rows])
              and torch.equal(out.topk_weights[e, :n].cpu(), mine.topk_weights[rows]))
        if mine.x_scales is not None:
            ok = ok and torch.equal(out.x_scales[e, :n].cpu(), mine.x_scales[rows])
        if not ok:
            return False
    return True


def _expert_y(out, exp: Expected, buf) -> torch.Tensor:
    return _expert_reference(exp, buf)["y"]


def _expert_combine_ok(z, exp: Expected, gpus_per_node, buf) -> bool:
    return torch.equal(z.cpu(), _expert_reference(exp, buf)["z"])


def _flat_path(path, dtype, opts) -> bool:
    return path != EXPERT


def _expert_variant(suffix: str, applies, hook: bool = False, prequantized: bool = False) -> MoeEpVariant:
    return MoeEpVariant(suffix, applies, {"layout": "expert", "return_recv_hook": hook}, prequantized=prequantized,
                        combine=True, combine_kwargs={"weighted": True, "return_recv_hook": hook},
                        dispatch_ok=_expert_dispatch_ok, combine_input=_expert_y, combine_ok=_expert_combine_ok,
                        hook=hook, needs_buffer=True)


EXPERT = "expert"  # --paths name of the expert-major layout (an LL-path Buffer with layouts=("expert",))
MOE_EP_VARIANTS = (
    MoeEpVariant("", _flat_path, combine=True),
    _expert_variant("", lambda path, dtype, opts: path == EXPERT),
    # Send and receive hook back to back: the cost of the split (two launches) over one launch.
    _expert_variant("-hook", lambda path, dtype, opts: path == EXPERT and opts["hooks"], hook=True),
    _expert_variant("-prequant", lambda path, dtype, opts: path == EXPERT and dtype == "fp8" and opts["prequantized"],
                    prequantized=True),
    MoeEpVariant("-prequant", lambda path, dtype, opts: path != EXPERT and dtype == "fp8" and opts["prequantized"],
                 prequantized=True),
    MoeEpVariant("-zc", lambda path, dtype, opts: path == "ht" and opts["zero_copy"], {"zero_copy": True}),
    MoeEpVariant("-prequant-zc", lambda path, dtype, opts: path == "ht" and dtype == "fp8" and opts["prequantized"]
                 and opts["zero_copy"], {"zero_copy": True}, prequantized=True),
)


def moe_ep_variant(spec: MoeEpVariant, ctx, path: str, buf, sets, exp: Expected, num_tokens: int, opts,
                   inter_rows: int) -> Variant:
    from moe_ep import reference

    rank = ctx.rank
    if spec.prequantized:
        sets = [([tuple(t.to(ctx.device) for t in reference.quantize_fp8(x.cpu())) for x in xs], ids, ws)
                for xs, ids, ws in sets]
    kwargs = dict(num_tokens_hint=num_tokens, **spec.dispatch_kwargs)
    gpus_per_node = opts["gpus_per_node"] if path in INTER_PATHS else None
    held = {}

    extra = (buf,) if spec.needs_buffer else ()

    def hooked(result):
        if not spec.hook:
            return result
        result, hook = result
        hook()
        return result

    def dispatch(i):
        xs, ids, ws = sets[i % NUM_INPUT_SETS]
        return hooked(buf.dispatch(xs[rank], ids[rank], ws[rank], **kwargs))

    def combine(out):
        return hooked(buf.combine(held["y"], out.handle, **spec.combine_kwargs))

    def check():
        out = dispatch(0)
        ok = spec.dispatch_ok(out, exp, *extra)
        if spec.combine:
            held["y"] = spec.combine_input(out, exp, *extra)
            ok = ok and spec.combine_ok(combine(out), exp, gpus_per_node, *extra)
        return ok, out

    return Variant(f"moe_ep-{path}{spec.suffix}", dispatch, combine if spec.combine else None, check,
                   host=spec.combine, after=buf.check, inter_rows=inter_rows if path in INTER_PATHS else 0)


# -- the NCCL baselines ---------------------------------------------------------------------------

def padded_variant(ctx, sets, exp: Expected, num_tokens: int, opts, fp8: bool) -> Variant:
    """nccl-padded with capacity = this point's tokens per rank (a graph per batch size, as
    serving stacks capture one per bucket)."""
    from baselines import PaddedNccl

    rank, world = ctx.rank, ctx.world_size
    padded = PaddedNccl(ctx.group, num_tokens, opts["hidden"], opts["num_experts"], opts["topk"], fp8, ctx.device)
    y = exp.y[:world * num_tokens]  # any rows will do for timing

    def dispatch(i):
        xs, ids, ws = sets[i % NUM_INPUT_SETS]
        return padded.dispatch(xs[rank], ids[rank], ws[rank])

    def check():
        padded.recv.fill_(0x5A)  # poison: ids 0x5A5A5A5A would read as valid rows
        dispatch(0)
        fields, src = padded.compact()
        mine = exp.mine
        ok = (torch.equal(src, mine.src) and torch.equal(fields["x"].view(torch.uint8), mine.x.view(torch.uint8))
              and torch.equal(fields["topk_ids"], mine.topk_ids) and torch.equal(fields["topk_weights"], mine.topk_weights))
        if fp8:
            ok = ok and torch.equal(fields["x_scales"], mine.x_scales)
        z = padded.combine(padded.slots_of(exp.y[:mine.num_tokens]))  # NaN in the padding rows
        return ok and torch.equal(z.cpu(), exp.z[None]), padded

    return Variant(PADDED, dispatch, lambda handle: padded.combine(y), check)


def _close(ref: torch.Tensor, out: torch.Tensor, rtol: float, atol) -> bool:
    """Arithmetic checks: |out - ref| <= atol + rtol |ref| everywhere, no NaN."""
    ref, out = ref.double(), out.double()
    return ref.shape == out.shape and bool(((out - ref).abs() <= atol + rtol * ref.abs()).all())


def naive_variant(ctx, sets, exp: Expected, opts, fp8: bool) -> Variant:
    """nccl-naive, eager (it synchronises with the host). Its fp8 quantisation runs torch's ops on
    the device, whose division by a Python scalar rounds unlike the CPU reference (NOTES.md, run 1),
    and its combine's index_add_ adds in any order on GPUs: both are checked with a tolerance."""
    from baselines import naive_combine, naive_dispatch
    from moe_ep import reference

    rank, hidden, num_experts = ctx.rank, opts["hidden"], opts["num_experts"]

    def dispatch(i):
        xs, ids, ws = sets[i % NUM_INPUT_SETS]
        return naive_dispatch(xs[rank], ids[rank], ws[rank], num_experts, fp8, ctx.group)

    def combine(handle):
        received, state = handle
        return naive_combine(exp.y[:received.shape[0]], state, ctx.group)

    def check():
        handle = received, state = dispatch(0)
        mine, (_, ids, ws) = exp.mine, exp.inputs
        if received.shape[0] != mine.num_tokens:
            return False, handle
        received = received.cpu()
        size = payload_bytes("fp8" if fp8 else "bf16", hidden)
        topk = ids[0].shape[1]
        rows = mine.src.tolist()
        meta_ids = torch.stack([ids[s][t] for s, t in rows]).int() if rows else torch.zeros(0, topk, dtype=torch.int32)
        meta_weights = torch.stack([ws[s][t] for s, t in rows]) if rows else torch.zeros(0, topk)
        ok = (torch.equal(received[:, size:size + 4 * topk].view(torch.int32), meta_ids)
              and torch.equal(received[:, size + 4 * topk:size + 8 * topk].view(torch.float32), meta_weights))
        if fp8:
            codes = received[:, :hidden].view(torch.float8_e4m3fn)
            scales = received[:, hidden:size].view(torch.float32)
            got = reference.dequantize_fp8(codes, scales)
            want = reference.dequantize_fp8(mine.x, mine.x_scales)
            # one fp8 step at most where a scale's last bit differs
            ok = ok and _close(want, got, 2 ** -3, mine.x_scales.repeat_interleave(128, dim=1) * 2 ** -9)
        else:
            ok = ok and torch.equal(received[:, :size], mine.x.view(torch.uint8))
        z = combine(handle)
        return ok and _close(exp.z[None], z.cpu(), 2 ** -7, 1e-6), handle

    return Variant(NAIVE, dispatch, combine, check, graph=False, host=False)


# -- one rank of the moe_ep sweep -----------------------------------------------------------------

def _bench_rank(ctx, opts):
    import moe_ep
    from moe_ep import reference
    from moe_ep.kernels.peer_copy import launch_peer_copy, peer_copy_regions
    from moe_ep.timing import DeviceBarrier

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, topk, num_experts = opts["hidden"], opts["topk"], opts["num_experts"]
    _SWEEP_CLOCK[(world, "moe_ep")] = (time.monotonic(), 0)
    max_tokens = max(opts["tokens"])
    # A side heap for the barrier before each timed op and for the peer-copy limit.
    max_copy_bytes = max_tokens * (hidden * 2 + 64)
    barrier = DeviceBarrier(ctx.group, rank, world, dev, peer_copy_regions(world, max_copy_bytes))
    side, side_sync = barrier.heap, barrier.sync

    rows = []
    for dtype_name in opts["dtypes"]:
        dtype = torch.float8_e4m3fn if dtype_name == "fp8" else torch.bfloat16
        fp8 = dtype_name == "fp8"
        row_bytes = payload_bytes(dtype_name, hidden)
        buffers = {}
        for path in opts["paths"]:
            layout = {"mode": "ll", "layouts": (EXPERT,)} if path == EXPERT else \
                moe_ep.EpConfig.path_options(path, opts["gpus_per_node"])
            cfg = moe_ep.EpConfig(hidden=hidden, num_experts=num_experts, topk=topk, max_tokens_per_rank=max_tokens,
                                  dispatch_dtype=dtype, **layout,
                                  **({"inter_transport": opts["inter_transport"]} if path in INTER_PATHS else {}))
            buffers[path] = moe_ep.Buffer(ctx.group, cfg, check_inputs=False)
        for routing, num_tokens, sets in points(opts, world, dev):
            exp = expected_at(sets, rank, world, num_tokens, opts, dtype, dev)
            mine = exp.mine
            counts = Counts(int((mine.src[:, 0] != rank).sum()), mine.num_tokens, row_bytes, hidden)
            # Rows this rank sends across nodes (the inter path): one per (token, other node).
            per_node = opts["gpus_per_node"] or world
            node_hit = reference.destinations(exp.inputs[1][rank], num_experts, world).view(
                -1, world // per_node, per_node).any(dim=2)
            node_hit[:, rank // per_node] = False
            inter_rows = int(node_hit.sum())
            point = dict(world=world, dtype=dtype_name, routing=routing, tokens=num_tokens)
            timer = Timer(dev, barrier, opts)  # times the barrier at this point
            for path, buf in buffers.items():
                # The expert layout moves one row per (token, expert) pair, not per (token, rank).
                path_counts = _pair_counts(exp, rank, num_experts // world, row_bytes, hidden) if path == EXPERT \
                    else counts
                for spec in MOE_EP_VARIANTS:
                    if spec.applies(path, dtype_name, opts):
                        rows += run_variant(ctx, timer, moe_ep_variant(spec, ctx, path, buf, sets, exp, num_tokens,
                                                                       opts, inter_rows), point, path_counts)
            rows += run_variant(ctx, timer, padded_variant(ctx, sets, exp, num_tokens, opts, fp8), point, counts)
            rows += run_variant(ctx, timer, naive_variant(ctx, sets, exp, opts, fp8), point, counts)
            # The peer-to-peer limit: each rank sends, to every rank, the mean bytes it
            # dispatches there (a plain copy, no packing, no layout), with the fastest of the
            # programs-per-peer counts tried (a copy with too few programs is latency-bound:
            # 2 x H100, 58 MB a peer, 274 us with 16 a peer, 177 with 64; benchmarks/NOTES.md run 12).
            chunk = copy_chunk(counts.remote_rows * row_bytes, world)
            src = torch.randint(0, 1 << 30, (world, chunk), dtype=torch.int32, device=dev)
            copies = [timer.measure(lambda i, parts=parts: launch_peer_copy(side, side_sync, src, None, parts=parts,
                                                                            num_warps=opts["copy_warps"]), True)
                      for parts in opts["copy_parts"]]
            side_sync.check()
            fastest = min(copies, key=lambda t: median(t.replays))
            rows += report(ctx, point, COPY, {"dispatch": fastest}, {}, timer,
                           Counts((world - 1) * chunk * 4 / row_bytes, mine.num_tokens, row_bytes, hidden), True)
            if rank == 0 and opts["progress"]:
                _progress(rows, point, opts, "moe_ep")
        for buf in buffers.values():
            buf.close()
    barrier.close()
    return rows if rank == 0 else None


def _pair_counts(exp: Expected, rank: int, per_rank: int, row_bytes: int, hidden: int) -> Counts:
    """The rows the expert layout moves to this rank: one per (token, k) pair on its experts."""
    remote, everything = _pairs_received(exp.inputs[1], rank, per_rank)
    return Counts(remote, everything, row_bytes, hidden)


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
    from moe_ep.timing import DeviceBarrier

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, topk, num_experts = opts["hidden"], opts["topk"], opts["num_experts"]
    per_rank = num_experts // world
    max_tokens = max(opts["tokens"])
    rows = []
    _SWEEP_CLOCK[(world, "nvshmem")] = (time.monotonic(), 0)
    try:
        barrier = DeviceBarrier(ctx.group, rank, world, dev, backend="nvshmem")
        for dtype_name in opts["dtypes"]:
            vdev = VdevBaseline(ctx.group, max_tokens, hidden, num_experts, topk, dtype_name == "fp8", dev)
            for routing, num_tokens, sets in points(opts, world, dev):
                remote, everything = _pairs_received(sets[0][1], rank, per_rank)

                def check():  # the check a baseline gets: every pair arrived (splits summed on the device)
                    xs, ids, ws = sets[0]
                    handle = vdev.dispatch(xs[rank], ids[rank], ws[rank])
                    vdev.combine()
                    return int(handle[1][0].sum()) == everything, handle

                def dispatch(i):
                    xs, ids, ws = sets[i % NUM_INPUT_SETS]
                    return vdev.dispatch(xs[rank], ids[rank], ws[rank])

                point = dict(world=world, dtype=dtype_name, routing=routing, tokens=num_tokens)
                timer = Timer(dev, barrier, opts, graph=False)
                rows += run_variant(ctx, timer, Variant(VDEV, dispatch, lambda handle: vdev.combine(), check,
                                                        graph=False, host=False), point,
                                    Counts(remote, everything, vdev.row_bytes - 4, hidden))
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


_SWEEP_CLOCK: dict = {}  # (world, "moe_ep", "nvshmem" or "deepep") -> (start, points done), in rank 0's process


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
                date=datetime.date.today().isoformat(), host_python=platform.python_version(),
                baselines_not_run=[])


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


def _copy_us(sel_all, row):
    """The p2p copy time of the same bytes as ``row``: the dispatch dtype's rows for dispatch,
    bf16 rows for combine (the bf16 point's copy), both for the pair; None if not measured."""
    def copy(dtype):
        c = _lookup(sel_all, world=row["world"], routing=row["routing"], tokens=row["tokens"], dtype=dtype,
                    impl=COPY)
        return None if c is None else c["lat_avg_us"]

    parts = {"dispatch": [row["dtype"]], "combine": ["bf16"], "pair": [row["dtype"], "bf16"]}[row["op"]]
    times = [copy(d) for d in parts]
    return None if None in times else sum(times)


def _fmt(value, spec=".1f", missing="-"):
    return missing if value is None else format(value, spec)


def _markdown(rows, env, opts):
    gpu = env["gpus"] > 0
    lines = [f"# moe_ep benchmark: {env['gpus']} x {env['card']}",
             "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}; hidden "
             f"{opts['hidden']}, {opts['num_experts']} experts, top-{opts['topk']}; {opts['iters']} timed replays "
             f"of {opts['batch']} calls after {opts['warmup']} warm-up replays, each call behind a device barrier "
             f"whose own time (barrier column) is subtracted.",
             "",
             "Summary: latency = per-rank median, mean over ranks (us). nccl-padded: the padded, sync-free, "
             "graph-captured NCCL path of the same run; DeepEP: the faster of its normal and low-latency modes "
             "at the point (its normal mode takes fp8 input already quantised); ratios are baseline / moe_ep "
             "(above 1: moe_ep is faster). p2p copy: moe_ep's plain peer copy of the same remote bytes (bf16 "
             "rows for combine, both for the pair); 'of p2p copy' = copy time / moe_ep time. pair: a dispatch "
             "and its combine back to back, no barrier between them.",
             ""] + [f"Not run: {note}" for note in env.get("baselines_not_run", [])] + [""]
    if not gpu:
        lines += ["CPU ranks (Triton's interpreter): the times measure the interpreter, not a GPU; kernel time "
                  "needs a device profiler and is '-' here.", ""]
    for world in sorted({r["world"] for r in rows}):
        for dtype in sorted({r["dtype"] for r in rows}):
            for routing in sorted({r["routing"] for r in rows}):
                sel = [r for r in rows if r["world"] == world and r["dtype"] == dtype and r["routing"] == routing]
                if not sel:
                    continue
                sel_all = [r for r in rows if r["world"] == world]
                lines += [f"## EP{world}, {dtype} dispatch, {routing} routing", "",
                          "| tokens | impl | op | latency (us) | nccl-padded (us) | vs nccl-padded | DeepEP (us) | "
                          "vs DeepEP | p2p copy (us) | of p2p copy |",
                          "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
                for r in sorted((r for r in sel if r["impl"].startswith("moe_ep")),
                                key=lambda r: (r["tokens"], r["impl"], OPS.index(r["op"]))):
                    lat = r["lat_avg_us"]
                    n = _lookup(sel, tokens=r["tokens"], impl=PADDED, op=r["op"])
                    deep = [d for d in (_lookup(sel, tokens=r["tokens"], impl=i, op=r["op"]) for i in DEEPEP) if d]
                    best = min(deep, key=lambda d: d["lat_avg_us"]) if deep else None
                    copy = _copy_us(sel_all, r)
                    padded = "- | -" if n is None else f"{n['lat_avg_us']:.1f} | {n['lat_avg_us'] / lat:.2f}x"
                    versus = "- | -" if best is None else \
                        f"{best['lat_avg_us']:.1f} ({best['impl'].removeprefix('deepep-')}) | " \
                        f"{best['lat_avg_us'] / lat:.2f}x"
                    of_copy = "- | -" if copy is None else f"{copy:.1f} | {100 * copy / lat:.0f}%"
                    lines.append(f"| {r['tokens']} | {r['impl']} | {r['op']} | {lat:.1f} | {padded} | {versus} | "
                                 f"{of_copy} |")
                lines += ["", "Every row (kernel: device time of the op's kernels per call, profiler; host: one "
                          "eager call; barrier: subtracted; BW: bytes from other ranks / latency, GB/s):", "",
                          "| tokens | impl | op | latency min/avg/max (us) | p50 / p99 (us) | kernel (us) | "
                          "kernels/call | barrier (us) | host (us) | BW | mori BW | timed as |",
                          "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
                for r in sorted(sel, key=lambda r: (r["tokens"], r["impl"], (OPS + ("copy",)).index(r["op"]))):
                    lines.append(
                        f"| {r['tokens']} | {r['impl']} | {r['op']} | {r['lat_min_us']:.1f} / {r['lat_avg_us']:.1f} / "
                        f"{r['lat_max_us']:.1f} | {r['p50_us']:.1f} / {r['p99_us']:.1f} | {_fmt(r['kernel_us'])} | "
                        f"{_fmt(r['kernels_per_call'])} | {r['barrier_us']:.1f} | {_fmt(r['host_us'], '.0f')} | "
                        f"{r['bw_gbps']:.1f} | {r['bw_mori_gbps']:.1f} | {r['timed_as']} |")
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
                        if kind == "latency" and impl != COPY:
                            ax.plot(x, [p[1]["lat_avg_us"] for p in pts], marker="o", label=f"{impl} {op}")
                            ax.fill_between(x, [p[1]["lat_min_us"] for p in pts], [p[1]["lat_max_us"] for p in pts], alpha=0.2)
                        elif kind == "bandwidth":
                            ax.plot(x, [p[1]["bw_gbps"] for p in pts], marker="o", label=f"{impl} {op}")
                        elif kind == "speedup" and impl.startswith("moe_ep"):
                            for baseline in (PADDED,) + DEEPEP:
                                base = {r["tokens"]: r for r in sel if r["world"] == world and r["dtype"] == dtype
                                        and r["impl"] == baseline and r["op"] == op}
                                shared = [(t, p) for t, p in pts if t in base]
                                if shared:
                                    ax.plot([t for t, _ in shared], [base[t]["lat_avg_us"] / p["lat_avg_us"]
                                                                     for t, p in shared],
                                            marker="o" if baseline == PADDED else "s", label=f"{impl} {op} vs {baseline}")
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
    p.add_argument("--paths", default="ll,ht,auto",
                   help="ll, ht, auto, expert (the expert-major LL layout), and inter / inter_ht (need --gpus-per-node)")
    p.add_argument("--hooks", action="store_true",
                   help="also time the expert layout with return_recv_hook (send launch + hook back to back)")
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
    p.add_argument("--iters", type=int, default=20, help="timed replays (one CUDA-graph replay each)")
    p.add_argument("--batch", type=int, default=10, help="calls per replay")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--kineto", choices=("on", "off"), default="on",
                   help="kernel-only time from torch.profiler (GPUs; a few more replays per op)")
    p.add_argument("--copy-parts", default="32,64,128",
                   help="programs per peer of the p2p copies tried; the fastest is the limit")
    p.add_argument("--copy-warps", type=int, default=8)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<card>-x<gpus>)")
    p.add_argument("--nvshmem", choices=("auto", "on", "off"), default="auto",
                   help="time torch's NVSHMEM all_to_all_vdev_2d baseline (auto: on GPUs)")
    p.add_argument("--deepep", choices=("auto", "on", "off"), default="auto",
                   help="time DeepEP where deep_ep imports (auto/on: diagnose the import, record why it cannot "
                        "run; on: also fail the run then)")
    p.add_argument("--deepep-site", default=os.environ.get("MOE_EP_DEEPEP_SITE"),
                   help="folder deep_ep was installed into (pip --target), put first on sys.path")
    p.add_argument("--deepep-ll-max-tokens", type=int, default=256,
                   help="deepep-ll runs at points up to this many tokens per rank (its buffer grows with it)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run: 2 ranks (also as 2 simulated nodes), small shape, 1 call")
    return p.parse_args(argv)


def main(argv=None):
    import deepep_baseline
    from moe_ep.testing import RankPool

    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.smoke:
        device_kind, worlds = "cpu", [2]
        # uniform routing only: the skewed one differs in its inputs alone (and CI's minutes count)
        args.tokens, args.routings, args.hidden, args.num_experts, args.topk = "3", "uniform", 256, 8, 2
        args.iters, args.warmup, args.batch, args.copy_parts, args.copy_warps = 1, 0, 1, "1", 4
        args.paths, args.gpus_per_node = "ll,ht,inter_ht,expert", 1  # the other paths run the same code
        args.hooks = False  # (the hooks are tested; the smoke times the plain calls)
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
                prequantized=args.prequantized or args.smoke, zero_copy=args.zero_copy or args.smoke, hooks=args.hooks,
                kineto=args.kineto == "on", deepep_ll_max_tokens=args.deepep_ll_max_tokens,
                copy_parts=[int(v) for v in args.copy_parts.split(",")], copy_warps=args.copy_warps, progress=not args.smoke)
    env = _environment(device_kind, max(worlds) if device_kind == "cuda" else 0)
    env["kineto"] = opts["kineto"] and device_kind == "cuda"
    slug = env["card"].replace("NVIDIA ", "").replace(" ", "-").lower()
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{slug}-x{env['gpus']}")
    os.makedirs(out_dir, exist_ok=True)
    opts["partial"] = os.path.join(out_dir, "results.partial.jsonl")
    if os.path.exists(opts["partial"]):
        os.remove(opts["partial"])
    deepep = None
    if args.deepep != "off":
        deepep = env["deepep"] = deepep_baseline.diagnose(args.deepep_site)
        if not deepep["ok"]:
            env["baselines_not_run"].append(f"deepep: {deepep['reason']}")
            print(f"DeepEP does not run here: {deepep['reason']}", file=sys.stderr)
            if args.deepep == "on":
                raise SystemExit(f"--deepep on: {deepep['reason']}")
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
                env["baselines_not_run"].append(f"EP{world} nvshmem-vdev2d: {vdev['error']}")
        if deepep is not None and deepep["ok"]:
            with RankPool(world, device_kind) as pool:  # fresh processes: DeepEP's NVSHMEM and dlopen flags
                result = pool.run(deepep_baseline.bench_rank, opts, args.deepep_site, timeout=3600)[0]
            rows += result["rows"]
            for error in result["errors"]:
                print(f"EP{world}: DeepEP: {error}", file=sys.stderr)
                env["baselines_not_run"].append(f"EP{world} {error}")
    _write(rows, env, opts, out_dir)
    if os.path.exists(opts["partial"]):
        os.remove(opts["partial"])
    print(_markdown(rows, env, opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
