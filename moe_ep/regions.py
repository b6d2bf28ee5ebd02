"""How the symmetric heap is carved: every region, its shape, and who writes it.

``heap_bytes(cfg, world_size)`` tells the bytes per rank before anything is allocated. With
R = world size, M = max_tokens_per_rank, H = hidden, K = topk, S = H / 128 scales (fp8 only),
b = bytes per dispatched value (1 for fp8, 2 for bf16):

  region                 shape / dtype              written by
  barrier_flags          [R] int32                  slot s: rank s
  dispatch_x             [R, M, H] dispatch dtype   rows [s, :]: rank s (its tokens for this rank)
  dispatch_scales        [R, M, S] float32          as dispatch_x (fp8 only)
  dispatch_topk_ids      [R, M, K] int32            as dispatch_x (local expert ids, -1 elsewhere)
  dispatch_topk_weights  [R, M, K] float32          as dispatch_x
  dispatch_src_token     [R, M] int32               as dispatch_x (token index on rank s)
  dispatch_count         [R] int32                  slot s: rank s (rows it sent this call)
  dispatch_signal        [R] int32                  slot s: rank s (epoch, after its rows)
  dispatch_credit        [R] int32                  slot d: rank d (epoch it finished reading)
  combine_x              [R, M, H] bfloat16         rows [d, :]: rank d (partial sums per token)
  combine_signal         [R] int32                  slot d: rank d
  combine_credit         [R] int32                  slot s: rank s

Bytes per rank ~= R * M * (H * (b + 2) + 4 * S + 8 * K + 4): linear in each of R, M and H.
DeepSeek-V3 shape, fp8, R = 4: 128 tokens -> 11.2 MB; 4096 tokens -> 357 MB.
"""

from __future__ import annotations

from moe_ep.config import EpConfig
from moe_ep.transport import carve


def heap_regions(cfg: EpConfig, world_size: int) -> list[tuple[str, int]]:
    """(name, bytes) of every region of one rank's arena, in order."""
    r, m, h, k = world_size, cfg.max_tokens_per_rank, cfg.hidden, cfg.topk
    value_bytes = 1 if cfg.fp8 else 2
    flags = 4 * r
    return [
        ("barrier_flags", flags),
        ("dispatch_x", r * m * h * value_bytes),
        ("dispatch_scales", r * m * cfg.num_scales * 4),
        ("dispatch_topk_ids", r * m * k * 4),
        ("dispatch_topk_weights", r * m * k * 4),
        ("dispatch_src_token", r * m * 4),
        ("dispatch_count", flags),
        ("dispatch_signal", flags),
        ("dispatch_credit", flags),
        ("combine_x", r * m * h * 2),
        ("combine_signal", flags),
        ("combine_credit", flags),
    ]


def heap_bytes(cfg: EpConfig, world_size: int) -> int:
    """Symmetric-heap bytes each rank allocates for ``cfg`` on ``world_size`` ranks."""
    return carve(heap_regions(cfg, world_size))[1]
