"""Run-time guard on AMD GPUs: the Triton at hand must compile a release as a release.

A signal publishes data only if the stores before it are complete when it lands. On AMD the
machine code of a release writes back the L2 (``buffer_wbl2``) and must then wait for every
earlier memory operation (``s_waitcnt vmcnt(0)``) before the signalling atomic; the LLVM of
Triton 3.6 leaves that wait out at most of moe_ep's sites, which is why the transport issues the
fence itself on gfx942/gfx950 (``moe_ep.transport.primitives._release_sem``). CI checks every
kernel's AMD assembly (``moe_ep.kernels.cross_compile.unordered_releases``); this module checks,
at the first Buffer on an AMD GPU, what the installed Triton makes for that GPU's own target:
``check_release_ordering`` compiles ``_release_probe_kernel`` (rows stored, then ``_signal``, as
every kernel publishes) and refuses with a RuntimeError naming the Triton version and the first
release that lacks the wait. Once per target and process; nothing on NVIDIA or the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_ep import _platform
from moe_ep.kernels.cross_compile import compile_kernel, unordered_releases
from moe_ep.kernels.registry import KERNELS, register
from moe_ep.transport.primitives import _signal


@triton.jit
def _release_probe_kernel(data_ptr, flag_ptr, value, BLOCK: tl.constexpr):
    """Store ``[BLOCK]`` int32 values, then publish ``value`` at ``flag_ptr`` (release, sys)."""
    offs = tl.arange(0, BLOCK)
    tl.store(data_ptr + offs, value + offs)
    tl.debug_barrier()
    _signal(flag_ptr, value)


register(_release_probe_kernel, {"data_ptr": "*i32", "flag_ptr": "*i32", "value": "i32"}, {"BLOCK": 256})
_PROBE = KERNELS[-1]

_VERDICTS: dict[str, str | None] = {}  # target -> why it is refused (None: releases wait for the stores)


def release_ordering_error(gcn: str, triton_version: str, arch: str) -> str | None:
    """Why the AMD assembly ``gcn`` of a release (compiled by Triton ``triton_version`` for
    ``arch``) must not be run, or None when every ``buffer_wbl2`` waits for vmcnt(0) before the
    next store or atomic."""
    unordered = unordered_releases(gcn)
    if not unordered:
        return None
    return (f"Triton {triton_version} compiles a release for {arch} that does not wait for the stores before "
            f"it: `buffer_wbl2` and then a store or atomic with no `s_waitcnt vmcnt(0)` in between "
            f"({unordered[0]}), so a peer could see a signal before the rows it publishes. Use a Triton "
            "whose AMDGPU backend emits the wait (3.9.0 does at every moe_ep site), or a moe_ep that fences "
            "this target itself (moe_ep._platform.release_fence_asm).")


def check_release_ordering(device: torch.device) -> None:
    """On an AMD GPU: compile the probe for ``device``'s target (once per process) and raise
    RuntimeError if its release lacks the wait. Elsewhere nothing."""
    if _platform.vendor() != "amd":
        return
    props = torch.cuda.get_device_properties(device)
    arch = props.gcnArchName.split(":")[0]
    if arch not in _VERDICTS:
        compiled = compile_kernel(_PROBE, "hip", arch, getattr(props, "warp_size", 64))
        _VERDICTS[arch] = release_ordering_error(compiled.asm["amdgcn"], triton.__version__, arch)
    if _VERDICTS[arch] is not None:
        raise RuntimeError(f"moe_ep refuses to run on {props.name} ({arch}): {_VERDICTS[arch]}")
