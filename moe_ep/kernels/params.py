"""Launch parameters of every kernel family, in one place, with defaults from pure functions.

Each family has a small validated dataclass; ``default_dispatch`` / ``default_combine`` give
values that are good everywhere (by path and token bucket, see ``moe_ep.tuning``) and
``dataclasses.replace`` overrides them field by field; ``moe_ep.tuning`` swaps in tuned ones.
Parameters are local to a rank (no peer needs to know them), so ranks may even run different ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import triton


def _check_positive(obj) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.type in ("bool", bool):  # a switch (False / True, or 0 / 1 from a JSON table)
            if value not in (0, 1):
                raise ValueError(f"{type(obj).__name__}.{f.name} must be a bool, got {value!r}")
        elif not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{f.name} must be a positive int, got {value!r}")


def _check_power_of_two(obj, *names) -> None:
    for name in names:
        value = getattr(obj, name)
        if value & (value - 1):
            raise ValueError(f"{type(obj).__name__}.{name} must be a power of two, got {value}")


@dataclass(frozen=True)
class DispatchParams:
    send_programs: int  # programs that send tokens (token t goes to program t % this)
    recv_parts: int  # programs per source rank that lay its rows out
    stage_programs: int  # HT: programs of the stage kernel (layout + quantisation)
    block_h: int  # values of a row moved per step (a multiple of 128)
    block_t: int  # tokens per step of the routing prefix sum
    block_copy: int  # elements per step of the receive side's flat copies
    num_warps: int
    forward_parts: int = 1  # inter-node: programs per other node that forward its staged tokens
    token_parts: int = 1  # send programs that share a token, each its own block_h chunks (intra-node)
    # HT stage: tokens per step of a block's prefix over the blocks ahead of it. Run 13 (H200, EP2,
    # 4096 tokens): the layout takes 43 us with 128 (and a histogram of every block in the chain),
    # 13 with 512, 12 with 1024 — whose larger tiles sometimes slow the same kernel's quantisation
    # (stage 79 us against 61).
    block_scan: int = 512
    send_groups: int = 1  # HT: the token ranges (EpConfig.ht_parts) are sent in this many groups, each laid
    #                       out by the receivers once sent (at most ht_parts; 1: after every send; run 13)
    # HT, bf16 input to an fp8 dispatch: quantise in the send programs (each token once, stored
    # to every destination, under the sends, as LL does) instead of in the stage kernel before any send.
    # Run 14 (4 x H200, EP4): 4096 tokens 322 -> 313 us (zero copy), 381 -> 366 (copy out); 128
    # tokens 33.0 -> 29.4 / 39.0 -> 35.5.
    send_quantize: bool = True

    def __post_init__(self):
        _check_positive(self)
        _check_power_of_two(self, "block_h", "block_t", "block_copy", "num_warps", "block_scan")
        if self.block_h % 128:
            raise ValueError(f"DispatchParams.block_h must be a multiple of 128, got {self.block_h}")
        if self.send_programs % self.token_parts:
            raise ValueError(f"DispatchParams.send_programs ({self.send_programs}) must be a multiple of "
                             f"token_parts ({self.token_parts})")


@dataclass(frozen=True)
class CombineParams:
    send_programs: int  # programs that send expert outputs back (row i goes to program i % this)
    reduce_programs: int  # programs that sum the partials of this rank's tokens
    block_h: int  # values of a row per step
    num_warps: int
    proxy_programs: int = 1  # inter-node: programs that pre-sum the own node's partials per token
    rows: int = 1  # intra-node: adjacent rows a send program moves at once
    reduce_delay: int = 1  # HT: 1 puts each token range's reducers right after its senders, 2 one range later

    def __post_init__(self):
        _check_positive(self)
        _check_power_of_two(self, "block_h", "num_warps", "rows")
        if self.reduce_delay not in (1, 2):
            raise ValueError(f"CombineParams.reduce_delay must be 1 or 2, got {self.reduce_delay}")


def _row_block(hidden: int) -> int:
    """A whole row per step up to 8192 values (one load per token), else 8192 at a time."""
    return min(8192, max(128, triton.next_power_of_2(hidden)))


# HT programs, measured on 2 x H200 at 4096 tokens (benchmarks/NOTES.md, runs 4-6): dispatch is
# best with 2 per multiprocessor of an H100/H200 (132) — 262 us against 275-279 us with 8 —,
# combine with 8 per multiprocessor (268 us against 307 us with 2).
_HT_DISPATCH_PROGRAMS = 264
# The HT stage kernel quantises a token per program at a time, so with 264 programs it is
# latency-bound: 2 x H100, EP2, 4096 tokens, fp8 dispatch 285 us, 238 with 1056 stage programs,
# 231 with 2112; 215 when the caller passes fp8 data (no quantisation; run 12). Up to one a token.
_HT_STAGE_PROGRAMS = 2112
_HT_COMBINE_PROGRAMS = 1056
# HT combine senders, about one a token up to this. Run 11 (4 x H100) found 4224 best (send phase
# 757 us with 1056, 609 with 4224), but then every rank sent to rank 0 first, then to rank 1, ...;
# with the sends rotated by rank (run 15, 4 x H200, EP4, 4096 tokens, reduce_delay 2) 1056 are
# best: 513.9 us, 2112 516.4, 4224 565.4; the EP2 tuner too chose 512 at 512 tokens, 1056 at 4096.
_HT_COMBINE_SEND_PROGRAMS = 1056
_LL_LARGE_COMBINE_PROGRAMS = 2112
_HT_SMALL_COMBINE_PROGRAMS = 264  # a side, up to 128 tokens (run 10's H200 tuning, below)
# The HT combine in token ranges (EpConfig.ht_parts), 2 x H100, EP2, run 12: senders
# scale with the tokens — 512 tokens: 4224 senders 72 us, 528 42 us; 1024: 4224 96 us, 1056 81 —
# and each range's reducers one send group later (reduce_delay 2) gain 5-10 us (4096: 228 -> 218).
# (Run 15 kept reduce_delay 2: with 1056 senders it was the tuner's choice at EP2 and EP4.)


# LL rules from the tuning of 4 x H200 (benchmarks/NOTES.md run 10; moe_ep/tuned/nvidia-h200.json):
# fp8 dispatch up to 128 tokens gains 2-5 us from splitting each token over 4 programs (its
# quantisation then runs on 4 programs), 256 send programs beat 128 from 128 tokens on
# (4096: 453 -> 381 us), 32 receive programs per source beat 16 (bf16 4096: 655 -> 611 us); HT
# combine up to 128 tokens is 5 us faster with 264 programs per side than with 1056.
_LL_TOKEN_PARTS = 4
_LL_RECV_PARTS = 32


def default_dispatch(path: str, hidden: int, world_size: int, bucket: int, on_gpu: bool,
                     dispatch_dtype: str = "fp8") -> DispatchParams:
    """Defaults for the ``path`` dispatch of up to ``bucket`` tokens of ``hidden`` values in
    ``dispatch_dtype`` ("fp8" or "bf16")."""
    if not on_gpu:  # the interpreter runs programs one after another: few, wide programs
        # Small token blocks: the test shapes' few tokens span several, as thousands do on a GPU.
        # Two send groups: the test shapes take the overlapped receive too.
        return DispatchParams(send_programs=2, recv_parts=1, stage_programs=2, block_h=_row_block(hidden),
                              block_t=4, block_copy=4096, num_warps=4, block_scan=4, send_groups=2)
    stage = min(_HT_STAGE_PROGRAMS, max(_HT_DISPATCH_PROGRAMS, bucket))
    if path == "inter_ht":  # HT-sized programs after the stage kernel, plus forwarders for each other node
        return DispatchParams(send_programs=_HT_DISPATCH_PROGRAMS, recv_parts=max(2, 128 // world_size),
                              stage_programs=stage, block_h=_row_block(hidden), block_t=128,
                              block_copy=8192, num_warps=8, forward_parts=32)
    if path == "inter":  # LL-sized programs, plus forwarders for each other node
        return DispatchParams(send_programs=max(1, min(bucket, 128)), recv_parts=max(2, 64 // world_size),
                              stage_programs=1, block_h=_row_block(hidden), block_t=128, block_copy=8192,
                              num_warps=8, forward_parts=16)
    if path == "expert":  # LL-sized: each pair's row stored by the program of its token
        parts = _LL_TOKEN_PARTS if dispatch_dtype == "fp8" and hidden >= _LL_TOKEN_PARTS * 1024 else 1
        return DispatchParams(send_programs=min(256, max(32, parts * bucket)) // parts * parts, recv_parts=1,
                              stage_programs=1, block_h=1024 if parts > 1 else _row_block(hidden), block_t=32,
                              block_copy=8192, num_warps=8, token_parts=parts)
    if path == "ll":
        if dispatch_dtype == "fp8" and bucket <= 128 and hidden >= _LL_TOKEN_PARTS * 1024:  # 4 programs a token
            return DispatchParams(send_programs=min(256, max(32, _LL_TOKEN_PARTS * bucket)),
                                  recv_parts=_LL_RECV_PARTS, stage_programs=1, block_h=1024, block_t=128,
                                  block_copy=8192, num_warps=8, token_parts=_LL_TOKEN_PARTS)
        send = 256 if dispatch_dtype == "fp8" and bucket > 128 else max(1, min(bucket, 128))  # bf16: a token each
        return DispatchParams(send_programs=send, recv_parts=_LL_RECV_PARTS, stage_programs=1,
                              block_h=_row_block(hidden), block_t=128, block_copy=8192, num_warps=8)
    return DispatchParams(send_programs=_HT_DISPATCH_PROGRAMS, recv_parts=max(2, 128 // world_size),
                          stage_programs=stage, block_h=_row_block(hidden), block_t=128, block_copy=8192,
                          num_warps=8)


def default_combine(path: str, hidden: int, world_size: int, bucket: int, on_gpu: bool,
                    dispatch_dtype: str = "fp8") -> CombineParams:
    """Defaults for the ``path`` combine back to up to ``bucket`` tokens of ``hidden`` values."""
    if not on_gpu:
        return CombineParams(send_programs=2, reduce_programs=2, block_h=_row_block(hidden), num_warps=4)
    if path == "ll" and bucket > 256:  # LL forced past its range: HT-like numbers of programs
        return CombineParams(send_programs=_LL_LARGE_COMBINE_PROGRAMS,
                             reduce_programs=min(bucket, _LL_LARGE_COMBINE_PROGRAMS),
                             block_h=min(4096, _row_block(hidden)), num_warps=8)
    if path in ("ll", "inter", "expert"):
        return CombineParams(send_programs=128, reduce_programs=max(1, min(bucket, 128)),
                             block_h=min(4096, _row_block(hidden)), num_warps=8, proxy_programs=64)
    if path == "ht" and bucket <= 128:
        send = reduce = _HT_SMALL_COMBINE_PROGRAMS
    elif path == "ht":  # about a sender per token (run 12)
        send, reduce = min(_HT_COMBINE_SEND_PROGRAMS, max(_HT_SMALL_COMBINE_PROGRAMS, bucket)), _HT_COMBINE_PROGRAMS
    else:  # inter_ht keeps 1056 senders (not measured with more)
        send, reduce = _HT_COMBINE_PROGRAMS, _HT_COMBINE_PROGRAMS
    return CombineParams(send_programs=send, reduce_programs=max(1, min(bucket, reduce)),
                         block_h=min(4096, _row_block(hidden)), num_warps=8,
                         proxy_programs=256 if path == "inter_ht" else 1, reduce_delay=2 if path == "ht" else 1)
