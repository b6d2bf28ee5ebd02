"""Shared helpers for functions that run on ranks (importable by the spawned processes)."""

import torch


def assert_equal(name: str, ref: torch.Tensor, out: torch.Tensor) -> None:
    """Bit-exact comparison for moved data; names the first differing coordinates."""
    if ref.shape != out.shape or ref.dtype != out.dtype:
        raise AssertionError(f"{name}: expected {tuple(ref.shape)} {ref.dtype}, got {tuple(out.shape)} {out.dtype}")
    # Flat first: an empty or size-1 last dimension may carry any stride (torch.where's broadcast
    # in reference.to_bf16 gives [0, 1] rows a stride of 0), which a dtype view refuses.
    a, b = ref.contiguous().reshape(-1).view(torch.uint8), out.contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(a, b):
        bad = (ref != out) if ref.dtype.is_floating_point is False else ~((ref == out) | (ref.isnan() & out.isnan()))
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {ref.numel()} values differ, first at {where}: "
                             f"expected {[ref[tuple(i)].item() for i in where]}, got {[out[tuple(i)].item() for i in where]}")


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float) -> None:
    """Tolerance comparison for arithmetic; names the worst coordinates."""
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: expected shape {tuple(ref.shape)}, got {tuple(out.shape)}")
    ref64, out64 = ref.double(), out.double()
    err = (ref64 - out64).abs() - (atol + rtol * ref64.abs())
    err = torch.where(out64.isnan() | ref64.isnan(), torch.full_like(err, float("inf")), err)
    if err.numel() and err.max() > 0:
        worst = err.flatten().argmax()
        idx = [int(i) for i in torch.unravel_index(worst, err.shape)]
        raise AssertionError(f"{name}: {int((err > 0).sum())} of {err.numel()} out of tolerance; worst at {idx}: "
                             f"expected {ref64[tuple(idx)].item()}, got {out64[tuple(idx)].item()}")
