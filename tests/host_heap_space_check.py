"""Run by tests/test_host_heap.py inside a mount namespace where argv[1] is a 1 MiB tmpfs: the
host heap's named segments there (MOE_EP_SHM_DIR). Prints "ok" when every check holds.

1. A heap larger than the tmpfs: every rank raises the same error, saying how much is needed
   and how to get it, and nothing is left there.
2. A heap that fits: its pages are reserved at construction (the tmpfs's used space covers
   every rank's segment before anything is written), the files are gone once built, and every
   byte can be written.
3. A free-space reading that overstates the room (as another process filling the directory
   between the check and the allocation would make it): the page reservation itself fails,
   on the real tmpfs, every rank raises, and nothing is left there.
"""

import os
import sys

import torch

from moe_ep.testing import RankPool

MIB = 1 << 20


def _used(directory):
    stat = os.statvfs(directory)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _heap_outcome(ctx, nbytes, directory, overstate_free=False):
    from moe_ep.transport import SymmetricHeap

    if overstate_free:
        real = os.statvfs

        class Roomy:
            def __init__(self, stat):
                self.f_frsize, self.f_bavail = stat.f_frsize, stat.f_bavail + (64 * MIB) // stat.f_frsize

        os.statvfs = lambda path: Roomy(real(path))
    try:
        heap = SymmetricHeap(ctx.group, [("data", nbytes)], ctx.device)
    except RuntimeError as err:
        return "error", str(err), None
    finally:
        if overstate_free:
            os.statvfs = real
    used = _used(directory)  # before anything is written
    heap.view("data", torch.uint8).fill_(ctx.rank + 1)  # every page: no SIGBUS
    heap.barrier()
    listing = os.listdir(directory)
    heap.close()
    return "built", used, listing


def main(directory: str) -> None:
    assert _used(directory) == 0
    with RankPool(2, env={"MOE_EP_SHM_DIR": directory}) as pool:
        too_big = pool.run(_heap_outcome, 600 * 1024, directory)
        assert os.listdir(directory) == []
        for kind, message, _ in too_big:
            assert kind == "error", (kind, message)
            assert message == too_big[0][1], "every rank raises the same error"
            assert f"needs 1.2 MiB in {directory} (2 ranks x 0.6 MiB) but 1.0 MiB are free" in message, message
            assert "MOE_EP_SHM_DIR" in message and "moe_ep.heap_bytes" in message, message
        fits = pool.run(_heap_outcome, 256 * 1024, directory)
        for kind, used, listing in fits:
            assert kind == "built" and used >= 2 * 256 * 1024 and listing == [], (kind, used, listing)
        overstated = pool.run(_heap_outcome, 600 * 1024, directory, True)
        assert os.listdir(directory) == []  # the rank whose reservation succeeded removed its file
        for kind, message, _ in overstated:
            assert kind == "error", (kind, message)
            assert message == overstated[0][1], "every rank raises the same error"
            assert "allocating the host heap (0.6 MiB per rank) failed on rank" in message, message
            assert f"{directory} is full reserving 0.6 MiB for its segment" in message, message
    assert _used(directory) == 0
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
