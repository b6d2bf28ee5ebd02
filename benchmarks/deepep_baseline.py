"""DeepEP (SGLang's ``sgl-deep-ep`` wheel) as a baseline of bench_ep, on the same GPUs, where it loads.

    python benchmarks/deepep_baseline.py [--site DIR] [--json] [--probe]

says whether ``deep_ep`` imports here and, if not, exactly why (exit status 0 if it loads, 1 if
not); ``--probe`` then also runs its first steps on GPU 0 as a one-rank group (``probe``).
``bench_ep.py --deepep-site DIR`` runs ``diagnose`` first (the import in a subprocess: a broken
extension can crash the process that loads it), records the reason where it cannot load
(results.json: environment.deepep and baselines_not_run) and otherwise runs ``bench_rank`` on
fresh rank processes: rows ``deepep-normal`` (intranode mode) and ``deepep-ll`` (low-latency
mode), checked against moe_ep.reference and timed exactly as moe_ep (bench_ep's ``run_variant``).

How ``load_deep_ep`` imports it:
  1. ``site`` (the folder of ``pip install --target``) goes first on sys.path; no ``deep_ep``
     there or anywhere on sys.path: "not installed".
  2. The extension needs ``libnvshmem_host.so.3`` and carries the build machine's RUNPATH
     (/opt/python/...): the nvidia-nvshmem-cu13 copy found on sys.path (the one torch uses) is
     preloaded with RTLD_GLOBAL, so the dynamic linker finds it by its soname.
  3. A plain import; if the extension names an undefined symbol (the wheels are built for a newer
     torch: benchmarks/NOTES.md, issue 22), again with RTLD_LAZY | RTLD_GLOBAL, which binds
     functions at their first call: an import that then succeeds runs until a missing function
     is called (those found are error paths), and the diagnosis says so.

The modes, at bench_ep's points (same inputs, same barrier before each call, same graphs):
  deepep-normal  ``Buffer(group, num_nvl_bytes)``: ``get_dispatch_layout`` + ``dispatch`` with
                 ``num_worst_tokens = world x tokens`` (no host synchronisation: graph-safe; the
                 outputs have that many rows) and ``combine`` (unweighted sum). Its fp8 dispatch
                 takes (codes, scales) already quantised (it does not quantise), so its fp8 rows
                 compare with moe_ep's ``-prequant`` work, and flatter DeepEP against the others.
  deepep-ll      ``Buffer(group, 0, num_rdma_bytes, low_latency_mode=True)``:
                 ``low_latency_dispatch`` (quantises itself for fp8; expert-major output) and
                 ``low_latency_combine`` (weighted sum), at points of at most
                 ``--deepep-ll-max-tokens`` tokens (its buffers grow with that capacity).
Checks: every received row bit for bit (fp8 LL: its own quantisation, within one fp8 step of
the input), in any order within a source rank; combines within a bf16 rounding of the reference.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NVSHMEM_HOST = "libnvshmem_host.so.3"


class DeepEPUnavailable(RuntimeError):
    """deep_ep cannot be imported here; the message says why."""


def _forget_deep_ep() -> None:
    for name in [n for n in sys.modules if n == "deep_ep" or n.startswith(("deep_ep.", "deep_ep_cpp"))]:
        del sys.modules[name]


def _distribution_version(site: str | None) -> str | None:
    from importlib import metadata

    for dist in metadata.distributions(path=([site] if site else []) + sys.path):
        if (dist.metadata["Name"] or "").lower() in ("sgl-deep-ep", "deep-ep", "deep_ep"):
            return f"{dist.metadata['Name']} {dist.version}"
    return None


def _nvshmem_host_library() -> str | None:
    for entry in sys.path:
        found = glob.glob(os.path.join(entry or ".", "nvidia", "nvshmem", "lib", NVSHMEM_HOST))
        if found:
            return found[0]
    return None


def _locate(site: str | None):
    """deep_ep's import spec, with ``site`` first on sys.path; raises DeepEPUnavailable if absent."""
    if site and not os.path.isdir(site):
        raise DeepEPUnavailable(f"--deepep-site {site} is not a folder")
    saved = list(sys.path)
    try:
        if site:
            sys.path.insert(0, site)
        spec = importlib.util.find_spec("deep_ep")
    finally:
        sys.path[:] = saved
    if spec is None:
        where = f" (nor in {site})" if site else ""
        raise DeepEPUnavailable(f"deep_ep is not installed: no module deep_ep on sys.path{where}; install the "
                                f"sgl-deep-ep wheel with pip install --no-deps --target DIR and pass --deepep-site DIR")
    return spec


def load_deep_ep(site: str | None = None, steps: list | None = None):
    """Import deep_ep as the module docstring says; returns the module, or raises
    DeepEPUnavailable with the reason. ``steps`` (a list) receives what was done, in words."""
    import ctypes

    steps = [] if steps is None else steps
    spec = _locate(site)
    if site and site not in sys.path:
        sys.path.insert(0, site)
    steps.append(f"found {spec.origin} ({_distribution_version(site) or 'no distribution metadata'})")
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise DeepEPUnavailable(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}), "
                                f"torch.cuda.is_available() = {torch.cuda.is_available()}; DeepEP runs on NVIDIA GPUs")
    library = _nvshmem_host_library()
    if library:
        try:
            ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
            steps.append(f"preloaded {library}")
        except OSError as err:
            steps.append(f"could not preload {library}: {err}")
    else:
        steps.append(f"no {NVSHMEM_HOST} under nvidia/nvshmem/lib on sys.path; left to the dynamic linker")
    try:
        module = importlib.import_module("deep_ep")
        steps.append("imported with Python's default dlopen flags")
        return module
    except ImportError as err:
        missing = re.search(r"undefined symbol: (\S+)", str(err))
        if missing is None:
            raise DeepEPUnavailable(f"import deep_ep failed: {type(err).__name__}: {err}") from err
        steps.append(f"plain import failed: undefined symbol {missing.group(1)}")
    except Exception as err:  # noqa: BLE001 — any failure of the package's own init is the reason
        raise DeepEPUnavailable(f"import deep_ep failed: {type(err).__name__}: {err}") from err
    _forget_deep_ep()
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
    try:
        module = importlib.import_module("deep_ep")
    except Exception as err:  # noqa: BLE001
        raise DeepEPUnavailable(f"import deep_ep failed even with RTLD_LAZY | RTLD_GLOBAL: {type(err).__name__}: "
                                f"{err} (after: {'; '.join(steps)})") from err
    finally:
        sys.setdlopenflags(flags)
    steps.append(f"imported with RTLD_LAZY | RTLD_GLOBAL: {missing.group(1)} stays unresolved until called")
    return module


def diagnose(site: str | None = None, timeout: float = 180.0) -> dict:
    """Whether deep_ep loads here: {"ok", "reason" (None when ok), "steps", "module"}. The import
    runs in a subprocess (a crash is reported with its signal); a package that is not even on
    sys.path is reported without one."""
    try:
        _locate(site)
    except DeepEPUnavailable as err:
        return {"ok": False, "reason": str(err), "steps": [], "module": None}
    command = [sys.executable, os.path.abspath(__file__), "--json"] + (["--site", site] if site else [])
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"import deep_ep did not finish in {timeout:.0f} s", "steps": [],
                "module": None}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode < 0 or not lines:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return {"ok": False, "reason": f"import deep_ep crashed the process ({how}): {proc.stderr.strip()[-800:]}",
                "steps": [], "module": None}
    return json.loads(lines[-1])


def _diagnose_here(site: str | None) -> dict:
    steps = []
    try:
        module = load_deep_ep(site, steps)
    except DeepEPUnavailable as err:
        return {"ok": False, "reason": str(err), "steps": steps, "module": None}
    buffer = getattr(module, "Buffer", None)
    if buffer is None:
        return {"ok": False, "reason": "deep_ep imported but has no Buffer", "steps": steps, "module": module.__file__}
    if hasattr(buffer, "is_sm90_compiled"):
        steps.append(f"Buffer.is_sm90_compiled() = {buffer.is_sm90_compiled()}")
    return {"ok": True, "reason": None, "steps": steps, "module": module.__file__}


# -- the benchmark ----------------------------------------------------------------------------------

def bench_rank(ctx, opts, site):
    """One rank of the DeepEP sweep (bench_ep's points and timing). Rank 0 returns {"rows": rows,
    "errors": [why a mode stopped, ...]}; the others None. A mode that fails (its check included)
    is reported in ``errors`` and the other mode still runs."""
    import torch.distributed as dist

    from moe_ep.timing import DeviceBarrier

    deep_ep = load_deep_ep(site)
    barrier = DeviceBarrier(ctx.group, ctx.rank, ctx.world_size, ctx.device)
    rows, errors = [], []
    for mode, bench in (("normal", _bench_normal), ("ll", _bench_ll)):
        error = None
        try:
            rows += bench(deep_ep, ctx, opts, barrier)
        except Exception as err:  # noqa: BLE001 — a mode that cannot run here is reported, not fatal
            error = f"deepep-{mode}: {type(err).__name__}: {err}"
        every = [None] * ctx.world_size
        dist.all_gather_object(every, error, group=ctx.group)
        failed = [(i, e) for i, e in enumerate(every) if e]
        if failed:
            errors.append(f"{failed[0][1]} (rank {failed[0][0]})")
    barrier.close()
    return {"rows": rows, "errors": errors} if ctx.rank == 0 else None


def _deep_inputs(ctx, sets, fp8: bool, prequantize: bool):
    """Per input set: (x as DeepEP takes it, topk_idx int64, topk_weights float32) of this rank."""
    from moe_ep import reference

    prepared = []
    for xs, ids, ws in sets:
        x = xs[ctx.rank]
        if fp8 and prequantize:
            x = tuple(t.to(ctx.device) for t in reference.quantize_fp8(x.cpu()))
        prepared.append((x, ids[ctx.rank].long(), ws[ctx.rank].float()))
    return prepared


def _bench_normal(deep_ep, ctx, opts, barrier) -> list:
    import bench_ep as bench

    world, rank, hidden, num_experts = ctx.world_size, ctx.rank, opts["hidden"], opts["num_experts"]
    buffer_cls = deep_ep.Buffer
    nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden * 2, world)
                    for config in (buffer_cls.get_dispatch_config(world), buffer_cls.get_combine_config(world)))
    buffer = buffer_cls(ctx.group, nvl_bytes, 0)
    rows = []
    for dtype_name in opts["dtypes"]:
        fp8 = dtype_name == "fp8"
        dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
        for routing, num_tokens, sets in bench.points(opts, world, ctx.device):
            exp = bench.expected_at(sets, rank, world, num_tokens, opts, dtype, ctx.device)
            prepared = _deep_inputs(ctx, sets, fp8, prequantize=True)
            worst = world * num_tokens
            y_recv = torch.zeros(max(worst, 1), hidden, dtype=torch.bfloat16, device=ctx.device)

            def dispatch(i, prepared=prepared, worst=worst):
                x, idx, weights = prepared[i % bench.NUM_INPUT_SETS]
                per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
                recv_x, recv_idx, recv_weights, _, handle, _ = buffer.dispatch(
                    x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                    num_tokens_per_expert=per_expert, num_worst_tokens=worst)
                return recv_x, recv_idx, recv_weights, handle

            def combine(handle, y_recv=y_recv):
                return buffer.combine(y_recv, handle[3])[0]

            def check(exp=exp, y_recv=y_recv, dispatch=dispatch, combine=combine, fp8=fp8):
                recv_x, recv_idx, recv_weights, handle = result = dispatch(0)
                mine = exp.mine
                prefix = handle[0][:, rank].cpu().long()  # rank_prefix_matrix[s][rank]: rows from ranks <= s
                n = int(prefix[-1])
                if n != mine.num_tokens:
                    return False, result
                sources = torch.repeat_interleave(torch.arange(world), torch.diff(prefix, prepend=prefix.new_zeros(1)))
                src = torch.stack([sources, handle[3][:n].cpu().long()], dim=1).int()
                order = torch.argsort(src[:, 0].long() * (num_tokens + 1) + src[:, 1].long())
                codes = recv_x[0] if fp8 else recv_x
                here = mine.topk_ids >= 0
                ok = (torch.equal(src[order], mine.src)
                      and torch.equal(codes[:n].cpu()[order].view(torch.uint8), mine.x.view(torch.uint8))
                      and torch.equal(recv_idx[:n].cpu()[order].int(), mine.topk_ids)
                      and torch.equal(recv_weights[:n].cpu()[order][here], mine.topk_weights[here]))
                if fp8:
                    ok = ok and torch.equal(recv_x[1][:n].cpu()[order], mine.x_scales)
                rows_of = torch.empty_like(order)
                rows_of[order] = torch.arange(n)  # DeepEP row j holds the reference's row rows_of[j]
                y_recv[:n] = exp.y[:n][rows_of.to(ctx.device)]
                z = combine(result)
                return ok and bench._close(exp.z[None], z.cpu(), 2 ** -7, 1e-6), result

            point = dict(world=world, dtype=dtype_name, routing=routing, tokens=num_tokens)
            counts = bench.Counts(int((exp.mine.src[:, 0] != rank).sum()), exp.mine.num_tokens,
                                  bench.payload_bytes(dtype_name, hidden), hidden)
            rows += bench.run_variant(ctx, bench.Timer(ctx.device, barrier, opts),
                                      bench.Variant("deepep-normal", dispatch, combine, check), point, counts)
    return rows


def _ll_expert_output(x: torch.Tensor, global_expert: int) -> torch.Tensor:
    """What the LL check's experts return for token rows ``x`` [n, hidden] bf16: x times a factor
    of the expert, in bf16 (a function of (token, expert) that the source rank can recompute)."""
    return (x.float() * (1.0 + (global_expert % 4) / 4)).to(torch.bfloat16)


def _bench_ll(deep_ep, ctx, opts, barrier) -> list:
    import bench_ep as bench
    from moe_ep import reference

    world, rank, hidden, num_experts = ctx.world_size, ctx.rank, opts["hidden"], opts["num_experts"]
    tokens = [t for t in opts["tokens"] if t <= opts["deepep_ll_max_tokens"]]
    if not tokens:
        return []
    if opts["batch"] % 2:
        raise ValueError(f"--batch {opts['batch']} must be even: DeepEP's LL mode alternates two buffers per call, "
                         f"and a replayed graph must leave them as it found them")
    capacity = max(tokens)
    local_experts = num_experts // world
    buffer = deep_ep.Buffer(ctx.group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(
        capacity, hidden, world, num_experts), low_latency_mode=True, num_qps_per_rank=local_experts)
    ll_opts = dict(opts, tokens=tokens)
    rows = []
    for dtype_name in opts["dtypes"]:
        fp8 = dtype_name == "fp8"
        dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
        for routing, num_tokens, sets in bench.points(ll_opts, world, ctx.device):
            exp = bench.expected_at(sets, rank, world, num_tokens, opts, dtype, ctx.device)
            prepared = _deep_inputs(ctx, sets, fp8, prequantize=False)
            y_ll = torch.zeros(local_experts, capacity * world, hidden, dtype=torch.bfloat16, device=ctx.device)

            def dispatch(i, prepared=prepared, fp8=fp8):
                x, idx, _ = prepared[i % bench.NUM_INPUT_SETS]
                recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, idx, capacity, num_experts,
                                                                               use_fp8=fp8)
                return recv_x, recv_count, handle, i % bench.NUM_INPUT_SETS

            def combine(result, prepared=prepared, y_ll=y_ll):
                _, idx, weights = prepared[result[3]]
                return buffer.low_latency_combine(y_ll, idx, weights, result[2])[0]

            def check(exp=exp, y_ll=y_ll, dispatch=dispatch, combine=combine, fp8=fp8):
                recv_x, recv_count, handle, _ = result = dispatch(0)
                xs, ids, weights = exp.inputs
                src_info, layout_range = handle[0].cpu(), handle[1].cpu()
                codes = (recv_x[0] if fp8 else recv_x).cpu()
                scales = recv_x[1].cpu() if fp8 else None
                ok = True
                for e in range(local_experts):
                    expert = rank * local_experts + e
                    total = 0
                    for s in range(world):
                        packed = int(layout_range[e, s])
                        begin, count = packed >> 32, packed & 0xFFFFFFFF
                        got = src_info[e, begin:begin + count].long()
                        want = (ids[s] == expert).any(dim=1).nonzero().flatten()
                        ok = ok and torch.equal(got.sort().values, want)
                        if not ok:
                            return False, result
                        total += count
                        rows_x = codes[e, begin:begin + count]
                        if fp8:
                            value = reference.dequantize_fp8(rows_x, scales[e, begin:begin + count].contiguous())
                            step = scales[e, begin:begin + count].repeat_interleave(128, dim=1) * 2 ** -9
                            ok = ok and bench._close(xs[s][got].float(), value, 2 ** -3, step)
                        else:
                            ok = ok and torch.equal(rows_x.view(torch.uint8), xs[s][got].view(torch.uint8))
                        y_ll[e, begin:begin + count] = _ll_expert_output(xs[s][got], expert).to(ctx.device)
                    ok = ok and total == int(recv_count[e])
                want = torch.zeros(num_tokens, hidden, dtype=torch.float32)
                for k in range(ids[rank].shape[1]):
                    for expert in ids[rank][:, k].unique().tolist():
                        if expert >= 0:
                            sel = ids[rank][:, k] == expert
                            want[sel] += weights[rank][sel, k:k + 1] * _ll_expert_output(xs[rank][sel], expert).float()
                z = combine(result)
                return ok and bench._close(want.to(torch.bfloat16), z.cpu(), 2 ** -7, 1e-5), result

            point = dict(world=world, dtype=dtype_name, routing=routing, tokens=num_tokens)
            counts = bench.Counts(int((exp.mine.src[:, 0] != rank).sum()), exp.mine.num_tokens,
                                  bench.payload_bytes(dtype_name, hidden), hidden)
            rows += bench.run_variant(ctx, bench.Timer(ctx.device, barrier, opts),
                                      bench.Variant("deepep-ll", dispatch, combine, check), point, counts)
    return rows


def probe(deep_ep, hidden: int = 7168, num_experts: int = 256, topk: int = 8, num_tokens: int = 16) -> list:
    """Run DeepEP on this one GPU as a 1-rank group (gloo): an intranode Buffer and its layout
    kernel (its dispatch needs 2+ ranks), and a low-latency Buffer (NVSHMEM initialised) with a
    dispatch + combine. Returns one
    line per step, "ok: ..." or "FAILED: ..."; a step's failure does not stop the next. What
    passes here has loaded its kernels (sm_90) and run them beside this torch."""
    import torch.distributed as dist

    from moe_ep.testing import free_port

    lines = []
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    group = dist.group.WORLD
    x = torch.randn(num_tokens, hidden, device=device).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, device=device)[:topk] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, topk, device=device)

    def step(name, fn):
        try:
            lines.append(f"ok: {name}: {fn()}")
        except Exception as err:  # noqa: BLE001 — every step is reported
            lines.append(f"FAILED: {name}: {type(err).__name__}: {err}")

    buffers = {}

    def normal_buffer():
        buffers["normal"] = deep_ep.Buffer(group, 1 << 28, 0)
        return "Buffer(group, 256 MiB NVLink buffer)"

    def normal_ops():  # its intranode dispatch needs 2, 4 or 8 ranks: only the layout kernel runs on one
        per_rank, _, per_expert, in_rank, _ = buffers["normal"].get_dispatch_layout(idx, num_experts)
        torch.cuda.synchronize()
        counts = (int(per_rank.sum()), int(per_expert.sum()), bool(in_rank.all()))
        return f"get_dispatch_layout: (tokens to the rank, pairs to its experts, all in rank) = {counts}, " \
               f"expected {(num_tokens, num_tokens * topk, True)}"

    def ll_buffer():
        size = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, 1, num_experts)
        buffers["ll"] = deep_ep.Buffer(group, 0, size, low_latency_mode=True, num_qps_per_rank=num_experts)
        return f"Buffer(low_latency_mode=True, {size >> 20} MiB NVSHMEM buffer)"

    def ll_ops():
        buffer = buffers["ll"]
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, idx, num_tokens, num_experts, use_fp8=True)
        y = torch.zeros(recv_x[0].shape, dtype=torch.bfloat16, device=device)
        combined = buffer.low_latency_combine(y, idx, weights, handle)[0]
        torch.cuda.synchronize()
        return f"fp8 dispatch ({int(recv_count.sum())} rows for {num_tokens * topk} pairs) and combine " \
               f"({tuple(combined.shape)})"

    step("intranode Buffer", normal_buffer)
    if "normal" in buffers:
        step("intranode layout kernel", normal_ops)
    step("low-latency Buffer", ll_buffer)
    if "ll" in buffers:
        step("low-latency ops", ll_ops)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", default=os.environ.get("MOE_EP_DEEPEP_SITE"),
                   help="folder deep_ep was installed into (pip install --no-deps --target)")
    p.add_argument("--json", action="store_true", help="one JSON line (what diagnose reads)")
    p.add_argument("--probe", action="store_true",
                   help="where it loads, also run DeepEP on GPU 0 as one rank (probe): its kernels beside this torch")
    args = p.parse_args(argv)
    result = _diagnose_here(args.site)
    if args.json:
        print(json.dumps(result))
        return 0
    for step in result["steps"]:
        print(f"  {step}")
    print("deep_ep loads" if result["ok"] else f"deep_ep does not load: {result['reason']}")
    if not result["ok"]:
        return 1
    if args.probe:
        lines = probe(sys.modules["deep_ep"])
        print("\n".join(lines))
        return 0 if all(line.startswith("ok") for line in lines) else 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    raise SystemExit(main())
