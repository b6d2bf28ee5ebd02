"""The symmetric heap: one arena per rank of an EP group, reachable by every peer.

Every rank allocates an arena of the same size and carves it the same way into named,
aligned regions, so a region has the same offset on every rank. Kernels reach a peer's copy of
a region through ``peer_bases`` (the address of every rank's arena *in this process*) plus the
region's offset; they never receive heap tensors as arguments (Triton's interpreter copies
tensor arguments back after a launch, which would race with peers' stores).

Backends:
  host     CPU processes: a POSIX shared-memory file per rank in /dev/shm, mode 0600, mapped by
           every rank of the group and unlinked as soon as all have mapped it, so nothing is
           left behind when a process dies.
  cuda     GPUs of one node: torch symmetric memory over CUDA IPC (HIP IPC on ROCm); the default
           on NVIDIA. When ranks share a GPU (which torch symmetric memory refuses), one plain
           allocation per rank mapped into the others with CUDA IPC handles
           (``torch.UntypedStorage._share_cuda_``).
  hip      AMD GPUs of one node: fine-grained (or uncached) device memory shared by HIP IPC, where
           system-scope atomics stay system-scope (``moe_ep.transport.hip_heap``, which says what
           was verified without an AMD GPU); the default on ROCm.
  nvshmem  torch symmetric memory on its NVSHMEM backend; only when asked for by name.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

ALIGN = 256
BACKENDS = ("host", "cuda", "hip", "nvshmem")


@dataclass(frozen=True)
class Region:
    name: str
    offset: int  # bytes from the start of the arena, a multiple of ALIGN
    nbytes: int


def carve(sizes: Iterable[tuple[str, int]]) -> tuple[dict[str, Region], int]:
    """Lay named regions out back to back, each aligned to ALIGN bytes.

    Returns the regions by name and the arena size in bytes. Pure: every rank that carves the
    same sizes gets the same offsets.
    """
    regions: dict[str, Region] = {}
    offset = 0
    for name, nbytes in sizes:
        if name in regions:
            raise ValueError(f"region {name!r} is carved twice")
        if nbytes < 0:
            raise ValueError(f"region {name!r} has a negative size {nbytes}")
        regions[name] = Region(name, offset, nbytes)
        offset += -(-nbytes // ALIGN) * ALIGN
    return regions, max(offset, ALIGN)


def default_backend(device: torch.device, rocm: bool | None = None) -> str:
    """The backend a group on ``device`` uses unless the config names one: "host" on the CPU, "hip"
    on ROCm GPUs (``rocm``: whether torch is a ROCm build; None: ask torch), "cuda" elsewhere."""
    if device.type == "cpu":
        return "host"
    if rocm is None:
        rocm = bool(torch.version.hip)
    return "hip" if rocm else "cuda"


class SymmetricHeap:
    """One arena per rank of ``group``, carved into ``sizes`` (name, bytes) regions.

    Collective: every rank of the group constructs it with the same sizes, and closes it.
    """

    def __init__(self, group: dist.ProcessGroup, sizes: Iterable[tuple[str, int]],
                 device: torch.device, backend: str | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        self.backend = backend or default_backend(self.device)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown heap backend {self.backend!r}; expected one of {BACKENDS}")
        if (self.backend == "host") != (self.device.type == "cpu"):
            raise ValueError(f"heap backend {self.backend!r} does not serve device {self.device}")
        self.regions, self.nbytes = carve(sizes)
        self._keep: list = []  # whatever must stay alive for the arena to stay mapped
        if self.backend == "host":
            bases = self._map_host()
        elif self.backend == "hip":
            bases = self._map_hip()
        else:
            bases = self._map_symmetric_memory()
        # [world_size rounded up to a power of two] int64: every rank's arena address in this
        # process's address space, zero-padded so kernels may load a whole power-of-two block.
        padded = 1 << max(self.world_size - 1, 0).bit_length()
        self.peer_bases = torch.tensor(bases + [0] * (padded - self.world_size), dtype=torch.int64,
                                       device=self.device)
        self.local = self._local_arena

    # -- backends -----------------------------------------------------------------------------

    def _map_host(self) -> list[int]:
        path = f"/dev/shm/moe_ep-{secrets.token_hex(8)}-r{self.rank}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)
            own = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        try:
            paths: list[str] = [""] * self.world_size
            dist.all_gather_object(paths, path, group=self.group)
            maps = []
            for peer, peer_path in enumerate(paths):
                if peer == self.rank:
                    maps.append(own)
                    continue
                peer_fd = os.open(peer_path, os.O_RDWR)
                try:
                    maps.append(mmap.mmap(peer_fd, self.nbytes))
                finally:
                    os.close(peer_fd)
            dist.barrier(group=self.group)  # every rank has mapped every file
        finally:
            os.unlink(path)
        arenas = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        self._keep = [maps, arenas]
        self._local_arena = arenas[self.rank]
        return [a.data_ptr() for a in arenas]

    def _map_hip(self) -> list[int]:
        from moe_ep.transport.hip_heap import HipArena

        with torch.cuda.device(self.device):  # HIP allocates on the current device
            arena = HipArena(self.group, self.nbytes, self.device)
        self._keep = [arena]
        self._local_arena = arena.local
        return list(arena.bases)

    def _map_symmetric_memory(self) -> list[int]:
        import torch.distributed._symmetric_memory as symm_mem

        devices: list = [None] * self.world_size
        dist.all_gather_object(devices, (socket.gethostname(), str(torch.cuda.get_device_properties(self.device).uuid)),
                               group=self.group)
        if self.backend == "cuda" and len(set(devices)) < self.world_size:
            return self._map_shared_device()

        if self.backend == "nvshmem":
            symm_mem.set_backend("NVSHMEM")
        arena = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        arena.zero_()
        handle = symm_mem.rendezvous(arena, group=self.group.group_name)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._keep = [arena, handle]
        self._local_arena = arena
        return [int(p) for p in handle.buffer_ptrs]

    def _map_shared_device(self) -> list[int]:
        """Ranks that share a GPU: each allocates its arena with torch's allocator and maps the
        others' through CUDA IPC handles (``torch.multiprocessing``'s mechanism)."""
        arena = torch.zeros(self.nbytes, dtype=torch.uint8, device=self.device)
        handles: list = [None] * self.world_size
        dist.all_gather_object(handles, arena.untyped_storage()._share_cuda_(), group=self.group)
        storages, bases = [], []
        for peer, handle in enumerate(handles):
            if peer == self.rank:
                bases.append(arena.data_ptr())
                continue
            storage = torch.UntypedStorage._new_shared_cuda(*handle)
            storages.append(storage)
            bases.append(storage.data_ptr())
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._keep = [arena, storages]
        self._local_arena = arena
        return bases

    # -- regions ------------------------------------------------------------------------------

    def offset(self, name: str) -> int:
        """Byte offset of region ``name`` in every rank's arena."""
        return self.regions[name].offset

    def view(self, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """This rank's copy of region ``name`` as a tensor of ``dtype`` (flat unless ``shape``)."""
        region = self.regions[name]
        raw = self.local[region.offset:region.offset + region.nbytes]
        flat = raw.view(dtype)
        return flat if shape is None else flat.view(shape)

    def barrier(self) -> None:
        """Host-side barrier over the group (set-up and tear-down only, never on a hot path)."""
        dist.barrier(group=self.group)

    def close(self) -> None:
        """Unmap (host) or release (symmetric memory) the arenas. Views must not be used after."""
        self.local = None
        self._local_arena = None
        self.peer_bases = None
        if self.backend == "host" and self._keep:
            maps, arenas = self._keep
            arenas.clear()
            for m in maps:
                try:
                    m.close()
                except BufferError:
                    pass  # a caller still holds a view; the map goes when that view does
        if self.backend == "hip" and self._keep:
            self._keep[0].close()
        self._keep = []
