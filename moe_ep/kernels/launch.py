"""Launching compiled kernels with little host time.

``kernel[grid](**kwargs)`` makes Triton bind and specialise every argument on every call (about
40 per kernel here) before it finds the compiled kernel in its cache. A ``Launcher`` does that
once per specialisation: its key holds exactly what Triton specialises on (constexpr values,
each tensor's dtype and address mod 16, each specialised integer's ``== 1`` / ``% 16`` and width),
the first launch of a key goes through Triton (compiling if needed) and keeps the compiled
kernel, and later launches call it directly (``CompiledKernel[grid](*args)``: Triton 3.6 to 3.9
launch the same way). Under Triton's interpreter every launch goes through ``kernel[grid]``.
``MOE_EP_FAST_LAUNCH=0`` turns the direct launches off (to compare).
"""

from __future__ import annotations

import os

import torch

FAST = os.environ.get("MOE_EP_FAST_LAUNCH", "1") != "0"


class Launcher:
    """Launches of one ``@triton.jit`` kernel, every argument given by keyword."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}
        self._kinds = None  # per argument position, what its key holds: set at the first launch
        params = getattr(kernel, "params", None)  # (an interpreted function has none: see __call__)
        if params is None:
            return
        self.names = [p.name for p in params]
        self._params = params

    def _classify(self, args: list) -> None:
        """Split the argument positions by what Triton specialises on (their Python types do not
        change between launches of one call site)."""
        constexprs, tensors, ints, plain, other = [], [], [], [], []
        for i, (p, value) in enumerate(zip(self._params, args)):
            if p.is_constexpr:
                constexprs.append(i)
            elif isinstance(value, torch.Tensor):
                (other if p.do_not_specialize_on_alignment else tensors).append(i)
            elif isinstance(value, int) and not isinstance(value, bool):
                (plain if p.do_not_specialize else ints).append(i)
            else:
                other.append(i)
        self._kinds = tuple(tuple(k) for k in (constexprs, tensors, ints, plain, other))

    def _key(self, args: list, options: tuple) -> tuple:
        constexprs, tensors, ints, plain, other = self._kinds
        return (options, tuple([args[i] for i in constexprs]),
                tuple([(args[i].dtype, args[i].data_ptr() & 15) for i in tensors]),
                tuple([(v == 1, v & 15, -2**31 <= v < 2**31) for v in [args[i] for i in ints]]),
                tuple([-2**31 <= args[i] < 2**31 for i in plain]),
                tuple([(type(args[i]), getattr(args[i], "dtype", None)) for i in other]))

    def __call__(self, grid: tuple, num_warps: int = 4, options: dict | None = None, **kwargs) -> None:
        options = options or {}
        if not FAST or not hasattr(self, "names"):
            self.kernel[grid](**kwargs, num_warps=num_warps, **options)
            return
        args = [kwargs[name] for name in self.names]
        if self._kinds is None:
            self._classify(args)
        key = self._key(args, (num_warps, *sorted(options.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.kernel[grid](**kwargs, num_warps=num_warps, **options)
        else:
            compiled[(grid + (1, 1))[:3]](*args)


def static_args(owner, key, make) -> dict:
    """The arguments of a launch that depend only on ``key`` (launch parameters, halves, flags), made
    once by ``make()`` and kept by ``owner`` (the Buffer's heap, whose offsets and tensors they hold:
    they go with it)."""
    cache = owner.__dict__.setdefault("_launch_args", {})
    args = cache.get(key)
    if args is None:
        args = cache[key] = make()
    return args
