"""Where an eager call's host time goes: per section of the call, and the floors under it.

    python benchmarks/host_overhead.py --breakdown --out DIR

``host_overhead.py --breakdown`` wraps the sections of the host path (input checks, output
allocation, launch-parameter lookup, the Launcher's key, the launch itself, the status words
before and after) in timers for the timed calls, and reports the median inclusive time of each
per call. A timer costs well under a microsecond; the wrapped total is reported beside the
unwrapped median so its cost shows. The floors are what no change of ours can go under on this
machine: an empty CUDA tensor, an async 32-byte device-to-host copy, the capture query, and the
launch of a trivial compiled Triton kernel with as many arguments as ours (through
``kernel[grid]`` and directly).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
import triton
import triton.language as tl


class Sections:
    """Inclusive time of wrapped functions, per call of the op being timed."""

    def __init__(self):
        self.current = defaultdict(float)  # section -> seconds in the current op call
        self.per_call = defaultdict(list)  # section -> microseconds per op call
        self.current_counts = defaultdict(int)
        self.counts = defaultdict(int)  # section -> calls during the timed op calls
        self._patches = []

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        original = getattr(owner, name)
        label = label or f"{getattr(owner, '__name__', owner)}.{name}"
        current, counts = self.current, self.current_counts

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                current[label] += time.perf_counter() - start
                counts[label] += 1
        raw = getattr(owner, "__dict__", {}).get(name)
        self._patches.append((owner, name, raw if isinstance(raw, staticmethod) else original))
        setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)

    def end_call(self) -> None:
        for label, seconds in self.current.items():
            self.per_call[label].append(seconds * 1e6)
            self.counts[label] += self.current_counts[label]
        self.discard()

    def discard(self) -> None:
        """Forget what ran since the last ``end_call`` (calls not timed)."""
        self.current.clear()
        self.current_counts.clear()

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()

    def medians(self, calls: int) -> dict:
        return {label: {"median_us": statistics.median(v), "per_op_call": self.counts[label] / calls}
                for label, v in sorted(self.per_call.items(), key=lambda kv: -statistics.median(kv[1]))}


def instrument(sections: Sections) -> None:
    """Wrap the sections of the host path (module attributes the Buffer calls through)."""
    import moe_ep.buffer as buffer
    import moe_ep.kernels.combine as combine
    import moe_ep.kernels.combine_expert as combine_expert
    import moe_ep.kernels.dispatch as dispatch
    import moe_ep.kernels.dispatch_expert as dispatch_expert
    import moe_ep.kernels.dispatch_ht as dispatch_ht
    from moe_ep.kernels.launch import Launcher
    from moe_ep.transport.sync import SyncState

    sections.wrap(buffer, "check_dispatch")
    sections.wrap(buffer, "check_tensor")
    sections.wrap(buffer.Buffer, "_check_not_own_memory")
    sections.wrap(buffer.Buffer, "_new_dispatch_output")
    sections.wrap(buffer.Buffer, "launch_params")
    sections.wrap(buffer.Buffer, "_check_combine")
    for module, name in ((dispatch, "launch_dispatch"), (dispatch_ht, "launch_dispatch_ht"),
                         (dispatch_expert, "launch_dispatch_expert"), (combine, "launch_combine"),
                         (combine_expert, "launch_combine_expert")):
        sections.wrap(buffer if hasattr(buffer, name) else module, name, f"{name} (all of it)")
    sections.wrap(Launcher, "launch", "Launcher.launch (arguments, key, launch)")
    sections.wrap(Launcher, "_args_and_key", "Launcher._args_and_key (static method)")
    sections.wrap(SyncState, "before_launch")
    sections.wrap(SyncState, "after_launch")
    sections.wrap(torch, "empty", "torch.empty")
    for module in (dispatch, dispatch_ht, dispatch_expert, combine, combine_expert):
        if hasattr(module, "static_args"):
            sections.wrap(module, "static_args", f"static_args ({module.__name__.rsplit('.', 1)[-1]})")


@triton.jit
def _forty_args(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17,
                C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
                C5: tl.constexpr):
    if tl.program_id(0) == 0:
        tl.store(a0, i0 + i17 + C0)


def floors(device, calls: int = 500) -> dict:
    """Median microseconds of the host operations every call rests on."""
    def median(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for i in range(calls):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
            if i % 50 == 49:
                torch.cuda.synchronize(device)
        return statistics.median(times)

    status = torch.zeros(8, dtype=torch.int32, device=device)
    mirror = torch.zeros(8, dtype=torch.int32, pin_memory=True)
    tensors = [torch.zeros(16, dtype=torch.int32, device=device) for _ in range(16)]
    ints = list(range(3, 21))
    consts = dict(C0=1, C1=2, C2=3, C3=4, C4=5, C5=6)
    names = [f"a{i}" for i in range(16)] + [f"i{i}" for i in range(18)]
    kwargs = dict(zip(names, tensors + ints), **consts)
    compiled = _forty_args[(4,)](**kwargs)
    args = tensors + ints + list(consts.values())
    pointer_ints = [t.data_ptr() for t in tensors] + ints + list(consts.values())
    runner = compiled[(4, 1, 1)]
    stream = torch.cuda.current_stream(device).cuda_stream
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    block = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    words = block.view(torch.int32)
    from moe_ep.outputs import DispatchHandle, DispatchOutput

    def outputs():
        handle = DispatchHandle(src=words, num_recv_tokens=words, send_mask=words, num_tokens=1, path="ll",
                                buffer_id=1, part_rows=None, forwarded_token=None, forwarded_mask=None,
                                forwarded_count=None)
        return DispatchOutput(x=words, x_scales=words, topk_ids=words, topk_weights=words, src=words,
                              num_tokens=words, tokens_per_expert=words, handle=handle)
    return {
        "block.view(torch.int32) (CUDA)": median(lambda: block.view(torch.int32)),
        "words.as_strided((128, 2), (2, 1), 64) (CUDA)": median(lambda: words.as_strided((128, 2), (2, 1), 64)),
        "DispatchHandle + DispatchOutput construction": median(outputs),
        "torch.cuda.current_stream(device).cuda_stream": median(lambda: torch.cuda.current_stream(device).cuda_stream),
        "compiled.run(grid, stream, function, metadata, ...), pointers as ints":
            median(lambda: run(4, 1, 1, stream, function, metadata, None, None, None, *pointer_ints)),
        "torch.empty [128, 7168] fp8": median(lambda: torch.empty(128, 7168, dtype=torch.float8_e4m3fn, device=device)),
        "torch.empty [1] int32": median(lambda: torch.empty(1, dtype=torch.int32, device=device)),
        "status copy_ (32 B D2H, non_blocking, pinned)": median(lambda: mirror.copy_(status, non_blocking=True)),
        "torch.cuda.is_current_stream_capturing()": median(torch.cuda.is_current_stream_capturing),
        "kernel[grid](**kwargs), 34 args + 6 constexpr": median(lambda: _forty_args[(4,)](**kwargs)),
        "compiled[grid](*args), tensors": median(lambda: compiled[(4, 1, 1)](*args)),
        "compiled[grid](*args), pointers as ints": median(lambda: compiled[(4, 1, 1)](*pointer_ints)),
        "runner(*args) kept, tensors": median(lambda: runner(*args)),
    }
