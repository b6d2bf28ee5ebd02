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
    _patch_bf16_to_float32()


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


def _patch_bf16_to_float32() -> None:
    """Make the interpreter's bfloat16 -> float32 conversion exact for subnormals.

    Triton 3.6's interpreter converts floats bit by bit (``_convert_float``): it normalises a
    subnormal's mantissa for the target's exponent range, but bf16 and float32 share that range
    (bias 127), so the exponent clamps to 0, and the result keeps the normalised mantissa without
    its leading 1: bf16 0x0041 (5.97e-39) becomes 0x00020000 (1.84e-40), 0x0001, 0x0002 and 0x0040
    become 0; every one of the 254 non-zero bf16 subnormals comes out wrong (normal values are
    right). ``x.to(tl.float32)`` of bf16 values (the quantiser's input, the combine's sums) goes
    through it. A GPU converts by shifting the 16 bits up, which is exact: so does this
    replacement, for that one conversion (every other one is left to Triton). GPU code is
    untouched: only the interpreter calls ``_convert_float``."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or getattr(convert, "_moe_ep_exact_bf16", False):
        return

    def convert_exact_bf16(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            bits = np.frombuffer(input.tobytes(), dtype=np.uint16).astype(np.uint32) << 16
            return bits.reshape(input.shape)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    convert_exact_bf16._moe_ep_exact_bf16 = True
    interpreter._convert_float = convert_exact_bf16


def interpreting() -> bool:
    """True when ``@triton.jit`` kernels run in Triton's interpreter (on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def vendor() -> str:
    """'nvidia', 'amd' or 'cpu': whose device the kernels run on in this process."""
    if interpreting() or not gpu_available():
        return "cpu"
    return "amd" if torch.version.hip else "nvidia"


def host_alert_word(device: torch.device) -> bool:
    """Whether the kernels on ``device`` flag a change of their status words by a store into a
    pinned host word (NVIDIA: page-locked memory is mapped into every GPU's address space under
    unified addressing, at the same address), so that the host looks at the words only when
    flagged, with no copy after each launch. On AMD the host copies the words after each launch
    (hipHostMalloc's default memory is not coherent with the device until the kernel ends: a
    store there is not known to be seen by the next call's host check)."""
    return device.type == "cuda" and not torch.version.hip


def kernel_arg(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a Triton kernel argument. float8_e4m3fnuz (MI300X's fp8) is a Triton type on
    AMD targets only: under the interpreter and on NVIDIA such a tensor travels as its bytes (a
    uint8 view; the kernels store fp8 codes, see ``moe_ep.kernels.numerics``). Every other tensor,
    and every tensor on AMD GPUs, as it is."""
    if tensor.dtype == torch.float8_e4m3fnuz and vendor() != "amd":
        return tensor.view(torch.uint8)
    return tensor


def kernel_dtype(dtype: torch.dtype):
    """The Triton element type kernels store ``dtype`` as (the element type of ``kernel_arg`` of a
    tensor of ``dtype``): float8_e4m3fnuz as bytes where Triton lacks it."""
    import triton.language as tl

    if dtype == torch.float8_e4m3fnuz:
        return tl.float8e4b8 if vendor() == "amd" else tl.uint8
    return {torch.bfloat16: tl.bfloat16, torch.float8_e4m3fn: tl.float8e4nv}[dtype]


# AMD targets whose fp8 is float8_e4m3fnuz (MI300A/MI300X/MI325X are gfx942; gfx940 and gfx941 were
# MI300's first steppings). gfx950 (MI355X) and later compute in OCP float8_e4m3fn, as NVIDIA does.
_FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")


def fp8_dtype_for_arch(arch: str) -> torch.dtype:
    """The fp8 dtype of a compile target or ``gcnArchName`` ("gfx942:sramecc+:xnack-", "gfx950",
    or an NVIDIA target): float8_e4m3fnuz on gfx940-gfx942, else float8_e4m3fn."""
    return torch.float8_e4m3fnuz if str(arch).split(":")[0] in _FNUZ_ARCHS else torch.float8_e4m3fn


def native_fp8_dtype(device=None) -> torch.dtype:
    """The fp8 dtype the GPU's matrix units compute in, for ``EpConfig(dispatch_dtype=...)``:
    torch.float8_e4m3fnuz on AMD gfx942 (MI300X), torch.float8_e4m3fn on AMD gfx950 (MI355X),
    NVIDIA and the CPU. ``device``: a torch device, index or name; None: the current GPU, if any."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if gpu_available() else torch.device("cpu")
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or not torch.version.hip:
        return torch.float8_e4m3fn
    return fp8_dtype_for_arch(torch.cuda.get_device_properties(device).gcnArchName)


def device_name(device: torch.device) -> str:
    """The name of the card (or 'cpu') that runs the kernels on ``device``."""
    if device.type == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(device)


def yield_cpu() -> None:
    """Sleep between two polls of a flag (interpreter only: a CPU rank waiting for a peer)."""
    time.sleep(_POLL_PAUSE_S)


_POLL_PAUSE_S = 0.001

# Nanoseconds a GPU wait sleeps between two polls of a flag: $MOE_EP_POLL_SLEEP_NS where set (read
# once at import, so set it before moe_ep is imported; 0: no sleep), else by compile target
# (``poll_sleep_ns``). Waiting programs poll with system-scope atomics while the programs they wait
# for run. NVIDIA: no sleep by default (in run 12 more waiters made the senders slower, and sleeps
# are the experiment this enables: benchmarks/NOTES.md). AMD: AMD_POLL_SLEEP_NS by default, a
# bounded pause (s_sleep 4, about 256 clocks) between polls, as mori's waits back off: it reports
# that tight spins over xGMI can livelock. Not measured on an AMD GPU yet.
POLL_SLEEP_NS_ENV = int(os.environ["MOE_EP_POLL_SLEEP_NS"]) if os.environ.get("MOE_EP_POLL_SLEEP_NS") else None
AMD_POLL_SLEEP_NS = 128


def poll_sleep_ns(arch, override: int | None = None) -> int:
    """Nanoseconds between two polls on the compile target ``arch`` ("gfx942", "gfx950": AMD; else
    NVIDIA): ``override`` (e.g. $MOE_EP_POLL_SLEEP_NS) when given, else AMD_POLL_SLEEP_NS on AMD and 0
    on NVIDIA."""
    if override is not None:
        return max(0, override)
    return AMD_POLL_SLEEP_NS if str(arch).startswith("gfx") else 0


def poll_sleep_asm(arch: str, ns: int) -> tuple[str, str]:
    """(inline assembly, constraints) that sleep about ``ns`` nanoseconds on the compile target
    ``arch`` ("gfx942", "gfx950": AMD; else NVIDIA, sm_70 and later) and write 0 to one output.
    It follows the target a kernel is compiled for, not the host: CI compiles for both."""
    if str(arch).startswith("gfx"):  # s_sleep N: about 64 * N clocks, ~32 ns at 2 GHz; N < 128
        return f"s_sleep {max(1, min(127, ns // 32))}\n s_mov_b32 $0, 0", "=s"
    return f"nanosleep.u32 {ns};\n mov.u32 $0, 0;", "=r"

# AMD targets whose release sequences follow LLVM's GFX942 memory model (gfx950 shares it).
_GFX942_MODEL = ("gfx940", "gfx941", "gfx942", "gfx950")
# The cache write-back a release at each scope starts with there (system: sc0 sc1; agent: sc1).
_WRITE_BACK = {"sys": "buffer_wbl2 sc0 sc1", "gpu": "buffer_wbl2 sc1"}


def release_fence_asm(arch, scope: str) -> tuple[str, str] | None:
    """(inline assembly, constraints) of the fence a release at ``scope`` ("sys" or "gpu") starts
    with on the compile target ``arch``, writing 0 to one output; None where Triton's own release
    atomics are kept (NVIDIA, and AMD targets outside the GFX942 memory model).

    LLVM's AMDGPU memory model (GFX942, gfx950 alike): a release writes back the L2
    (``buffer_wbl2``; sc0 sc1 for system scope, sc1 for agent scope), then waits for every earlier
    memory operation, ``s_waitcnt vmcnt(0) lgkmcnt(0)``, before the releasing store or atomic.
    The LLVM of Triton 3.6 omits the vmcnt(0) at most of moe_ep's sites (GPU_NOTES.md), so the
    kernels issue this fence themselves and then a relaxed atomic
    (``moe_ep.transport.primitives._release_sem``)."""
    if str(arch).split(":")[0] not in _GFX942_MODEL:
        return None
    return f"{_WRITE_BACK[scope]}\n s_waitcnt vmcnt(0) lgkmcnt(0)\n s_mov_b32 $0, 0", "=s"


# How many polls of a signal one second of waiting holds, by where the kernel runs. A wait is
# bounded by a poll count (kernels have no portable clock), so the timeout is approximate: on a
# GPU a system-scope acquire load takes about 0.3-1 us; in the interpreter a poll is a pause of
# 1 ms plus a few ms of Python work (measured on a 2-core CI machine).
_POLLS_PER_SECOND = {"nvidia": 2_000_000, "amd": 2_000_000, "cpu": 250}


def max_polls(timeout_s: float) -> int:
    """Poll budget of one wait for a timeout of ``timeout_s`` seconds (fits an int32)."""
    per_second = _POLLS_PER_SECOND[vendor()]
    sleep_ns = poll_sleep_ns("gfx" if vendor() == "amd" else "", POLL_SLEEP_NS_ENV) if vendor() != "cpu" else 0
    if sleep_ns:  # each poll also sleeps
        per_second = int(1e9 / (1e9 / per_second + sleep_ns))
    return int(min(max(timeout_s, 0.0) * per_second, 2**31 - 1))
