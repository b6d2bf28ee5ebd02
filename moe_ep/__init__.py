"""moe_ep: MoE expert-parallel dispatch and combine in Triton (AMD, NVIDIA, and CPU for tests)."""

from moe_ep import _platform

_platform.use_interpreter_without_gpu()  # before any kernel module defines a @triton.jit

from moe_ep import reference  # noqa: E402
from moe_ep._platform import native_fp8_dtype  # noqa: E402
from moe_ep.buffer import Buffer  # noqa: E402
from moe_ep.config import EpConfig  # noqa: E402
from moe_ep.outputs import (DispatchHandle, DispatchOutput, ExpertDispatchOutput, ExpertHandle,  # noqa: E402
                            RecvHook)
from moe_ep.regions import heap_bytes  # noqa: E402
from moe_ep.transport import BadCallError, PeerTimeoutError  # noqa: E402

__all__ = ["BadCallError", "Buffer", "DispatchHandle", "DispatchOutput", "EpConfig", "ExpertDispatchOutput",
           "ExpertHandle", "PeerTimeoutError", "RecvHook", "heap_bytes", "native_fp8_dtype", "reference"]
