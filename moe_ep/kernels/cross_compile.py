"""Compile every registered kernel for NVIDIA and AMD targets, with no GPU present.

    python -m moe_ep.kernels.cross_compile     # exit 0 when all compile
    python -m moe_ep.kernels.cross_compile hip:gfx950   # one target

Run without ``TRITON_INTERPRET`` (the interpreter has nothing to compile).

Pointer arguments are compiled as 16-byte aligned, as Triton's JIT specialises the tensors of
real launches. The assembly (PTX, AMD GCN) is also checked for element-sized (1- or 2-byte)
global loads and stores: the bf16 and fp8 rows must move in vectors. An address made from an integer (every
peer pointer) has no alignment Triton can see unless the kernel declares it
(``tl.multiple_of`` on a pointer computed in the same function); without it a row is copied
one element at a time.
On AMD targets every release must be one in the machine code (``unordered_releases``): each
``buffer_wbl2`` (the L2 write-back a release starts with) must be followed by an ``s_waitcnt``
with vmcnt(0) before the next store or atomic to memory, or the flag it publishes may land
before the data. (The LLVM of Triton 3.6 leaves that wait out at most of moe_ep's sites; the
kernels fence themselves on AMD: ``moe_ep.transport.primitives._release_sem``.)
The fp8 element types in each kernel's Triton IR are exactly those of its signature's pointers:
a float8_e4m3fnuz variant (MI300X's fp8, AMD targets only) holds no OCP float8_e4m3fn value, and
the reverse.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys

TARGETS = (("cuda", 90, 32), ("hip", "gfx942", 64), ("hip", "gfx950", 64))


def import_all_kernels() -> None:
    """Import every module of moe_ep.kernels so each registers its kernels."""
    import moe_ep.kernels

    for info in pkgutil.iter_modules(moe_ep.kernels.__path__):
        importlib.import_module(f"moe_ep.kernels.{info.name}")


def defined_kernels() -> set[str]:
    """Names of every ``_*_kernel`` Triton function defined in moe_ep.kernels."""
    import moe_ep.kernels
    from triton.runtime.jit import JITFunction

    names = set()
    for info in pkgutil.iter_modules(moe_ep.kernels.__path__):
        module = importlib.import_module(f"moe_ep.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.startswith("_") and name.endswith("_kernel") \
                    and value.__module__ == module.__name__:
                names.add(name)
    return names


def element_sized_accesses(asm: str) -> int:
    """Global loads and stores of 1 or 2 bytes (not vectors) in NVIDIA PTX or AMD GCN assembly."""
    ptx = re.findall(r"\b(?:ld|st)\.global(?:\.[a-z]+)*\.[bsu](?:8|16)\b", asm)
    gcn = re.findall(r"\b(?:global|buffer|flat)_(?:load|store)_(?:[su]?byte|[su]?short)(?:_d16\w*)?\b", asm)
    return len(ptx) + len(gcn)


# Triton signature types of fp8 pointers -> their MLIR element types in Triton IR.
_FP8_IR_TYPES = {"fp8e4nv": "f8E4M3FN", "fp8e4b8": "f8E4M3FNUZ", "fp8e5": "f8E5M2", "fp8e5b16": "f8E5M2FNUZ"}


def fp8_ir_types(ir: str) -> set[str]:
    """The fp8 element types that Triton IR (TTIR) text mentions."""
    return set(re.findall(r"\bf8E[45]M[23](?:FNUZ|FN)?\b", ir))


def signature_fp8_types(signature: dict, constexprs: dict | None = None) -> set[str]:
    """The fp8 element types of a registered signature's pointers (and of its constexpr element
    types, e.g. a kernel's OUT_DTYPE), as Triton IR spells them."""
    kinds = {kind[1:] for kind in signature.values()}
    kinds |= {str(value) for value in (constexprs or {}).values() if hasattr(value, "primitive_bitwidth")}
    return {_FP8_IR_TYPES[kind] for kind in kinds if kind in _FP8_IR_TYPES}


_GCN_WAIT = re.compile(r"^s_waitcnt\s+(.*)$")
_GCN_STORE_OR_ATOMIC = re.compile(r"^(?:global|flat|buffer)_(?:store|atomic)\w*")
_GCN_CONTROL_FLOW = re.compile(r"^(?:\.LBB\w*:|s_branch\b|s_cbranch\w*|s_setpc\w*|s_endpgm\b)")


def _waits_for_vector_memory(operands: str) -> bool:
    """Whether an ``s_waitcnt``'s operands wait until no vector memory operation is outstanding:
    ``vmcnt(0)`` among them, or the bare ``0`` (every counter zero)."""
    parts = operands.replace("&", " ").replace(",", " ").split()
    return parts == ["0"] or "vmcnt(0)" in parts


def unordered_releases(gcn: str) -> list[str]:
    """The ``buffer_wbl2`` instructions of AMD GCN assembly that a store or atomic to memory
    (global, flat or buffer) follows before an ``s_waitcnt`` with vmcnt(0), each as "line N:
    buffer_wbl2 ... -> line M: <what came first>". A branch, a basic-block label or the end of the
    program before the wait counts too (the wait must be on the way to every store). An empty
    list: every release waits for the stores before it."""
    bad = []
    pending = None  # (line number, text) of a buffer_wbl2 not yet followed by the wait
    for number, raw in enumerate(gcn.splitlines(), 1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("buffer_wbl2"):
            if pending is not None:
                bad.append(f"line {pending[0]}: {pending[1]} -> line {number}: {line}")
            pending = (number, line)
            continue
        if pending is None:
            continue
        wait = _GCN_WAIT.match(line)
        if wait and _waits_for_vector_memory(wait.group(1)):
            pending = None
        elif _GCN_STORE_OR_ATOMIC.match(line) or _GCN_CONTROL_FLOW.match(line):
            bad.append(f"line {pending[0]}: {pending[1]} -> line {number}: {line}")
            pending = None
    if pending is not None:
        bad.append(f"line {pending[0]}: {pending[1]} -> end of the assembly")
    return bad


def compile_kernel(spec, backend: str, arch, warp_size: int):
    """Triton's compiled kernel of the registered ``spec`` for one target (pointers 16-byte aligned)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = spec.kernel.arg_names
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in spec.signature.items()
             if kind.startswith("*") or name in spec.divisible}
    src = ASTSource(spec.kernel, spec.signature, spec.constexprs, attrs)
    return triton.compile(src, target=GPUTarget(backend, arch, warp_size), options=spec.options or None)


def _selected(backend: str, arch, wanted) -> bool:
    """Whether target (backend, arch) is among ``wanted``: backends ("cuda", "hip") or
    backend:arch names ("hip:gfx950")."""
    return backend in wanted or f"{backend}:{arch}" in wanted


def compile_all(verbose: bool = True, backends=("cuda", "hip")) -> list[str]:
    """Compile each registered kernel for each target of ``backends`` (see ``_selected``);
    returns the failures."""
    from moe_ep.kernels.registry import KERNELS

    import_all_kernels()
    failures = []
    for spec in KERNELS:
        for backend, arch, warp_size in TARGETS:
            if not _selected(backend, arch, backends) or backend not in spec.backends:
                continue
            try:
                compiled = compile_kernel(spec, backend, arch, warp_size)
                size = len(compiled.asm.get("cubin", compiled.asm.get("hsaco", b"")))
                narrow = element_sized_accesses(compiled.asm["ptx" if backend == "cuda" else "amdgcn"])
                if narrow:
                    raise AssertionError(f"{narrow} element-sized (1- or 2-byte) global loads/stores in the PTX: "
                                         "declare the rows' alignment (tl.multiple_of)")
                # No fp8 type the registration does not declare (a fnuz kernel holds no OCP fp8; a
                # variant that moves no rows may hold none).
                fp8_types = fp8_ir_types(compiled.asm["ttir"])
                declared = signature_fp8_types(spec.signature, spec.constexprs)
                if fp8_types - declared:
                    raise AssertionError(f"fp8 types {sorted(fp8_types)} in the Triton IR, {sorted(declared)} in the "
                                         "signature")
                releases = ""
                if backend == "hip":
                    gcn = compiled.asm["amdgcn"]
                    unordered = unordered_releases(gcn)
                    if unordered:
                        raise AssertionError(f"{len(unordered)} of {gcn.count('buffer_wbl2')} releases issue a store "
                                             "or atomic before s_waitcnt vmcnt(0): " + "; ".join(unordered[:4]))
                    releases = f"  {gcn.count('buffer_wbl2')} releases ordered"
                if verbose:
                    print(f"ok   {spec.name:32s} {backend}:{arch}  {size} bytes{releases}")
            except Exception as exc:  # report every failure, not just the first
                failures.append(f"{spec.name} for {backend}:{arch}: {type(exc).__name__}: {exc}")
                if verbose:
                    print(f"FAIL {spec.name:32s} {backend}:{arch}: {exc}")
    return failures


def main(argv=None) -> int:
    """``python -m moe_ep.kernels.cross_compile [cuda|hip|hip:gfx942 ...]``: all targets, or those
    backends' (or backend:arch targets)."""
    from moe_ep.kernels.registry import KERNELS

    backends = tuple(sys.argv[1:] if argv is None else argv) or ("cuda", "hip")
    failures = compile_all(backends=backends)
    missing = defined_kernels() - {spec.name for spec in KERNELS}
    for name in sorted(missing):
        print(f"FAIL {name}: defined in moe_ep.kernels but not registered")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
