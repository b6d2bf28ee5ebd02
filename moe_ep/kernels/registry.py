"""Every Triton kernel of the package, with a signature to cross-compile it without a GPU.

``tests/test_cross_compile.py`` compiles each entry for NVIDIA sm_90 and AMD gfx942/gfx950 and
fails on any ``_*_kernel`` in ``moe_ep.kernels`` that is missing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelSpec:
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*i32", "i64", "constexpr", ...)
    constexprs: dict = field(default_factory=dict)  # constexpr argument name -> example value
    divisible: tuple = ()  # int arguments that a real launch passes as multiples of 16
    backends: tuple = ("cuda", "hip")  # the targets it is compiled for
    options: dict = field(default_factory=dict)  # compile options its launcher passes (enable_fp_fusion, ...)

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__


KERNELS: list[KernelSpec] = []


def register(kernel, signature: dict, constexprs: dict, divisible: tuple = (), options: dict | None = None):
    """Add ``kernel`` to the registry; constexpr arguments appear in both dicts. A kernel may be
    registered more than once, with other constexprs (e.g. each path's configuration).
    ``divisible``: int arguments Triton will see as multiples of 16 at real launches (its JIT
    specialises them so), which the cross-compile then assumes too. A signature with
    float8_e4m3fnuz pointers (``*fp8e4b8``, MI300X's fp8) is compiled for AMD targets only: NVIDIA
    has no such type, and those rows reach its kernels as bytes (``moe_ep._platform.kernel_arg``).
    ``options``: compile options the launcher passes (the cross-compile uses them too)."""
    sig = {name: kind for name, kind in signature.items() if kind != "constexpr"}
    for name in constexprs:
        sig[name] = "constexpr"
    backends = ("hip",) if "*fp8e4b8" in sig.values() else ("cuda", "hip")
    KERNELS.append(KernelSpec(kernel, sig, dict(constexprs), tuple(divisible), backends, dict(options or {})))
    return kernel
