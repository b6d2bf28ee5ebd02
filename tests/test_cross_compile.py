"""Every Triton kernel of the package compiles for NVIDIA sm_90 and AMD gfx942/gfx950, no GPU needed,
and moves its bf16/fp8 rows in vectors (see moe_ep.kernels.cross_compile)."""

import os
import subprocess
import sys


def test_every_kernel_compiles_for_nvidia_and_amd():
    env = dict(os.environ, TRITON_INTERPRET="0")
    # The NVIDIA and AMD compiles run side by side (each is single-threaded).
    procs = {backend: subprocess.Popen([sys.executable, "-m", "moe_ep.kernels.cross_compile", backend], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for backend in ("cuda", "hip")}
    for backend, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{backend}:\n{out}"
        assert "FAIL" not in out, out
        assert out.count("ok ") >= 3, out
        assert f" {backend}:" in out, out
