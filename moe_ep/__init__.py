"""moe_ep: MoE expert-parallel dispatch and combine in Triton (AMD, NVIDIA, and CPU for tests).

``import moe_ep`` changes nothing global and defines no Triton kernel: the public names load
their modules on first use (PEP 562), because Triton decides whether a ``@triton.jit``
function is compiled or interpreted when it is defined. Kernels run in Triton's interpreter
(on the CPU) only where that is asked for: ``TRITON_INTERPRET=1`` in the environment, or
``moe_ep.use_interpreter()`` called before the first ``moe_ep.Buffer`` is touched::

    import moe_ep
    moe_ep.use_interpreter()               # CPU ranks over a gloo group
    buf = moe_ep.Buffer(group, cfg)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moe_ep import _platform
from moe_ep._platform import native_fp8_dtype
from moe_ep._version import __version__

if TYPE_CHECKING:
    from moe_ep import reference
    from moe_ep.buffer import Buffer
    from moe_ep.config import EpConfig
    from moe_ep.outputs import DispatchHandle, DispatchOutput, ExpertDispatchOutput, ExpertHandle, RecvHook
    from moe_ep.regions import heap_bytes
    from moe_ep.transport import BadCallError, PathMismatchError, PeerTimeoutError

# Public name -> the module that defines it (imported on first access).
_LAZY = {"BadCallError": "moe_ep.transport", "Buffer": "moe_ep.buffer", "DispatchHandle": "moe_ep.outputs",
         "DispatchOutput": "moe_ep.outputs", "EpConfig": "moe_ep.config", "ExpertDispatchOutput": "moe_ep.outputs",
         "ExpertHandle": "moe_ep.outputs", "PathMismatchError": "moe_ep.transport", "PeerTimeoutError": "moe_ep.transport", "RecvHook": "moe_ep.outputs",
         "heap_bytes": "moe_ep.regions", "reference": "moe_ep.reference"}

__all__ = ["BadCallError", "Buffer", "DispatchHandle", "DispatchOutput", "EpConfig", "ExpertDispatchOutput",
           "ExpertHandle", "PathMismatchError", "PeerTimeoutError", "RecvHook", "__version__", "heap_bytes", "native_fp8_dtype", "reference",
           "use_interpreter"]

if _platform.interpreting():  # asked for in the environment: the interpreter's speed-up too
    _platform.patch_interpreter()


def use_interpreter() -> None:
    """Run moe_ep's kernels (and every ``@triton.jit`` defined after this call) in Triton's
    interpreter, on the CPU: sets ``TRITON_INTERPRET=1`` in ``os.environ`` (rank processes
    started later inherit it). Call it before ``moe_ep.Buffer`` (or a kernel module) is first
    used; raises ``RuntimeError`` if moe_ep's kernels were already defined compiled."""
    _platform.use_interpreter()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_ep' has no attribute {name!r}")
    module = importlib.import_module(module)
    value = module if name == "reference" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
