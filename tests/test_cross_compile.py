"""Every Triton kernel of the package compiles for NVIDIA sm_90 and AMD gfx942/gfx950, no GPU needed,
moves its bf16/fp8 rows in vectors, and, on AMD, waits for its stores in every release (see
moe_ep.kernels.cross_compile)."""

import os
import re
import subprocess
import sys

import pytest

from moe_ep.kernels.cross_compile import unordered_releases


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
        if target.startswith("hip"):  # every kernel's release sequences were read, and there were some
            releases = [int(n) for n in re.findall(r"(\d+) releases ordered", out)]
            assert len(releases) == out.count("ok ") and sum(releases) > 0, out


# A release at system scope as LLVM's memory model writes it for gfx942 (write-back, wait, atomic),
# and as the LLVM of Triton 3.6 wrote it at most of moe_ep's sites (no vmcnt(0) after the write-back).
_ORDERED = """
	global_store_dwordx4 v[0:1], v[2:5], off
	buffer_wbl2 sc0 sc1
	s_waitcnt vmcnt(0) lgkmcnt(0)
	global_atomic_swap v[4:5], v2, off sc1
"""
_UNORDERED = """
	global_store_dwordx4 v[0:1], v[2:5], off
	buffer_wbl2 sc0 sc1
	s_waitcnt lgkmcnt(0)
	global_atomic_swap v[4:5], v2, off sc1
"""


def test_release_checker_flags_a_missing_wait():
    assert unordered_releases(_ORDERED) == []
    assert unordered_releases(_ORDERED.replace("vmcnt(0) lgkmcnt(0)", "0")) == []  # every counter
    assert unordered_releases(_ORDERED.replace("lgkmcnt(0)", "\n\ts_waitcnt lgkmcnt(0)")) == []  # split waits
    flagged = unordered_releases(_UNORDERED)
    assert len(flagged) == 1 and "buffer_wbl2 sc0 sc1" in flagged[0] and "global_atomic_swap" in flagged[0], flagged
    # A wait for some stores only, a plain store, a flat or buffer atomic, a branch or the end first: flagged.
    assert len(unordered_releases(_ORDERED.replace("vmcnt(0)", "vmcnt(1)"))) == 1
    assert len(unordered_releases(_UNORDERED.replace("global_atomic_swap v[4:5], v2, off sc1",
                                                     "global_store_dword v[4:5], v2, off sc0 sc1"))) == 1
    assert len(unordered_releases(_UNORDERED.replace("global_atomic_swap", "flat_atomic_swap"))) == 1
    assert len(unordered_releases(_UNORDERED.replace("global_atomic_swap", "buffer_atomic_add"))) == 1
    assert len(unordered_releases(_UNORDERED.replace("\ts_waitcnt lgkmcnt(0)", "\ts_cbranch_execz .LBB0_3"))) == 1
    assert len(unordered_releases("\tbuffer_wbl2 sc1\n\ts_endpgm\n")) == 1
    # An agent-scope release (sc1) is held to the same rule; comments and debug labels are skipped.
    assert unordered_releases(_ORDERED.replace("sc0 sc1\n", "sc1 ; agent\n.Ltmp3:\n")) == []


def test_shmem_variants_build_up_to_the_link():
    """The inter-node kernels' SHMEM branches (SHMEM=True) type-check and lower, up to the link of
    the vendor's device library, which is all that is missing: NVSHMEM to PTX for sm_90, rocSHMEM
    (torch's own _rocshmem_triton bindings) to LLVM IR for gfx942 (see tests/shmem_build_check.py).
    One process per vendor, side by side."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shmem_build_check.py")
    procs = {which: subprocess.Popen([sys.executable, script, which], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for which in ("nvshmem", "rocshmem")}
    outputs = {which: proc.communicate(timeout=900)[0] for which, proc in procs.items()}
    for which, proc in procs.items():
        if which == "rocshmem" and proc.returncode == 2:  # shmem_build_check.NO_BINDINGS
            pytest.skip(f"NVSHMEM variants built; this torch has no rocSHMEM bindings: {outputs[which][-300:]}")
        assert proc.returncode == 0, outputs[which][-5000:]
        assert outputs[which].count(f"reaches the link of the {which} device library") >= 3, outputs[which]


def test_poll_sleep_follows_the_compile_target():
    """By default a wait sleeps between polls on AMD (s_sleep in the assembly) and not on NVIDIA;
    $MOE_EP_POLL_SLEEP_NS sets the sleep for both (nanosleep in the PTX, s_sleep on AMD), 0 for
    neither (one process compiles both targets, as CI does; one Triton cache for all three
    settings: the setting is part of its key)."""
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
    for ns, expected in ((None, "0 1"), ("200", "1 1"), ("0", "0 0")):
        env = dict(os.environ, TRITON_INTERPRET="0",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        env.pop("MOE_EP_POLL_SLEEP_NS", None)
        if ns is not None:
            env["MOE_EP_POLL_SLEEP_NS"] = ns
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.split() == expected.split(), (ns, proc.stdout)
