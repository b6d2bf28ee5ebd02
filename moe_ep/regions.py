"""How the symmetric heap is carved: every region, its shape, and who writes it.

``heap_bytes(cfg, world_size)`` tells the bytes per rank before anything is allocated. With
R = world size, H = hidden, K = topk, S = H / 128 scales (fp8 only), b = bytes per dispatched
value (1 for fp8, 2 for bf16), and per path p in (ll, ht) its capacity M_p tokens per source
(``cfg.ll_tokens``, ``cfg.ht_tokens``; a path with capacity 0 has no regions):

  region                   shape / dtype                  written by
  barrier_flags            [R] int32                      slot s: rank s
  dispatch_calls           [R] int32                      slot s: rank s (the call word of its current
                                                          dispatch: call number and path, read only by
                                                          a wait that did not succeed at once)
  p_dispatch_x             [B, R, M_p, H] dispatch dtype  rows [., s, :]: rank s (its tokens for this rank);
                                                          HT: compact, rows [o_s, o_s + n_s) from rank s
                                                          (o_s: rows of the lower ranks), i.e. the
                                                          outputs' layout (zero-copy dispatch returns them)
  p_dispatch_scales        [B, R, M_p, S] float32         as p_dispatch_x (fp8 only)
  p_dispatch_topk_ids      [B, R, M_p, K] int32           as p_dispatch_x (local expert ids, -1 elsewhere)
  p_dispatch_topk_weights  [B, R, M_p, K] float32         as p_dispatch_x
  p_dispatch_src_token     [B, R, M_p] int32              as p_dispatch_x (token index on rank s)
  ll_dispatch_count        [2, R] int32                   slot [., s]: rank s (rows it sent in the call)
  p_dispatch_expert_counts [B, R, E/R] int32              row [., s]: rank s (its (token, k) pairs per local expert)
  p_dispatch_signal        [B, R] int32                   slot [., s]: rank s (LL: epoch, after its rows;
                                                          HT: after its ranges, counts, expert counts)
  ht_dispatch_ranges       [R, P + 1] int32               row s: rank s (where each of its P = ht_parts token
                                                          ranges starts among its rows for this rank, then
                                                          their count)
  ht_dispatch_counts       [2, R, R] int32                row [., s]: rank s (the rows it sends to every rank;
                                                          double-buffered: call e uses half e % 2)
  ht_dispatch_range_signal [P, R] int32                   slot [q, s]: rank s (epoch, after its rows of
                                                          token ranges 0..q)
  ht_dispatch_credit       [R] int32                      slot d: rank d (last HT epoch it consumed)
  p_combine_x              [B, R, M_p, H] bfloat16        rows [., d, :]: rank d (partials per token)
  p_combine_signal         [B, R] int32                   slot [., d]: rank d
                           (HT: [P, R], one per token range)
  ht_combine_credit        [R] int32                      slot s: rank s

Across nodes (N = world / gpus_per_node > 1; G = gpus_per_node; the inter-node path, LL and HT
variants alike, on M = max_tokens_per_rank: its LL regions above have that capacity and there
are no HT regions) a rank also holds, double-buffered like LL:

  inter_dispatch_*         [2, N, M, ...]                 rows [., n, :]: rank (n, my local index) —
                           (x, scales, global topk_ids,   the tokens it sends to this node, which this
                           weights, src_token)            rank forwards to the node's ranks
  inter_dispatch_count /   [2, N] int64                   slot [., n]: that rank (rows it sent, then the
  _signal                                                 epoch; 64-bit: the put transport's word)
  inter_combine_x          [2, G, N, M, H] bfloat16       [., g, n, t]: local rank g's partial of token t
                                                          of rank (n, my local index)
  inter_combine_signal     [2, G] int32                   slot [., g]: local rank g
  node_combine_x           [2, N, M, H] bfloat16          [., m, t]: node m's summed partial of my token t
  node_combine_signal      [2, N] int64                   slot [., m]: the proxy of node m (epoch)
With inter_transport "put", the sources of the puts (written by this rank only, single-buffered:
a call's puts complete within it):
  inter_stage_*            [N, M, ...]                    rows [m, :]: this rank's tokens for node m
  node_stage_x             [N, M, H] bfloat16             [n, t]: this rank's node sum for rank (n, my local)
  inter_stage_signal       [N] int64                      the count or epoch word being put to node n

The "expert" layout (``EpConfig.layouts``; kernels/dispatch_expert.py, kernels/combine_expert.py;
M_x = ``cfg.expert_tokens``, E_l = experts per rank, S_x = ``cfg.slots(R)`` rows per expert; half h
of each region is chosen by the host, alternating call by call, see the kernels' protocol):

  ex_dispatch_x            [2, E_l, S_x, H] dispatch dtype  [h, e, :n_e]: one row per (token, k) pair
                                                          whose expert is local expert e (written by the
                                                          pair's source rank); the dispatch's outputs
  ex_dispatch_scales       [2, E_l, S_x, S] float32       as ex_dispatch_x (fp8 only)
  ex_dispatch_src          [2, E_l, S_x, 2] int32         as ex_dispatch_x: (source rank, token index)
  ex_dispatch_topk_weights [2, E_l, S_x] float32          as ex_dispatch_x: the pair's weight
  ex_dispatch_topk_slot    [2, E_l, S_x] int32            as ex_dispatch_x: the pair's k (for the combine)
  ex_dispatch_counts       [2, R, E] int32                row [h, s]: rank s (its pairs per global expert)
  ex_dispatch_count_signal [2, R] int32                   slot [h, s]: rank s (epoch, after its counts)
  ex_dispatch_signal       [2, R] int32                   slot [h, s]: rank s (epoch, after its rows)
  ex_combine_x             [2, M_x, K, H] bfloat16        [c, t, k]: the output of pair (t, k) of this rank's
                                                          token t (written by the rank of its expert)
  ex_combine_signal        [2, R] int32                   slot [c, d]: rank d (epoch, after its rows)
  ex_combine_credit        [R] int32                      slot d: rank d (last combine epoch it summed)
DeepSeek-V3 shape, fp8, R = 4, 128 tokens: 2 * 64 * 512 rows of 7.4 KB, about 485 MB (a worst-case
``expert_slots``; DeepEP's low-latency buffers are of the same order). ``expert_slots`` bounds it.

B = 2 for LL (double buffer: call e uses half e % 2, no handshake; see kernels/dispatch.py) and
1 for HT (one buffer with credits: the big path keeps one copy). Bytes per rank ~=
R * (2 * M_ll + M_ht) * (H * (b + 2) + 4 * S + 8 * K + 4): linear in R, in each capacity and in H.
DeepSeek-V3 shape, fp8, R = 4: LL 128 tokens -> 22.3 MB; auto with 4096 tokens (LL 256 +
HT 4096) -> 402 MB. Besides the heap, the HT path keeps local (not symmetric) staging buffers
(``kernels/dispatch.HtStaging``): M_ht * 4 * R bytes of layout plus a histogram row per token
block, and M_ht * (H + 4 * S) bytes of quantised rows (30 MB for the 4096-token fp8 case) only
if the stage kernel quantises (the inter-node HT variant, or ``send_quantize`` off). With
``dispatch(zero_copy=True)`` the receive regions are the outputs: no second copy of the rows.
"""

from __future__ import annotations

from moe_ep.config import EpConfig
from moe_ep.transport import carve


def _path_regions(path: str, cfg: EpConfig, world_size: int, tokens: int, halves: int,
                  credits: bool) -> list[tuple[str, int]]:
    if tokens == 0:
        return []
    rows = halves * world_size * tokens
    flags = halves * 4 * world_size
    value_bytes = 1 if cfg.fp8 else 2
    sizes = [
        (f"{path}_dispatch_x", rows * cfg.hidden * value_bytes),
        (f"{path}_dispatch_scales", rows * cfg.num_scales * 4),
        (f"{path}_dispatch_topk_ids", rows * cfg.topk * 4),
        (f"{path}_dispatch_topk_weights", rows * cfg.topk * 4),
        (f"{path}_dispatch_src_token", rows * 4),
        (f"{path}_dispatch_expert_counts", flags * cfg.num_experts // world_size),
        (f"{path}_dispatch_signal", flags),
        (f"{path}_combine_x", rows * cfg.hidden * 2),
        (f"{path}_combine_signal", flags * (cfg.ht_parts if credits else 1)),
    ]
    if credits:  # HT: token ranges, credits
        sizes += [(f"{path}_dispatch_ranges", flags * (cfg.ht_parts + 1)),
                  (f"{path}_dispatch_counts", 2 * flags * world_size),
                  (f"{path}_dispatch_range_signal", flags * cfg.ht_parts),
                  (f"{path}_dispatch_credit", 4 * world_size), (f"{path}_combine_credit", 4 * world_size)]
    else:
        sizes.append((f"{path}_dispatch_count", flags))
    return sizes


def _internode_regions(cfg: EpConfig, world_size: int) -> list[tuple[str, int]]:
    nodes = cfg.nodes(world_size)
    if nodes == 1:
        return []
    per_node = world_size // nodes
    m, h = cfg.max_tokens_per_rank, cfg.hidden
    rows = 2 * nodes * m  # double-buffered, like every LL region
    value_bytes = 1 if cfg.fp8 else 2
    sizes = [
        ("inter_dispatch_x", rows * h * value_bytes),
        ("inter_dispatch_scales", rows * cfg.num_scales * 4),
        ("inter_dispatch_topk_ids", rows * cfg.topk * 4),
        ("inter_dispatch_topk_weights", rows * cfg.topk * 4),
        ("inter_dispatch_src_token", rows * 4),
        ("inter_dispatch_count", 2 * 8 * nodes),
        ("inter_dispatch_signal", 2 * 8 * nodes),
        ("inter_combine_x", per_node * rows * h * 2),
        ("inter_combine_signal", 2 * 4 * per_node),
        ("node_combine_x", rows * h * 2),
        ("node_combine_signal", 2 * 8 * nodes),
    ]
    if cfg.inter_puts:  # the sources of the puts: one call's rows per destination node
        staged = nodes * m
        sizes += [
            ("inter_stage_x", staged * h * value_bytes),
            ("inter_stage_scales", staged * cfg.num_scales * 4),
            ("inter_stage_topk_ids", staged * cfg.topk * 4),
            ("inter_stage_topk_weights", staged * cfg.topk * 4),
            ("inter_stage_src_token", staged * 4),
            ("node_stage_x", staged * h * 2),
            ("inter_stage_signal", 8 * nodes),
        ]
    return sizes


def _expert_regions(cfg: EpConfig, world_size: int) -> list[tuple[str, int]]:
    if not cfg.expert_tokens:
        return []
    experts = cfg.experts_per_rank(world_size)
    pairs = 2 * experts * cfg.slots(world_size)  # both halves
    value_bytes = 1 if cfg.fp8 else 2
    flags = 2 * 4 * world_size
    return [
        ("ex_dispatch_x", pairs * cfg.hidden * value_bytes),
        ("ex_dispatch_scales", pairs * cfg.num_scales * 4),
        ("ex_dispatch_src", pairs * 2 * 4),
        ("ex_dispatch_topk_weights", pairs * 4),
        ("ex_dispatch_topk_slot", pairs * 4),
        ("ex_dispatch_counts", flags * cfg.num_experts),
        ("ex_dispatch_count_signal", flags),
        ("ex_dispatch_signal", flags),
        ("ex_combine_x", 2 * cfg.expert_tokens * cfg.topk * cfg.hidden * 2),
        ("ex_combine_signal", flags),
        ("ex_combine_credit", 4 * world_size),
    ]


def heap_regions(cfg: EpConfig, world_size: int) -> list[tuple[str, int]]:
    """(name, bytes) of every region of one rank's arena, in order. Across nodes both variants
    of the inter-node path (LL, HT) use the double-buffered LL regions at the full capacity."""
    if cfg.nodes(world_size) > 1:
        return ([("barrier_flags", 4 * world_size), ("dispatch_calls", 4 * world_size)]
                + _path_regions("ll", cfg, world_size, cfg.max_tokens_per_rank, halves=2, credits=False)
                + _internode_regions(cfg, world_size))
    flat = "flat" in cfg.layouts
    return ([("barrier_flags", 4 * world_size), ("dispatch_calls", 4 * world_size)]
            + _path_regions("ll", cfg, world_size, cfg.ll_tokens if flat else 0, halves=2, credits=False)
            + _path_regions("ht", cfg, world_size, cfg.ht_tokens if flat else 0, halves=1, credits=True)
            + _expert_regions(cfg, world_size))


def heap_bytes(cfg: EpConfig, world_size: int) -> int:
    """Symmetric-heap bytes each rank allocates for ``cfg`` on ``world_size`` ranks."""
    return carve(heap_regions(cfg, world_size))[1]
