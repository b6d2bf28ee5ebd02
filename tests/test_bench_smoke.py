"""The benchmark runs end to end on CPU ranks (tiny shape), so it cannot rot."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ep.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    impls = {(r["impl"], r["op"]) for r in rows}
    assert {("moe_ep-ll", "dispatch"), ("moe_ep-ll", "combine"), ("nccl", "dispatch"), ("nccl", "combine"),
            ("p2p-copy", "copy"), ("moe_ep-ll-prequant", "dispatch"), ("moe_ep-inter_ht-prequant", "dispatch"),
            ("moe_ep-ht-zc", "dispatch"), ("moe_ep-ht-prequant-zc", "dispatch")} <= impls
    assert all(r["lat_avg_us"] > 0 and r["lat_min_us"] <= r["lat_avg_us"] <= r["lat_max_us"] for r in rows)
    assert {r["tokens"] for r in rows} == {3} and {r["dtype"] for r in rows} == {"fp8", "bf16"}
    assert {r["impl"] for r in rows} >= {"moe_ep-ll", "moe_ep-ht", "moe_ep-inter_ht"}
    assert all(r["bw_internode_gbps"] > 0 for r in rows if r["impl"] == "moe_ep-inter_ht")
    assert result["environment"]["commit"] and result["environment"]["torch"]
    for name in ("results.csv", "results.md", "latency.png", "bandwidth.png", "speedup.png"):
        assert (tmp_path / name).stat().st_size > 0, name


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
