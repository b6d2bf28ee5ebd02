"""moe_ep: MoE expert-parallel dispatch and combine in Triton (AMD, NVIDIA, and CPU for tests)."""

from moe_ep import _platform
from moe_ep._version import __version__

_platform.use_interpreter_without_gpu()  # before any kernel module defines a @triton.jit

from moe_ep import reference  # noqa: E402
from moe_ep.buffer import Buffer, DispatchHandle, DispatchOutput  # noqa: E402
from moe_ep.config import EpConfig  # noqa: E402
from moe_ep.regions import heap_bytes  # noqa: E402
from moe_ep.transport import PeerTimeoutError  # noqa: E402

__all__ = ["Buffer", "DispatchHandle", "DispatchOutput", "EpConfig", "PeerTimeoutError", "__version__", "heap_bytes",
           "reference"]
