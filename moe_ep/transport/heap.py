"""The symmetric heap: one arena per rank of an EP group, reachable by every peer.

Every rank allocates an arena of the same size and carves it the same way into named,
aligned regions, so a region has the same offset on every rank. Kernels reach a peer's copy of
a region through ``peer_bases`` (the address of every rank's arena *in this process*) plus the
region's offset; they never receive heap tensors as arguments (Triton's interpreter copies
tensor arguments back after a launch, which would race with peers' stores).

Backends:
  host     CPU processes: one shared-memory segment per rank, mapped by every rank of the group
           (see "Host segments" below).
  cuda     GPUs of one node: torch symmetric memory over CUDA IPC (HIP IPC on ROCm); the default
           on NVIDIA. When ranks share a GPU (which torch symmetric memory refuses), one plain
           allocation per rank mapped into the others with CUDA IPC handles
           (``torch.UntypedStorage._share_cuda_``).
  hip      AMD GPUs of one node: fine-grained (or uncached) device memory shared by HIP IPC, where
           system-scope atomics stay system-scope (``moe_ep.transport.hip_heap``, which says what
           was verified without an AMD GPU); the default on ROCm.
  nvshmem  torch symmetric memory on its NVSHMEM backend; only when asked for by name.

Host segments. Each rank creates an anonymous ``memfd_create`` file (no name in /dev/shm, so
nothing outlives the processes that hold it, whenever one is killed), reserves its pages with
``posix_fallocate`` (a lack of memory fails here, at construction, not as a SIGBUS at the first
store), and its peers open it through ``/proc/<pid>/fd/<fd>`` (the kernel allows that to
processes of the same user; the file's device and inode are checked, so a pid of another pid
namespace is never taken for the peer). Where any rank cannot do that, every rank falls back to
named files (mode 0600) in /dev/shm, or in ``$MOE_EP_SHM_DIR`` where set (that variable also
selects named files outright): the ranks first agree that the directory has room for all of
them (else every rank raises the same error, saying how much is needed and how to get it),
and each file is unlinked as soon as every rank has mapped it; a file left by a rank killed
before that is removed by the next named-file heap built in that directory by the same pid
namespace (its name holds the namespace and the pid that created it). Every step that can fail
ends in an exchange of outcomes, so all ranks raise together or go on together.
"""

from __future__ import annotations

import errno
import logging
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
SHM_DIR = "/dev/shm"  # named host segments' directory unless $MOE_EP_SHM_DIR names another
SHM_DIR_ENV = "MOE_EP_SHM_DIR"  # set: named host segments in that directory (no memfd)

log = logging.getLogger("moe_ep")


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


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _how_to_get(directory: str | None, needed: int) -> str:
    """How a user gets ``needed`` more bytes of host shared memory for ``directory``'s segments
    (None: anonymous ones)."""
    smaller = "or a smaller heap (max_tokens_per_rank, hidden; moe_ep.heap_bytes(cfg, world_size) tells its size)"
    if directory is None:
        return f"free host memory (or raise the container's memory limit), {smaller}"
    room = -(-needed * 5 // 4 // 2**20)  # MiB, with a quarter to spare
    if os.path.realpath(directory) == SHM_DIR:
        return (f"enlarge /dev/shm by at least {room} MiB (Docker: `docker run --shm-size=...`, whose default "
                f"is 64 MiB; Kubernetes: an emptyDir with medium Memory mounted at /dev/shm), point "
                f"${SHM_DIR_ENV} at a directory with room, {smaller}")
    return f"make {room} MiB of room in {directory}, point ${SHM_DIR_ENV} at a directory with room, {smaller}"


def _describe(err: BaseException, nbytes: int, directory: str | None) -> str:
    """A segment's allocation error as a sentence for users."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
        where = f"{directory} is full" if directory else "out of memory"
        return f"{where} reserving {_mb(nbytes)} for its segment: {_how_to_get(directory, nbytes)}"
    return f"{type(err).__name__}: {err}"


def _pid_namespace() -> int:
    """This process's pid namespace (its inode; 0 where /proc does not tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _remove_stale_segments(directory: str) -> None:
    """Unlink the named segments in ``directory`` whose creator (a process of this pid namespace)
    is gone: a rank killed while its heap was being built leaves its file until then."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    namespace = _pid_namespace()
    for name in names:
        parts = name.split("-")  # moe_ep-<pid namespace>-<pid>-<token>-r<rank>
        if len(parts) != 5 or parts[0] != "moe_ep" or not (parts[1].isdigit() and parts[2].isdigit()):
            continue
        if int(parts[1]) != namespace or not namespace:
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # alive (or reused by another live process: left alone)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


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
        self.host_segments: str | None = None  # host backend: "memfd", or the directory of named files
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
        directory = os.environ.get(SHM_DIR_ENV)
        maps = None
        if directory is None:
            maps, why_not = self._map_host_segments(None)
            if maps is None:
                log.info("moe_ep: anonymous host segments unavailable (%s); named files in %s", why_not, SHM_DIR)
        if maps is None:
            directory = directory or SHM_DIR
            maps, error = self._map_host_segments(directory)
            if maps is None:
                raise RuntimeError(error)
        self.host_segments = directory or "memfd"  # named files' directory, or "memfd" (anonymous)
        arenas = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        self._keep = [maps, arenas]
        self._local_arena = arenas[self.rank]
        return [a.data_ptr() for a in arenas]

    def _agree(self, outcome: str | None, what: str) -> str | None:
        """Collective: None when no rank's ``outcome`` is an error, else one message for all."""
        outcomes: list = [None] * self.world_size
        dist.all_gather_object(outcomes, outcome, group=self.group)
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return None
        ranks = ", ".join(str(r) for r, _ in failed)
        return f"{what} failed on rank{'s' * (len(failed) > 1)} {ranks}: " + "; ".join(f"rank {r}: {o}"
                                                                                   for r, o in failed)

    def _map_host_segments(self, directory: str | None) -> tuple[list | None, str | None]:
        """Collective: (every rank's segment, mapped here; None), or (None; why not) on every rank
        alike. ``directory`` None: anonymous memfd segments; else named files there."""
        named = directory is not None
        if named:
            _remove_stale_segments(directory)
            error = self._agree_free_space(directory)
            if error is not None:
                return None, error
        fd, path, outcome, maps = -1, None, None, []
        try:
            try:
                if named:
                    name = f"moe_ep-{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(6)}-r{self.rank}"
                    fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                    path = os.path.join(directory, name)
                else:
                    fd = os.memfd_create(f"moe_ep-r{self.rank}", os.MFD_CLOEXEC)
                os.ftruncate(fd, self.nbytes)
                os.posix_fallocate(fd, 0, self.nbytes)  # every page reserved now: no SIGBUS later
            except (OSError, AttributeError) as err:  # AttributeError: no os.memfd_create here
                outcome = _describe(err, self.nbytes, directory)
            error = self._agree(outcome, f"allocating the host heap ({_mb(self.nbytes)} per rank)")
            if error is not None:
                return None, error
            stat = os.fstat(fd)
            segments: list = [None] * self.world_size  # (pid, fd, path, device, inode) of each rank's
            dist.all_gather_object(segments, (os.getpid(), fd, path, stat.st_dev, stat.st_ino), group=self.group)
            try:
                for peer, (pid, peer_fd, peer_path, device, inode) in enumerate(segments):
                    if peer == self.rank:
                        maps.append(mmap.mmap(fd, self.nbytes))
                        continue
                    opened = os.open(peer_path or f"/proc/{pid}/fd/{peer_fd}", os.O_RDWR)
                    try:
                        seen = os.fstat(opened)
                        if (seen.st_dev, seen.st_ino) != (device, inode):
                            raise OSError(f"{peer_path or f'/proc/{pid}/fd/{peer_fd}'} is not rank {peer}'s "
                                          "segment (another pid namespace?)")
                        maps.append(mmap.mmap(opened, self.nbytes))
                    finally:
                        os.close(opened)
            except OSError as err:
                outcome = f"{type(err).__name__}: {err}"
            # After this exchange every rank has mapped every segment (or all give up).
            error = self._agree(outcome, "mapping the peers' host heaps")
            if error is not None:
                return None, error
            maps, mapped = [], maps
            return mapped, None
        finally:
            for m in maps:  # left only where this call gives up
                m.close()
            if fd >= 0:
                os.close(fd)  # the mappings hold the segment
            if path is not None:
                os.unlink(path)

    def _agree_free_space(self, directory: str) -> str | None:
        """Collective: None when ``directory`` has room for the segments of every rank that puts
        its segment there (ranks on one filesystem add up), else the same message on every rank."""
        try:
            stat = os.statvfs(directory)
            reading = (os.stat(directory).st_dev, stat.f_bavail * stat.f_frsize, None)
        except OSError as err:
            reading = (None, 0, f"{directory}: {err}")
        readings: list = [None] * self.world_size
        dist.all_gather_object(readings, reading, group=self.group)
        errors = [f"rank {r}: {e}" for r, (_, _, e) in enumerate(readings) if e]
        if errors:
            return "the host heap's directory is not usable: " + "; ".join(errors)
        for dev in {d for d, _, _ in readings}:
            ranks = [r for r, (d, _, _) in enumerate(readings) if d == dev]
            free = min(f for d, f, _ in readings if d == dev)
            needed = self.nbytes * len(ranks)
            if needed > free:
                return (f"the host heap needs {_mb(needed)} in {directory} ({len(ranks)} ranks x {_mb(self.nbytes)}) "
                        f"but {_mb(free)} are free: {_how_to_get(directory, needed)}")
        return None

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
