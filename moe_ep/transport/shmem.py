"""The inter-node transport's device calls: put, quiet and signal of NVSHMEM (NVIDIA) or
rocSHMEM (AMD), through torch's Triton bindings, beside their emulation over peer pointers.

A kernel of the inter-node path built with ``SHMEM`` true calls the vendor library: the heap must
then live in torch's NVSHMEM/rocSHMEM symmetric memory (``EpConfig(backend="nvshmem")``) and the
kernel be launched through ``with_shmem`` (it links the vendor's device library). With ``SHMEM``
false the same helpers copy through peer pointers and publish with a release exchange: that is
the transport on CPU ranks (CI) and wherever every peer is mapped, with the same structure —
stage in the own arena, put, complete, then signal — as across real nodes.

Addresses: the library takes *local* symmetric addresses (this rank's arena + offset) and the
peer's number; it finds the peer's copy itself (over IB, or NVLink/XGMI inside a node).
Words written across nodes (row counts, signals) are 64-bit slots, each written whole by one
put or one exchange; the waits of ``moe_ep.transport.primitives`` poll a signal's low 32 bits
(little-endian on every target).
"""

from __future__ import annotations

import types

import triton
import triton.language as tl

from moe_ep.transport.primitives import _copy_span, _peer_ptr, _release_sem, _row

try:  # torch's bindings: _nvshmem_triton on CUDA builds, _rocshmem_triton on ROCm (torch >= 2.13)
    import torch

    if torch.version.hip:
        from torch.distributed._symmetric_memory import _rocshmem_triton as _lib
        _decorate = getattr(_lib, "requires_rocshmem", None)
    else:
        from torch.distributed._symmetric_memory import _nvshmem_triton as _lib
        _decorate = getattr(_lib, "requires_nvshmem", None)
    # torch defines the device calls only where it finds Triton and a GPU.
    _missing = None if _decorate is not None and hasattr(_lib, "put") and hasattr(_lib, "quiet") else \
        "torch's SHMEM Triton module has no device calls here (no GPU, or too old a torch)"
except ImportError as err:
    _missing = f"torch has no SHMEM Triton module ({err})"


@triton.jit
def _unavailable_put(dest, source, nelems, pe):
    tl.static_assert(False, "the NVSHMEM/rocSHMEM device calls are not available in this process")


@triton.jit
def _unavailable_quiet():
    tl.static_assert(False, "the NVSHMEM/rocSHMEM device calls are not available in this process")


if _missing is not None:
    # Stands in for the vendor module where it has no device calls, so kernels that name them
    # still parse and hash; a kernel compiled with SHMEM true then fails to build, saying why.
    _lib, _decorate = types.ModuleType("moe_ep_no_shmem"), None
    _lib.put, _lib.quiet = _unavailable_put, _unavailable_quiet


def available() -> str | None:
    """None when the vendor library's device calls can be used here, else why not."""
    return _missing


def with_shmem(kernel):
    """``kernel`` launchable with the vendor's device library linked (``kernel[grid](...)``)."""
    if _missing is not None:
        raise RuntimeError(f"the NVSHMEM/rocSHMEM transport is not available: {_missing}")
    return _decorate(kernel)


@triton.jit
def _put_row(peer_bases_ptr, rank, pe, dst_offset, dst_row, src_offset, src_row, row_len, DTYPE: tl.constexpr,
             SHMEM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Put row ``src_row`` of the ``row_len``-value DTYPE rows at ``src_offset`` of this rank's
    arena into row ``dst_row`` of those at ``dst_offset`` of ``pe``'s. Done (readable by the
    put's issuer) on return; visible to ``pe`` only after ``_complete_puts`` and a ``_put_word``.
    ALIGNED: rows are 16-byte multiples at 16-aligned offsets."""
    tl.debug_barrier()  # the program's threads staged the source
    src = _row(_peer_ptr(peer_bases_ptr, rank, src_offset, DTYPE), src_row, row_len, ALIGNED)
    if SHMEM:
        _lib.put(_row(_peer_ptr(peer_bases_ptr, rank, dst_offset, DTYPE), dst_row, row_len, ALIGNED), src, row_len, pe)
    else:
        _copy_span(src, _row(_peer_ptr(peer_bases_ptr, pe, dst_offset, DTYPE), dst_row, row_len, ALIGNED), row_len, 0,
                   1, BLOCK, ALIGNED)


@triton.jit
def _complete_puts(SHMEM: tl.constexpr):
    """Wait until every put this program issued has landed (before it arrives on a counter whose
    last arriver signals for everyone)."""
    if SHMEM:
        _lib.quiet()
    tl.debug_barrier()


@triton.jit
def _put_word(peer_bases_ptr, rank, pe, slot_offset, stage_offset, value, SHMEM: tl.constexpr):
    """Write ``value`` (int64) at ``slot_offset`` of ``pe``'s arena after every completed put and
    every store of this program, and before anything this program writes after it: a row count,
    then (a second call) the epoch that signals it. SHMEM: a put of the word staged at
    ``stage_offset`` of this rank's arena, then a quiet (the next call may reuse the stage).
    Otherwise a release exchange at system scope through the peer pointer."""
    if SHMEM:
        stage = _peer_ptr(peer_bases_ptr, rank, stage_offset, tl.int64)
        tl.store(stage, value.to(tl.int64))
        tl.debug_barrier()
        _lib.put(_peer_ptr(peer_bases_ptr, rank, slot_offset, tl.int64), stage, 1, pe)
        _lib.quiet()
    else:
        tl.debug_barrier()
        tl.atomic_xchg(_peer_ptr(peer_bases_ptr, pe, slot_offset, tl.int64), value.to(tl.int64),
                       sem=_release_sem("release", "sys"), scope="sys")
