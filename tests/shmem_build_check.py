"""Build the inter-node kernels' SHMEM variants (SHMEM=True) on a CPU, up to the link of the
vendor's device library, for each target whose bindings torch has:

    python tests/shmem_build_check.py nvshmem    # sm_90: NVSHMEM
    python tests/shmem_build_check.py rocshmem   # gfx942: rocSHMEM

NVSHMEM: torch defines its NVSHMEM Triton calls only where it sees a GPU, so a stand-in with the
same signatures (put(dest, source, nelems, pe) -> nvshmemx_putmem_block, quiet -> nvshmem_quiet)
takes its place; every variant must stop only at ptxas's unresolved NVSHMEM symbols (the device
library is linked on GPUs).
rocSHMEM: torch's own ``_rocshmem_triton`` (torch >= 2.13, shipped in its CPU build too), its
device calls defined by making torch believe Triton has a device. Triton's AMD backend links the
device library (``librocshmem_device_gfx942.bc``, which ``requires_rocshmem`` passes as
``extern_libs``) into the LLVM IR, before code generation; without it, code generation cannot
size the calls' resources and LLVM aborts. So the build stops after the LLVM IR, which must hold
each kernel and declare, unresolved, the rocSHMEM calls the library would define
(rocshmem_putmem_wg, rocshmem_quiet).
Either way the kernels' SHMEM branches type-check and lower for the target. Run by
tests/test_cross_compile.py with TRITON_INTERPRET=0; exits 1 on any other outcome.
"""

import re
import sys
import types

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.language import core


@core.extern
def _putmem_block(dest, source, size_bytes, pe, _semantic=None):
    return core.extern_elementwise("", "", [dest, source, size_bytes, pe],
                                   {(core.dtype("int64"), core.dtype("int64"), core.dtype("int64"), core.dtype("int32")):
                                    ("nvshmemx_putmem_block", core.dtype("int32"))}, is_pure=False, _semantic=_semantic)


@core.extern
def _quiet(_semantic=None):
    return core.extern_elementwise("", "", [], {(): ("nvshmem_quiet", core.dtype("int32"))}, is_pure=False,
                                   _semantic=_semantic)


@triton.jit
def put(dest, source, nelems, pe):
    tl.static_assert(dest.type == source.type)
    nbytes = nelems * dest.type.element_ty.itemsize
    return _putmem_block(dest.to(tl.int64), source.to(tl.int64), nbytes.to(tl.int64), pe)


@triton.jit
def quiet():
    return _quiet()


NO_BINDINGS = 2  # exit status: this torch has no bindings for the vendor's library


class ReachedCodegen(Exception):
    """The AMD build reached code generation; carries the LLVM IR it was given."""

    def __init__(self, llir: str):
        super().__init__("stopped before AMD code generation")
        self.llir = llir


def _stop_before_amd_codegen():
    """Make Triton's AMD backend stop after the LLVM IR stage (where extern libraries are linked)."""
    from triton.backends.amd.compiler import HIPBackend

    add_stages = HIPBackend.add_stages

    def stop(llir, metadata):
        raise ReachedCodegen(llir)

    def add_stages_up_to_llir(self, stages, options, *args, **kwargs):
        add_stages(self, stages, options, *args, **kwargs)
        stages["amdgcn"] = stop

    HIPBackend.add_stages = add_stages_up_to_llir


def _vendor_calls(which: str):
    """(module with put / quiet, target, what the build must stop at)."""
    if which == "nvshmem":
        fake = types.ModuleType("fake_nvshmem")
        fake.put, fake.quiet = put, quiet
        return fake, GPUTarget("cuda", 90, 32), "Unresolved extern function 'nvshmem"
    import torch.utils._triton as torch_triton

    torch_triton.has_triton = lambda: True  # torch defines its rocSHMEM device calls only where Triton has a device
    try:
        from torch.distributed._symmetric_memory import _rocshmem_triton
    except ImportError as err:  # torch < 2.13
        print(f"no rocSHMEM bindings in this torch: {err}")
        raise SystemExit(NO_BINDINGS)

    if not (hasattr(_rocshmem_triton, "put") and hasattr(_rocshmem_triton, "quiet")):
        raise SystemExit("FAIL torch's _rocshmem_triton defines no put/quiet")
    _stop_before_amd_codegen()
    return _rocshmem_triton, GPUTarget("hip", "gfx942", 64), None


def main(which: str) -> None:
    lib, target, unresolved = _vendor_calls(which)
    from moe_ep.transport import shmem
    shmem._lib = lib
    from moe_ep.kernels.cross_compile import import_all_kernels
    from moe_ep.kernels.registry import KERNELS
    import_all_kernels()
    built = 0
    for spec in KERNELS:
        if "internode" not in spec.name or not spec.constexprs.get("PUT"):
            continue
        consts = {**spec.constexprs, "SHMEM": True}
        arg_names = spec.kernel.arg_names
        attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n, k in spec.signature.items()
                 if k.startswith("*")}
        try:
            triton.compile(ASTSource(spec.kernel, spec.signature, consts, attrs), target=target)
            raise SystemExit(f"{spec.name}: built without the {which} device library?")
        except ReachedCodegen as stop:  # rocSHMEM: the LLVM IR, before the library would be linked
            declared = set(re.findall(r"^declare .*@(rocshmem_\w+)\(", stop.llir, re.M))
            defined = re.search(rf"^define .*@{spec.name}\(", stop.llir, re.M)
            if not defined or not {"rocshmem_putmem_wg", "rocshmem_quiet"} <= declared:
                print(f"FAIL {spec.name} {consts}: LLVM IR defines the kernel: {bool(defined)}, declares {declared}")
                raise SystemExit(1)
        except Exception as e:  # noqa: BLE001 — NVSHMEM: the expected end is ptxas's unresolved symbol
            if unresolved is None or unresolved not in str(e):
                print(f"FAIL {spec.name} {consts}: {type(e).__name__}: {str(e)[-3000:]}")
                raise SystemExit(1)
        print(f"ok   {spec.name} (STAGED={consts.get('STAGED')}): reaches the link of the {which} device library "
              f"({target.backend}:{target.arch})")
        built += 1
    if built < 3:
        raise SystemExit(f"only {built} SHMEM variants found")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nvshmem")
