"""What the framework adapters share: Buffers per configuration, user overrides, host counts and
the layouts DeepEP gave the frameworks (which their expert kernels expect from us too).

Configuration: the framework decides ``hidden``, ``num_experts``, ``topk``, the token capacity,
the dispatch dtype and the layout; ``$MOE_EP_CONFIG`` (a JSON object) may set any other
``EpConfig`` field, e.g. ``MOE_EP_CONFIG='{"crossover_tokens": 512, "timeout_s": 30}'``. Every
rank must see the same value (``Buffer()`` checks that the ranks agree).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from moe_ep.buffer import Buffer
from moe_ep.config import EpConfig

CONFIG_ENV = "MOE_EP_CONFIG"
# Decided by the framework's layer: not settable through $MOE_EP_CONFIG.
FRAMEWORK_FIELDS = ("hidden", "num_experts", "topk", "max_tokens_per_rank", "dispatch_dtype", "layouts")


def config_overrides() -> dict:
    """The ``EpConfig`` fields ``$MOE_EP_CONFIG`` sets (empty when unset)."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"${CONFIG_ENV} must be a JSON object of EpConfig fields, got {text!r}: {err}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"${CONFIG_ENV} must be a JSON object of EpConfig fields, got {text!r}")
    names = {f.name for f in dataclasses.fields(EpConfig)}
    unknown = sorted(set(overrides) - names)
    fixed = sorted(set(overrides) & set(FRAMEWORK_FIELDS))
    if unknown or fixed:
        raise ValueError(f"${CONFIG_ENV}: {'unknown EpConfig fields ' + str(unknown) if unknown else ''}"
                         f"{'; ' if unknown and fixed else ''}"
                         f"{'fields the framework decides ' + str(fixed) if fixed else ''}")
    return overrides


def make_config(**fields) -> EpConfig:
    """``EpConfig(**fields)`` with ``$MOE_EP_CONFIG`` applied on top (``fields`` may hold defaults
    of the adapter, e.g. the mode, which the overrides replace)."""
    return EpConfig(**{**fields, **config_overrides()})


class BufferCache:
    """One ``moe_ep.Buffer`` per (process group, EpConfig), made on first request. Making one is
    collective: every rank of the group must request the same configurations in the same order
    (the layers of a model do: each rank builds the same layers)."""

    def __init__(self):
        self._buffers: dict[tuple[dist.ProcessGroup, EpConfig], Buffer] = {}

    def get(self, group: dist.ProcessGroup, cfg: EpConfig) -> Buffer:
        key = (group, cfg)  # groups compare by identity
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = Buffer(group, cfg)
        return buf

    def __len__(self) -> int:
        return len(self._buffers)

    def close(self) -> None:
        """Close every Buffer (collective, like their construction)."""
        for buf in self._buffers.values():
            buf.close()
        self._buffers.clear()


def read_counts(num_tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[int, list[int]]:
    """A flat dispatch's received rows and rows per local expert on the host, in one
    device-to-host copy (a synchronisation: the prefill path of DeepEP's normal mode makes the same
    one, and the frameworks size their expert kernels from it)."""
    counts = torch.cat([num_tokens.reshape(1), tokens_per_expert]).tolist()
    return counts[0], counts[1:]


def align_counts(counts: list[int], alignment: int) -> list[int]:
    """Each count rounded up to a multiple of ``alignment`` (DeepEP's ``expert_alignment``)."""
    return [-(-c // alignment) * alignment for c in counts]


def column_major_scales(scales: torch.Tensor) -> torch.Tensor:
    """``[experts, rows, groups]`` float32 scales with the same values, laid out as DeepEP's
    ``low_latency_dispatch`` returns them: each expert's ``[rows, groups]`` block column-major
    (strides ``(groups * rows, 1, rows)``), which grouped fp8 GEMMs read with TMA. One copy."""
    return scales.transpose(1, 2).contiguous().transpose(1, 2)


def padded_rows(rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[n, hidden]`` bf16 rows as the ``[capacity, hidden]`` contiguous tensor a flat combine takes
    (rows past n are never read): ``rows`` itself when it already is one, else a copy."""
    if rows.shape[0] == capacity and rows.dtype == torch.bfloat16 and rows.is_contiguous():
        return rows
    y = torch.empty(capacity, rows.shape[1], dtype=torch.bfloat16, device=rows.device)
    y[:rows.shape[0]].copy_(rows)
    return y
