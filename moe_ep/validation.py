"""Checks of every public call's inputs, before any kernel is launched.

A bad call raises ``TypeError`` / ``ValueError`` here and leaves the Buffer usable. What only the
device can see without a synchronisation (expert ids out of range, an expert-layout expert with
more pairs than slots) the kernels record instead; the next check raises it
(``moe_ep.transport.BadCallError``).
"""

from __future__ import annotations

import torch

from moe_ep.config import EpConfig


def check_tensor(name: str, t, dtypes, shape, device: torch.device) -> None:
    """``t`` is a contiguous tensor of one of ``dtypes``, of ``shape``, on ``device``."""
    if (type(t) is torch.Tensor and t.dtype in dtypes and t.device == device and t.shape == shape
            and t.is_contiguous()):
        return  # the common case, in one expression (this runs on every call's host path)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, this Buffer works on {device}")
    if t.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_dispatch(cfg: EpConfig, device: torch.device, x, topk_ids, topk_weights, check_ids: bool,
                   layout: str = "flat"):
    """Dispatch inputs: ``x`` [T, hidden] bf16 or an (fp8 values, float32 scales) tuple, ``topk_ids``
    [T, topk] int32/int64, ``topk_weights`` [T, topk] float32, T <= max_tokens_per_rank (the
    expert ``layout``: cfg.expert_tokens); with ``check_ids`` also the id values (a device
    synchronisation). Returns ``(x, x_scales)``."""
    x_scales = None
    if isinstance(x, tuple):
        if not cfg.fp8 or len(x) != 2:
            raise TypeError("x may be a (fp8 values, float32 scales) tuple only for fp8 dispatch")
        x, x_scales = x
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [num_tokens, {cfg.hidden}] tensor")
    num_tokens = x.shape[0]
    if layout == "expert" and num_tokens > cfg.expert_tokens:
        raise ValueError(f"x has {num_tokens} tokens, more than the expert layout takes (EpConfig.expert_tokens="
                         f"{cfg.expert_tokens})")
    if num_tokens > cfg.max_tokens_per_rank:
        raise ValueError(f"x has {num_tokens} tokens, more than max_tokens_per_rank={cfg.max_tokens_per_rank}")
    x_dtypes = (cfg.dispatch_dtype,) if x_scales is not None else (torch.bfloat16,)
    check_tensor("x", x, x_dtypes, (num_tokens, cfg.hidden), device)
    if x_scales is not None:
        check_tensor("x_scales", x_scales, (torch.float32,), (num_tokens, cfg.num_scales), device)
    check_tensor("topk_ids", topk_ids, (torch.int32, torch.int64), (num_tokens, cfg.topk), device)
    check_tensor("topk_weights", topk_weights, (torch.float32,), (num_tokens, cfg.topk), device)
    if check_ids and num_tokens and not (device.type != "cpu" and torch.cuda.is_current_stream_capturing()):
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < -1 or high >= cfg.num_experts:
            raise ValueError(f"topk_ids must lie in [-1, {cfg.num_experts}); got values in [{low}, {high}]")
    return x, x_scales
