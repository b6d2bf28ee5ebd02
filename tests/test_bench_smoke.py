"""The benchmarks run end to end on CPU ranks (tiny shape), so they cannot rot; the parts of the
benchmark that need a GPU (profiler sums, DeepEP's loader, the baseline's compiled kernels) are
checked here without one."""

import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ep.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    impls = {(r["impl"], r["op"]) for r in rows}
    main = ("moe_ep-ll", "moe_ep-ht", "moe_ep-inter_ht", "nccl-padded", "nccl-naive")
    assert {(impl, op) for impl in main for op in ("dispatch", "combine", "pair")} <= impls
    assert {("p2p-copy", "copy"), ("moe_ep-ll-prequant", "dispatch"), ("moe_ep-inter_ht-prequant", "dispatch"),
            ("moe_ep-ht-zc", "dispatch"), ("moe_ep-ht-prequant-zc", "dispatch")} <= impls
    assert all(r["lat_avg_us"] > 0 and r["lat_min_us"] <= r["lat_avg_us"] <= r["lat_max_us"] for r in rows)
    assert all(0 < r["p50_us"] <= r["p99_us"] and r["barrier_us"] > 0 and r["percentiles_over"] == "calls"
               for r in rows)
    # GPU-only figures are absent on CPU ranks, never made up.
    assert all(r["kernel_us"] is None and r["kernels_per_call"] is None and r["timed_as"] == "cpu" for r in rows)
    assert all(r["host_us"] > 0 for r in rows if r["impl"] in ("moe_ep-ll", "nccl-padded") and r["op"] != "pair")
    assert {r["tokens"] for r in rows} == {3} and {r["dtype"] for r in rows} == {"fp8", "bf16"}
    assert all(r["bw_internode_gbps"] > 0 for r in rows if r["impl"] == "moe_ep-inter_ht")
    env = result["environment"]
    assert env["commit"] and env["torch"] and env["kineto"] is False
    assert env["deepep"]["ok"] is False and "deep_ep is not installed" in env["deepep"]["reason"]
    assert any(note.startswith("deepep: ") for note in env["baselines_not_run"])
    with open(tmp_path / "results.csv") as f:
        assert next(csv.reader(f)) == list(rows[0].keys())
    markdown = (tmp_path / "results.md").read_text()
    assert "| tokens | impl | op | latency (us) | nccl-padded (us) | vs nccl-padded | DeepEP (us) | vs DeepEP | " \
           "p2p copy (us) | of p2p copy |" in markdown
    assert "Not run: deepep: " in markdown and "kernel time needs a device profiler" in markdown
    for name in ("results.csv", "results.md", "latency.png", "bandwidth.png", "speedup.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_kernel_seconds_sums_device_activity_per_call():
    """The profiler figure: device activities (not the barrier's kernel, not host events) summed
    and divided by the calls."""
    from torch.autograd import DeviceType

    from bench_timing import kernel_seconds

    def event(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("_barrier_kernel", DeviceType.CUDA, 7.0), event("_padded_pack_kernel", DeviceType.CUDA, 3.0),
              event("ncclDevKernel_SendRecv", DeviceType.CUDA, 9.0), event("Memset (Device)", DeviceType.CUDA, 1.0),
              event("cudaGraphLaunch", DeviceType.CPU, 50.0)] * 4
    seconds, per_call = kernel_seconds(events, calls=2)
    assert seconds == pytest.approx(4 * 13.0 / 2 / 1e6) and per_call == 6.0


def _fake_deep_ep(site, body):
    package = site / "deep_ep"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return str(site)


def test_deepep_diagnosis_without_a_gpu(tmp_path, capsys, monkeypatch):
    """deepep_baseline's loader fails cleanly, with the reason, where DeepEP cannot run: not
    installed; installed but no CUDA device (the command line, and bench_ep's subprocess)."""
    import deepep_baseline

    missing = deepep_baseline.diagnose(None)
    assert missing["ok"] is False and "deep_ep is not installed" in missing["reason"]
    bad_site = deepep_baseline.diagnose(str(tmp_path / "nowhere"))
    assert bad_site["ok"] is False and "is not a folder" in bad_site["reason"]
    site = _fake_deep_ep(tmp_path / "site", "raise ImportError('should not be imported without a GPU')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command line puts the site on it
    result = deepep_baseline.diagnose(site)  # found: the import runs in a subprocess
    assert result["ok"] is False and result["reason"].startswith("no CUDA device"), result
    assert any("found" in step for step in result["steps"]), result
    assert deepep_baseline.main(["--site", site]) == 1  # the command line
    assert "deep_ep does not load: no CUDA device" in capsys.readouterr().out


def test_deepep_loader_retries_undefined_symbols_lazily(tmp_path, monkeypatch):
    """An extension built against a newer torch names an undefined symbol at import: the loader
    retries with RTLD_LAZY | RTLD_GLOBAL and says so; any other import error is the reason."""
    import torch

    import deepep_baseline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(sys, "path", list(sys.path))
    site = _fake_deep_ep(tmp_path / "lazy", "import os, sys\n"
                         "if not sys.getdlopenflags() & os.RTLD_LAZY or sys.getdlopenflags() & os.RTLD_NOW:\n"
                         "    raise ImportError('_C.so: undefined symbol: _ZN3c109TypeErrorC1Ev')\n"
                         "Buffer = object\n")
    steps = []
    module = deepep_baseline.load_deep_ep(site, steps)
    assert module.Buffer is object and sys.getdlopenflags() & os.RTLD_NOW
    assert any("undefined symbol _ZN3c109TypeErrorC1Ev" in s for s in steps), steps
    assert "RTLD_LAZY | RTLD_GLOBAL" in steps[-1], steps
    sys.modules.pop("deep_ep")
    broken = _fake_deep_ep(tmp_path / "broken",
                           "raise ImportError('libnvshmem_host.so.3: cannot open shared object')\n")
    try:
        with pytest.raises(deepep_baseline.DeepEPUnavailable, match="libnvshmem_host.so.3: cannot open"):
            deepep_baseline.load_deep_ep(broken)
    finally:
        sys.modules.pop("deep_ep", None)


def test_padded_baseline_kernels_compile_for_nvidia():
    """nccl-padded's two kernels compile for sm_90 and move their rows in vectors (no 1- or
    2-byte global accesses), as moe_ep's own kernels must (moe_ep.kernels.cross_compile)."""
    code = ("import baselines\n"
            "from moe_ep.kernels.cross_compile import compile_kernel, element_sized_accesses\n"
            "for spec in baselines.PADDED_KERNELS:\n"
            "    ptx = compile_kernel(spec, 'cuda', 90, 32).asm['ptx']\n"
            "    print(spec.name, spec.constexprs.get('FP8'), element_sized_accesses(ptx))\n")
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert [line.split()[-1] for line in lines if line] == ["0", "0", "0"], proc.stdout


def test_phase_diagnostics_smoke():
    """benchmarks/dispatch_phases.py and combine_phases.py run end to end on CPU ranks (tiny
    shape, one variant each) and report a positive time for every phase."""
    tiny = ["--world", "2", "--tokens", "4", "--hidden", "256", "--num-experts", "8", "--topk", "2", "--paths",
            "ht", "--copy-parts", "2", "--iters", "1", "--batch", "1"]
    variant = "send_programs=3"
    for script, times in (("dispatch_phases.py", ("dispatch_us", "prequantized_us", "zero_copy_us", "stage_us")),
                          ("combine_phases.py", ("combine_us", "send_phase_us"))):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *tiny, "--variants", variant],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ranks = [json.loads(line.split(": ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("rank ")]
        assert len(ranks) == 2, proc.stdout
        for result in ranks:
            (path,) = result  # "ht", or "ht/parts4" for the combine
            for name in ("default", variant):
                assert all(result[path][name][t] > 0 for t in times), (script, result)
            assert result[path]["p2p_copy_us_parts2"] > 0 and result[path]["p2p_pull_us_parts2"] > 0
