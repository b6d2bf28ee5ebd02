"""Compile every registered kernel for NVIDIA and AMD targets, with no GPU present.

    python -m moe_ep.kernels.cross_compile     # exit 0 when all compile

Run without ``TRITON_INTERPRET`` (the interpreter has nothing to compile).
"""

from __future__ import annotations

import importlib
import pkgutil
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


def compile_all(verbose: bool = True) -> list[str]:
    """Compile each registered kernel for each target; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_ep.kernels.registry import KERNELS

    import_all_kernels()
    failures = []
    for spec in KERNELS:
        for backend, arch, warp_size in TARGETS:
            target = GPUTarget(backend, arch, warp_size)
            try:
                src = ASTSource(spec.kernel, spec.signature, spec.constexprs)
                compiled = triton.compile(src, target=target)
                size = len(compiled.asm.get("cubin", compiled.asm.get("hsaco", b"")))
                if verbose:
                    print(f"ok   {spec.name:32s} {backend}:{arch}  {size} bytes")
            except Exception as exc:  # report every failure, not just the first
                failures.append(f"{spec.name} for {backend}:{arch}: {type(exc).__name__}: {exc}")
                if verbose:
                    print(f"FAIL {spec.name:32s} {backend}:{arch}: {exc}")
    return failures


def main() -> int:
    from moe_ep.kernels.registry import KERNELS

    failures = compile_all()
    missing = defined_kernels() - {spec.name for spec in KERNELS}
    for name in sorted(missing):
        print(f"FAIL {name}: defined in moe_ep.kernels but not registered")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
