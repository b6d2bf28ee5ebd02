"""Vendor and run-mode specifics, in one place.

Everything that differs between NVIDIA, AMD and the CPU (Triton's interpreter) is decided
here; kernels and the transport ask this module instead of testing vendors themselves.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings

import torch


def gpu_available() -> bool:
    """True when torch sees a CUDA or ROCm device."""
    return torch.cuda.is_available()


def use_interpreter() -> None:
    """Interpret every ``@triton.jit`` defined from now on (``moe_ep.use_interpreter``): sets
    ``TRITON_INTERPRET=1`` in ``os.environ`` (Triton's own switch, read when a function is
    decorated; rank processes started later inherit it) and speeds the interpreter up.

    Raises ``RuntimeError`` if moe_ep's kernels, or ``triton.language`` itself (whose standard
    functions, ``tl.zeros`` among them, are ``@triton.jit`` too), were already defined compiled:
    Triton cannot turn them into interpreted ones afterwards."""
    if kernel_mode() in ("compiled", "mixed"):
        raise RuntimeError(
            "moe_ep.use_interpreter() came too late: moe_ep's kernels or triton.language were already "
            "defined compiled (moe_ep.Buffer, a moe_ep kernel module or triton was imported first). Call it "
            "right after `import moe_ep`, before anything imports triton, or set TRITON_INTERPRET=1 in the "
            "environment before starting Python")
    check_interpreter()
    os.environ["TRITON_INTERPRET"] = "1"
    patch_interpreter()


def kernel_mode() -> str | None:
    """How the Triton functions moe_ep's kernels use were defined in this process: "compiled",
    "interpreted" (Triton's interpreter), "mixed", or None while neither a moe_ep module that
    defines kernels nor ``triton.language`` (its standard functions are ``@triton.jit``) is
    imported."""
    modes = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name.split(".")[0] == "moe_ep" or name == "triton.language.standard"):
            continue
        for value in list(vars(module).values()):
            kind = type(value).__name__
            if kind in ("JITFunction", "InterpretedFunction") and type(value).__module__.startswith("triton."):
                modes.add("interpreted" if kind == "InterpretedFunction" else "compiled")
        if len(modes) == 2:
            break
    if len(modes) > 1:
        return "mixed"
    return modes.pop() if modes else None


def require_interpreted_kernels(device: torch.device) -> None:
    """Raise ``RuntimeError`` before any launch when kernels for a CPU ``device`` are compiled
    (they run on the CPU only in Triton's interpreter)."""
    mode = kernel_mode()
    if torch.device(device).type == "cpu" and mode != "interpreted":
        raise RuntimeError(
            f"a Buffer on the CPU needs moe_ep's kernels (and triton.language) in Triton's interpreter, but "
            f"they are {mode}: set TRITON_INTERPRET=1 in the environment before starting Python, or call "
            "moe_ep.use_interpreter() right after `import moe_ep` (before moe_ep.Buffer is first used and "
            "before anything imports triton)")
    if mode == "interpreted":
        check_interpreter()
        patch_interpreter()  # TRITON_INTERPRET set after `import moe_ep`: the speed-up still applies


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton ``triton_version``'s interpreter cannot run moe_ep's kernels beside numpy
    ``numpy_version``, or None. Triton 3.6's interpreter converts 1-element arrays (loop bounds)
    with int(), which numpy 2.4 refuses; Triton 3.7 squeezes them first (pyproject's ``cpu`` extra)."""
    def major_minor(version: str) -> tuple[int, int]:
        parts = re.findall(r"\d+", version)[:2]
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter needs numpy < 2.4 (it calls int() on 1-element "
                f"arrays), this process has numpy {numpy_version}: pip install 'numpy<2.4' (moe_ep's `cpu` "
                "extra), or Triton >= 3.7")
    return None


def check_interpreter() -> None:
    """Raise ``RuntimeError`` if Triton's interpreter cannot run moe_ep's kernels here (reads the
    installed versions without importing triton, which must come after TRITON_INTERPRET)."""
    from importlib import metadata

    problem = interpreter_problem(metadata.version("triton"), metadata.version("numpy"))
    if problem is not None:
        raise RuntimeError(problem)


def patch_interpreter() -> None:
    """Speed Triton's interpreter up for moe_ep's kernels (only where kernels are interpreted:
    ``TRITON_INTERPRET=1`` in the environment, or ``use_interpreter``)."""
    # Triton 3.6's interpreter turns 1-element arrays into loop bounds with int(); numpy < 2.4
    # allows it with this warning (numpy >= 2.4 refuses: see interpreter_problem).
    warnings.filterwarnings("ignore", message="Conversion of an array with ndim > 0 to a scalar")
    _patch_language_once()


def _patch_language_once() -> None:
    """Make the interpreter's nested ``@triton.jit`` calls skip re-patching triton.language.

    Triton's interpreter maps the language's builtins to numpy ones (``_patch_lang``) for each
    kernel launch and restores them after it — and again at every call of a nested jit
    function, where they are already mapped: 4 ms of ``inspect.getmembers`` a call, about half
    of a CPU test's time in the polls and row helpers. Here a call whose language modules are
    already mapped (their ``load`` is no longer the builtin) gets an empty scope instead; the
    launch's own patch (and its restore) is unchanged. Without that function (another Triton),
    nothing changes."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang", None)
    scope = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope is None or getattr(patch, "_moe_ep_once", False):
        return

    def patch_once(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and all(not tl.core.is_builtin(getattr(lang, "load", None)) for lang in langs):
            return scope()
        return patch(fn)

    patch_once._moe_ep_once = True
    interpreter._patch_lang = patch_once


def interpreting() -> bool:
    """True when ``@triton.jit`` kernels run in Triton's interpreter (on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def vendor() -> str:
    """'nvidia', 'amd' or 'cpu': whose device the kernels run on in this process."""
    if interpreting() or not gpu_available():
        return "cpu"
    return "amd" if torch.version.hip else "nvidia"


def device_name(device: torch.device) -> str:
    """The name of the card (or 'cpu') that runs the kernels on ``device``."""
    if device.type == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(device)


def yield_cpu() -> None:
    """Sleep between two polls of a flag (interpreter only: a CPU rank waiting for a peer)."""
    time.sleep(_POLL_PAUSE_S)


_POLL_PAUSE_S = 0.001

# Nanoseconds a GPU wait sleeps between two polls of a flag (0, the default: none; read once at
# import, so set it before moe_ep is imported). Waiting programs poll with system-scope atomics
# while the programs they wait for run; in run 12 more waiters made those slower
# (benchmarks/NOTES.md): pausing between polls is the experiment this enables.
POLL_SLEEP_NS = int(os.environ.get("MOE_EP_POLL_SLEEP_NS", "0"))


def poll_sleep_asm(arch: str, ns: int) -> tuple[str, str]:
    """(inline assembly, constraints) that sleep about ``ns`` nanoseconds on the compile target
    ``arch`` ("gfx942", "gfx950": AMD; else NVIDIA, sm_70 and later) and write 0 to one output.
    It follows the target a kernel is compiled for, not the host: CI compiles for both."""
    if str(arch).startswith("gfx"):  # s_sleep N: about 64 * N clocks, ~32 ns at 2 GHz; N < 128
        return f"s_sleep {max(1, min(127, ns // 32))}\n s_mov_b32 $0, 0", "=s"
    return f"nanosleep.u32 {ns};\n mov.u32 $0, 0;", "=r"

# How many polls of a signal one second of waiting holds, by where the kernel runs. A wait is
# bounded by a poll count (kernels have no portable clock), so the timeout is approximate: on a
# GPU a system-scope acquire load takes about 0.3-1 us; in the interpreter a poll is a pause of
# 1 ms plus a few ms of Python work (measured on a 2-core CI machine).
_POLLS_PER_SECOND = {"nvidia": 2_000_000, "amd": 2_000_000, "cpu": 250}


def max_polls(timeout_s: float) -> int:
    """Poll budget of one wait for a timeout of ``timeout_s`` seconds (fits an int32)."""
    per_second = _POLLS_PER_SECOND[vendor()]
    if vendor() != "cpu" and POLL_SLEEP_NS:  # each poll also sleeps
        per_second = int(1e9 / (1e9 / per_second + POLL_SLEEP_NS))
    return int(min(max(timeout_s, 0.0) * per_second, 2**31 - 1))
