"""Build the NVSHMEM variants (SHMEM=True) of the inter-node kernels for sm_90 on a CPU, up to
the link: torch defines its NVSHMEM Triton calls only where it sees a GPU, so a stand-in with the
same signatures (put(dest, source, nelems, pe) -> nvshmemx_putmem_block, quiet -> nvshmem_quiet)
takes its place. Every variant must then stop only at ptxas's unresolved NVSHMEM symbols (the
device library is linked on GPUs): the kernels' SHMEM branches type-check and lower to PTX.
Run by tests/test_cross_compile.py with TRITON_INTERPRET=0; exits 1 on any other outcome."""

import types
import triton
import triton.language as tl
from triton.language import core
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


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


from moe_ep.transport import shmem  # noqa: E402
fake = types.ModuleType("fake_nvshmem")
fake.put, fake.quiet = put, quiet
shmem._lib = fake
from moe_ep.kernels.cross_compile import import_all_kernels  # noqa: E402
from moe_ep.kernels.registry import KERNELS  # noqa: E402
import_all_kernels()
built = 0
for spec in KERNELS:
    if "internode" not in spec.name or not spec.constexprs.get("PUT"):
        continue
    consts = {**spec.constexprs, "SHMEM": True}
    arg_names = spec.kernel.arg_names
    attrs = {(arg_names.index(n),): [["tt.divisibility", 16]] for n, k in spec.signature.items() if k.startswith("*")}
    try:
        triton.compile(ASTSource(spec.kernel, spec.signature, consts, attrs), target=GPUTarget("cuda", 90, 32))
        raise SystemExit(f"{spec.name}: linked without the NVSHMEM device library?")
    except Exception as e:  # noqa: BLE001 — the expected end is ptxas's unresolved NVSHMEM symbol
        msg = str(e)
        if "Unresolved extern function 'nvshmem" not in msg:
            print(f"FAIL {spec.name} {consts}: {type(e).__name__}: {msg[-3000:]}")
            raise SystemExit(1)
        print(f"ok   {spec.name} (STAGED={consts.get('STAGED')}): reaches the link")
        built += 1
if built < 3:
    raise SystemExit(f"only {built} SHMEM variants found")
