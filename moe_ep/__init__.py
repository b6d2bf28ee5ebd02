"""moe_ep: MoE expert-parallel dispatch and combine in Triton (AMD, NVIDIA, and CPU for tests)."""

from moe_ep import _platform

_platform.use_interpreter_without_gpu()  # before any kernel module defines a @triton.jit
