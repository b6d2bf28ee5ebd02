"""Every Triton kernel of the package compiles for NVIDIA sm_90 and AMD gfx942/gfx950, no GPU needed,
and moves its bf16/fp8 rows in vectors (see moe_ep.kernels.cross_compile)."""

import os
import subprocess
import sys


def test_every_kernel_compiles_for_nvidia_and_amd():
    env = dict(os.environ, TRITON_INTERPRET="0")
    # One process a target, side by side (each compile is single-threaded; three even out on
    # two cores better than NVIDIA beside both AMD targets).
    procs = {target: subprocess.Popen([sys.executable, "-m", "moe_ep.kernels.cross_compile", target], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for target in ("cuda", "hip:gfx942", "hip:gfx950")}
    for target, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{target}:\n{out}"
        assert "FAIL" not in out, out
        assert out.count("ok ") >= 3, out
        assert f" {target}" in out, out


def test_nvshmem_variants_build_up_to_the_link():
    """The inter-node kernels' NVSHMEM branches (SHMEM=True) type-check and lower to PTX; only the
    device library's symbols stay unresolved (see tests/shmem_build_check.py)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shmem_build_check.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert proc.stdout.count("reaches the link") >= 3, proc.stdout


def test_poll_sleep_follows_the_compile_target():
    """With $MOE_EP_POLL_SLEEP_NS a wait sleeps between polls: nanosleep in the PTX, s_sleep in
    the AMD assembly (one process compiles both, as CI does); without it, neither."""
    code = """
from moe_ep.kernels.cross_compile import compile_kernel, import_all_kernels
from moe_ep.kernels.registry import KERNELS
import_all_kernels()
spec = next(k for k in KERNELS if k.name == "_barrier_kernel")
ptx = compile_kernel(spec, "cuda", 90, 32).asm["ptx"]
gcn = compile_kernel(spec, "hip", "gfx942", 64).asm["amdgcn"]
print(ptx.count("nanosleep"), gcn.count("s_sleep"))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for ns, expected in (("200", "1 1"), ("0", "0 0")):
        env = dict(os.environ, TRITON_INTERPRET="0", MOE_EP_POLL_SLEEP_NS=ns,
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.split() == expected.split(), (ns, proc.stdout)
