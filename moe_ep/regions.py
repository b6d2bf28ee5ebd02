"""How the symmetric heap is carved: every region, its shape, and who writes it.

``heap_bytes(cfg, world_size)`` tells the bytes per rank before anything is allocated. With
R = world size, M = max_tokens_per_rank, H = hidden, K = topk, S = H / 128 scales (fp8 only),
b = bytes per dispatched value (1 for fp8, 2 for bf16):

  region                 shape / dtype                 written by
  barrier_flags          [R] int32                     slot s: rank s
  dispatch_x             [2, R, M, H] dispatch dtype   rows [., s, :]: rank s (its tokens for this rank)
  dispatch_scales        [2, R, M, S] float32          as dispatch_x (fp8 only)
  dispatch_topk_ids      [2, R, M, K] int32            as dispatch_x (local expert ids, -1 elsewhere)
  dispatch_topk_weights  [2, R, M, K] float32          as dispatch_x
  dispatch_src_token     [2, R, M] int32               as dispatch_x (token index on rank s)
  dispatch_count         [2, R] int32                  slot [., s]: rank s (rows it sent in the call)
  dispatch_signal        [2, R] int32                  slot [., s]: rank s (epoch, after its rows)
  combine_x              [2, R, M, H] bfloat16         rows [., d, :]: rank d (partials per token)
  combine_signal         [2, R] int32                  slot [., d]: rank d

The leading 2 is the double buffer of the LL kernels (call e uses half e % 2: see
kernels/dispatch_ll.py). Bytes per rank ~= 2 * R * M * (H * (b + 2) + 4 * S + 8 * K + 4):
linear in each of R, M and H. DeepSeek-V3 shape, fp8, R = 4: 128 tokens -> 22.3 MB.
"""

from __future__ import annotations

from moe_ep.config import EpConfig
from moe_ep.transport import carve


def heap_regions(cfg: EpConfig, world_size: int) -> list[tuple[str, int]]:
    """(name, bytes) of every region of one rank's arena, in order."""
    r, m, h, k = world_size, cfg.max_tokens_per_rank, cfg.hidden, cfg.topk
    value_bytes = 1 if cfg.fp8 else 2
    flags = 4 * r
    halves = 2  # double buffer of the LL kernels
    return [
        ("barrier_flags", flags),
        ("dispatch_x", halves * r * m * h * value_bytes),
        ("dispatch_scales", halves * r * m * cfg.num_scales * 4),
        ("dispatch_topk_ids", halves * r * m * k * 4),
        ("dispatch_topk_weights", halves * r * m * k * 4),
        ("dispatch_src_token", halves * r * m * 4),
        ("dispatch_count", halves * flags),
        ("dispatch_signal", halves * flags),
        ("combine_x", halves * r * m * h * 2),
        ("combine_signal", halves * flags),
    ]


def heap_bytes(cfg: EpConfig, world_size: int) -> int:
    """Symmetric-heap bytes each rank allocates for ``cfg`` on ``world_size`` ranks."""
    return carve(heap_regions(cfg, world_size))[1]
