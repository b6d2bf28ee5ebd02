"""Launching compiled kernels with little host time.

``kernel[grid](**kwargs)`` makes Triton bind and specialise every argument on every call (40 to 80
per kernel here) before it finds the compiled kernel in its cache. A call site instead splits its
arguments: those that depend only on its key (heap offsets and tensors, launch parameters, flags:
``static_args``, made once and kept with the heap) and the few per call. ``Launcher.launch`` keys a
call by what Triton specialises on among the per-call arguments alone (a tensor's dtype and
address mod 16, an integer's ``== 1`` / ``% 16`` and width, a constexpr's value); the first launch
of a key goes through Triton (compiling if needed) and keeps the compiled kernel, later ones call
its launcher directly (``CompiledKernel.run(grid, stream, function, metadata, hooks, *args)``, which
Triton 3.6 to 3.9 call alike on NVIDIA and AMD) with every pointer as an integer and the stream of
the Buffer's device. That skips what Triton's own runner (``CompiledKernel[grid](*args)``) does per
launch: look up the current device, build the launch metadata for the launch hooks, and have the
launcher call the two hook chains, empty unless a profiler registered hooks, in which case every
launch goes through the runner. Under Triton's interpreter every launch goes through
``kernel[grid]``. ``MOE_EP_FAST_LAUNCH=0`` turns the direct launches off (to compare).
"""

from __future__ import annotations

import os

import torch
from triton import knobs

FAST = os.environ.get("MOE_EP_FAST_LAUNCH", "1") != "0"


class Launcher:
    """Launches of one ``@triton.jit`` kernel, every argument given by keyword (``launch``)."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", None)  # (an interpreted function has none: see launch)
        if params is None:
            return
        self.names = [p.name for p in params]
        self._params = params

    def launch(self, grid: tuple, static: "LaunchArgs", **dynamic) -> None:
        """Launch with the arguments ``static`` (made once per call site and key: ``static_args``)
        and ``dynamic`` (the per-call ones, the same names at every call of one call site). The
        static part of the key and of the argument list is worked out once: a call keys only its
        dynamic arguments, and passes every pointer as an integer (Triton's launchers take a device
        address as a Python int; a tensor costs a ``data_ptr()`` call inside the launcher)."""
        if not FAST or not hasattr(self, "names"):
            self.kernel[grid](**static.kwargs, **dynamic, num_warps=static.num_warps, **static.options)
            return
        prepared = static.prepared.get(self)
        if prepared is None:
            prepared = static.prepared[self] = self._prepare(static, dynamic)
        args, key = self._args_and_key(prepared, dynamic)
        compiled_by_key = prepared[2]
        compiled = compiled_by_key.get(key)
        if compiled is None:
            compiled_by_key[key] = _Compiled(self.kernel[grid](**static.kwargs, **dynamic, num_warps=static.num_warps,
                                                               **static.options))
        else:
            compiled.launch(grid, static.device_index, args)

    @staticmethod
    def _args_and_key(prepared: tuple, dynamic: dict) -> tuple[list, tuple]:
        """The argument list of a launch (``prepared``'s static values, then ``dynamic``'s, pointers
        as integers) and the key of the compiled kernel it needs: what Triton specialises on among
        the dynamic arguments (a tensor's dtype and address mod 16, an integer's ``== 1``, ``% 16``
        and width, a constexpr's value)."""
        template, plan, _ = prepared
        args = template.copy()
        key = []
        for position, name, kind in plan:
            value = dynamic[name]
            if kind == 0:  # a tensor Triton specialises on alignment
                address = value.data_ptr()
                key.append((value.dtype, address & 15))
                args[position] = address
            elif kind == 1:  # a specialised integer
                key.append((value == 1, value & 15, -2**31 <= value < 2**31))
                args[position] = value
            elif kind == 2:  # a constexpr
                key.append(value)
                args[position] = value
            elif kind == 3:  # a tensor not specialised on alignment
                key.append(value.dtype)
                args[position] = value.data_ptr()
            else:  # an unspecialised integer, or anything else
                key.append((type(value), -2**31 <= value < 2**31 if type(value) is int else None))
                args[position] = value
        return args, tuple(key)

    def _prepare(self, static: "LaunchArgs", dynamic: dict) -> tuple:
        """For ``static``: the argument list with its values in place (pointers as integers), per
        dynamic argument (position, name, kind), and an empty map of compiled kernels by the
        dynamic arguments' key."""
        template, plan = [], []
        for position, p in enumerate(self._params):
            if p.name not in dynamic:
                value = static.kwargs[p.name]
                template.append(value.data_ptr() if isinstance(value, torch.Tensor) else value)
                continue
            value = dynamic[p.name]
            if p.is_constexpr:
                kind = 2
            elif isinstance(value, torch.Tensor):
                kind = 3 if p.do_not_specialize_on_alignment else 0
            elif isinstance(value, int) and not isinstance(value, bool) and not p.do_not_specialize:
                kind = 1
            else:
                kind = 4
            plan.append((position, p.name, kind))
            template.append(None)
        return template, tuple(plan), {}


class _Compiled:
    """A compiled kernel and what its direct launches need (see the module's docstring)."""

    __slots__ = ("kernel", "run", "function", "metadata")
    _stream = None  # Triton's current-stream function of the active driver: (device index) -> stream handle

    def __init__(self, kernel):
        self.kernel = kernel
        self.run = kernel.run  # the launcher (loads the module on first use)
        self.function = kernel.function
        self.metadata = kernel.packed_metadata
        if _Compiled._stream is None:
            from triton.runtime import driver

            _Compiled._stream = driver.active.get_current_stream

    def launch(self, grid: tuple, device_index: int, args: list) -> None:
        runtime = knobs.runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            self.kernel[(grid + (1, 1))[:3]](*args)  # a profiler's hooks: Triton's runner calls them
            return
        x, y, z = (grid + (1, 1))[:3]
        self.run(x, y, z, _Compiled._stream(device_index), self.function, self.metadata, None, None, None, *args)


def _hooked(hook) -> bool:
    """Whether a launch hook of Triton's knobs does anything (a HookChain with hooks, or a function)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class LaunchArgs:
    """The arguments of a launch that depend only on its cache key (heap offsets and tensors, launch
    parameters, halves, flags): ``kwargs`` by name, ``num_warps`` and compile ``options`` apart;
    ``prepared`` keeps, per Launcher, what its fast launches derive from them."""

    __slots__ = ("kwargs", "num_warps", "options", "prepared", "device_index")

    def __init__(self, kwargs: dict, device_index: int = 0):
        self.device_index = device_index  # the device whose current stream the direct launches use
        self.num_warps = kwargs.pop("num_warps", 4)
        self.options = kwargs.pop("options", None) or {}
        self.kwargs = kwargs
        self.prepared: dict = {}

    def __getitem__(self, name):
        return self.kwargs[name]


def static_args(owner, key, make) -> LaunchArgs:
    """The arguments of a launch that depend only on ``key``, made once by ``make()`` (a dict, which
    may hold ``num_warps`` and ``options``) and kept by ``owner`` (the Buffer's heap, whose offsets
    and tensors they hold: they go with it)."""
    cache = owner.__dict__.setdefault("_launch_args", {})
    args = cache.get(key)
    if args is None:
        device = getattr(owner, "device", None)
        index = device.index if device is not None and device.index is not None else \
            torch.cuda.current_device() if device is not None and device.type == "cuda" else 0
        args = cache[key] = LaunchArgs(make(), index)
    return args
