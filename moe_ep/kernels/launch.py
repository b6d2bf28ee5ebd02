"""Launching compiled kernels with little host time.

``kernel[grid](**kwargs)`` makes Triton bind and specialise every argument on every call (about
40 per kernel here) before it finds the compiled kernel in its cache. A ``Launcher`` does that
once per specialisation: its key holds exactly what Triton specialises on (constexpr values,
each tensor's dtype and 16-byte alignment, each specialised integer's ``== 1`` / ``% 16 == 0`` and
width), the first launch of a key goes through Triton (compiling if needed) and keeps the compiled
kernel, and later launches call it directly (``CompiledKernel[grid](*args)``: Triton 3.6 to 3.9
launch the same way). Under Triton's interpreter every launch goes through ``kernel[grid]``.
``MOE_EP_FAST_LAUNCH=0`` turns the direct launches off (to compare).
"""

from __future__ import annotations

import os

import torch

FAST = os.environ.get("MOE_EP_FAST_LAUNCH", "1") != "0"
_INT32 = (-2**31, 2**31 - 1)


class Launcher:
    """Launches of one ``@triton.jit`` kernel, every argument given by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}
        params = getattr(kernel, "params", None)  # (an interpreted function has none: see __call__)
        if params is None:
            return
        self.names = [p.name for p in params]
        self.constexprs = [i for i, p in enumerate(params) if p.is_constexpr]
        self.runtime = [i for i, p in enumerate(params) if not p.is_constexpr]
        self.plain = {i for i in self.runtime if params[i].do_not_specialize}  # specialised on nothing but width
        self.unaligned = {i for i in self.runtime if params[i].do_not_specialize_on_alignment}

    def _key(self, args: list, options: tuple) -> tuple:
        key = [options]
        key += [args[i] for i in self.constexprs]
        for i in self.runtime:
            value = args[i]
            if isinstance(value, torch.Tensor):
                key.append((value.dtype, i in self.unaligned or value.data_ptr() % 16 == 0))
            elif isinstance(value, bool):
                key.append(value)
            elif isinstance(value, int):
                wide = not (_INT32[0] <= value <= _INT32[1])
                key.append(wide if i in self.plain else (wide, value == 1, value % 16 == 0))
            else:
                key.append(type(value))
        return tuple(key)

    def __call__(self, grid: tuple, num_warps: int = 4, options: dict | None = None, **kwargs) -> None:
        options = options or {}
        if not FAST or not hasattr(self, "names"):
            self.kernel[grid](**kwargs, num_warps=num_warps, **options)
            return
        args = [kwargs[name] for name in self.names]
        key = self._key(args, (num_warps, *sorted(options.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.kernel[grid](**kwargs, num_warps=num_warps, **options)
        else:
            compiled[(grid + (1, 1))[:3]](*args)
