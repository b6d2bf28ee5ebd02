"""Cross-rank barrier kernel.

Protocol: region ``barrier_flags`` is ``[world_size]`` int32 on every rank; rank ``src`` writes
its epoch into slot ``src`` of every rank's copy (release, system scope), then waits until every
slot of its own copy holds at least that epoch. The epoch lives on the device and only grows, so
calls need no reset and a captured graph replays correctly.
"""

import triton
import triton.language as tl

from moe_ep.kernels.launch import Launcher, static_args
from moe_ep.kernels.registry import register
from moe_ep.transport.primitives import _barrier, _finish_launch, _launch_epoch


@triton.jit
def _barrier_kernel(peer_bases_ptr, flags_offset, counters_ptr, status_ptr, rank, world_size,
                    max_polls, BLOCK_R: tl.constexpr):
    epoch = _launch_epoch(counters_ptr)
    _barrier(peer_bases_ptr, flags_offset, status_ptr, rank, world_size, epoch, max_polls, BLOCK_R)
    _finish_launch(counters_ptr + 1, counters_ptr, epoch, 1)


_launch_barrier = Launcher(_barrier_kernel)
register(_barrier_kernel,
         {"peer_bases_ptr": "*i64", "flags_offset": "i64", "counters_ptr": "*i32", "status_ptr": "*i32",
          "rank": "i32", "world_size": "i32", "max_polls": "i32"},
         {"BLOCK_R": 8})


def barrier_region_bytes(world_size: int) -> int:
    return 4 * world_size


def launch_barrier(heap, sync, region: str = "barrier_flags") -> None:
    """Block every rank of ``heap``'s group until all have launched it (device-side)."""
    static = static_args(heap, ("barrier", id(sync), region), lambda: dict(
        peer_bases_ptr=heap.peer_bases, flags_offset=heap.offset(region), counters_ptr=sync.counters("barrier"),
        status_ptr=sync.status, rank=heap.rank, world_size=heap.world_size, max_polls=sync.max_polls,
        BLOCK_R=triton.next_power_of_2(heap.world_size)))
    sync.before_launch()
    _launch_barrier.launch((1,), static)
    sync.after_launch()
