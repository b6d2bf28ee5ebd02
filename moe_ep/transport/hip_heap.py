"""The "hip" heap backend: each rank's arena in fine-grained device memory, shared by HIP IPC.

Why. torch's symmetric memory allocates with ``hipMemCreate``: coarse-grained memory, on which
AMD documents that system-scope atomics are downgraded to device scope. moe_ep's signals, credits
and counters are system-scope atomics that peers poll across xGMI, so on ROCm the arena lives in
memory allocated with ``hipExtMallocWithFlags`` (as iris does for its heap, and mori for what its
peers poll), fine-grained by default (``hipDeviceMallocFinegrained``) or uncached
(``hipDeviceMallocUncached``) with ``MOE_EP_HIP_MEMORY=uncached``. ``moe_ep.transport.heap``
selects this backend by default on ROCm GPUs (``EpConfig(backend="cuda")`` keeps torch's
symmetric memory there).

Protocol of ``HipArena`` (collective over the group, every rank the same size):
  1. allocate the own arena, zero it, wait for the device;
  2. export a 64-byte IPC handle of it; ``all_gather_object`` the handles (one per rank, in rank
     order);
  3. open every peer's handle (``hipIpcMemLazyEnablePeerAccess``): its address in this process;
  4. barrier: every rank has mapped every arena before any kernel may touch a peer's.
  Closing: close every opened handle, barrier (no rank still maps an arena), free the own.

What was verified without hardware (CPU, tests/test_amd.py): backend selection; the protocol above
(handle exchange, the order of opens and closes, the peer address table, errors named) over real
rank processes, with a stand-in runtime whose "device memory" is shared host memory and whose
handles are file names; the ctypes signatures against HIP's headers (by reading, not by calling).
What needs an MI300X (``pytest -m gpu tests/test_amd.py`` and the whole ``-m gpu`` suite there):
that libamdhip64 loads and the calls succeed, that ``torch.as_tensor`` takes the
``__cuda_array_interface__`` of ROCm device memory, that kernels reach peers' arenas through the
opened addresses, that system-scope atomics on this memory are coherent across xGMI (the reason for
it), and what fine-grained or uncached memory costs in bandwidth against torch's symmetric memory.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.distributed as dist

IPC_HANDLE_BYTES = 64  # sizeof(hipIpcMemHandle_t)
# hipExtMallocWithFlags flags (hip_runtime_api.h) and hipIpcOpenMemHandle's
MALLOC_FLAGS = {"finegrained": 0x1, "uncached": 0x3}  # hipDeviceMallocFinegrained, hipDeviceMallocUncached
IPC_LAZY_ENABLE_PEER_ACCESS = 0x1  # hipIpcMemLazyEnablePeerAccess


def memory_kind() -> str:
    """"finegrained" (the default) or "uncached": $MOE_EP_HIP_MEMORY."""
    kind = os.environ.get("MOE_EP_HIP_MEMORY", "finegrained")
    if kind not in MALLOC_FLAGS:
        raise ValueError(f"MOE_EP_HIP_MEMORY must be one of {sorted(MALLOC_FLAGS)}, got {kind!r}")
    return kind


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class _DeviceBytes:
    """``nbytes`` bytes of device memory at ``ptr``, for ``torch.as_tensor`` (it keeps no
    ownership: the arena frees the memory)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


class HipRuntime:
    """The HIP runtime calls of the arena, through ctypes (libamdhip64, as torch's ROCm build
    loads it)."""

    def __init__(self, library: str = "libamdhip64.so"):
        self.lib = ctypes.CDLL(library)
        self.lib.hipGetErrorString.restype = ctypes.c_char_p
        self.lib.hipExtMallocWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        self.lib.hipIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
        self.lib.hipIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        self.lib.hipIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        self.lib.hipFree.argtypes = [ctypes.c_void_p]

    def _check(self, call: str, err: int) -> None:
        if err != 0:
            raise RuntimeError(f"{call} failed: HIP error {err} ({self.lib.hipGetErrorString(err).decode()})")

    def malloc(self, nbytes: int, kind: str) -> int:
        ptr = ctypes.c_void_p()
        self._check("hipExtMallocWithFlags", self.lib.hipExtMallocWithFlags(ctypes.byref(ptr), nbytes,
                                                                           MALLOC_FLAGS[kind]))
        return ptr.value

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _IpcHandle()
        self._check("hipIpcGetMemHandle", self.lib.hipIpcGetMemHandle(ctypes.byref(handle), ptr))
        return bytes(bytearray(handle))

    def open_ipc_handle(self, handle: bytes) -> int:
        ptr = ctypes.c_void_p()
        self._check("hipIpcOpenMemHandle", self.lib.hipIpcOpenMemHandle(
            ctypes.byref(ptr), _IpcHandle.from_buffer_copy(handle), IPC_LAZY_ENABLE_PEER_ACCESS))
        return ptr.value

    def close_ipc_handle(self, ptr: int) -> None:
        self._check("hipIpcCloseMemHandle", self.lib.hipIpcCloseMemHandle(ptr))

    def free(self, ptr: int) -> None:
        self._check("hipFree", self.lib.hipFree(ptr))

    def tensor(self, ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
        """``[nbytes]`` uint8 view of device memory at ``ptr`` on ``device``."""
        return torch.as_tensor(_DeviceBytes(ptr, nbytes), device=device)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


class HipArena:
    """This rank's arena and every peer's address, by the protocol of the module docstring.
    ``runtime``: the HIP calls (``HipRuntime``; tests pass a stand-in)."""

    def __init__(self, group: dist.ProcessGroup, nbytes: int, device: torch.device, runtime=None,
                 kind: str | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.runtime = runtime if runtime is not None else HipRuntime()
        self.device = device
        self.kind = kind or memory_kind()
        self.own = self.runtime.malloc(nbytes, self.kind)
        self.opened: list[int] = []  # peers' addresses opened from their handles (closed by close())
        try:
            self.local = self.runtime.tensor(self.own, nbytes, device)
            self.local.zero_()
            self.runtime.synchronize(device)
            handles: list = [None] * self.world_size
            dist.all_gather_object(handles, self.runtime.ipc_handle(self.own), group=group)
            bad = [r for r, h in enumerate(handles) if not isinstance(h, bytes) or len(h) != IPC_HANDLE_BYTES]
            if bad:
                raise RuntimeError(f"ranks {bad} sent no {IPC_HANDLE_BYTES}-byte HIP IPC handle")
            self.bases = []
            for peer, handle in enumerate(handles):
                if peer == self.rank:
                    self.bases.append(self.own)
                else:
                    self.opened.append(self.runtime.open_ipc_handle(handle))
                    self.bases.append(self.opened[-1])
            dist.barrier(group=group)  # every rank has mapped every arena
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        for ptr in self.opened:
            self.runtime.close_ipc_handle(ptr)
        self.opened = []
        if self.own is not None:
            self.runtime.free(self.own)
            self.own = None

    def close(self) -> None:
        """Close the peers' mappings, wait until every rank has, then free the own arena."""
        self.runtime.synchronize(self.device)
        self.local = None
        for ptr in self.opened:
            self.runtime.close_ipc_handle(ptr)
        self.opened = []
        dist.barrier(group=self.group)
        self._release()
