"""EpConfig: the shape of one expert-parallel MoE layer and how its tokens move."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)  # OCP fp8 (NVIDIA, MI355X); MI300X's fp8
DISPATCH_DTYPES = (torch.bfloat16,) + FP8_DTYPES
MODES = ("auto", "ll", "ht")
INTER_TRANSPORTS = ("auto", "peer", "put")
INTER_PATHS = ("inter", "inter_ht")  # the inter-node path's LL and HT variants
LAYOUTS = ("flat", "expert")  # dispatch output layouts (see EpConfig.layouts)
QUANT_BLOCK = 128  # values per fp8 scale
DEFAULT_LL_MAX_TOKENS = 256  # LL capacity per rank in "auto" mode
# "auto" takes LL up to this many tokens per rank (the count all ranks share), HT above.
# Measured (benchmarks/NOTES.md, H200, DeepSeek-V3 shape, dispatch + combine): EP2 at 256;
# EP4 between 128 (LL 70 vs HT 84 us) and 512 (LL 221 vs HT 213 us).
DEFAULT_CROSSOVER_TOKENS = 256
# The HT combine sums each rank's tokens in this many ranges, overlapping the sums with the
# sends of later ranges (benchmarks/NOTES.md run 12). At most one arrival counter per range.
DEFAULT_HT_PARTS = 4
MAX_HT_PARTS = 32


@dataclass(frozen=True)
class EpConfig:
    """One MoE layer's expert parallelism.

    hidden               values per token row
    num_experts          experts over all ranks; rank r holds [r*E/R, (r+1)*E/R)
    topk                 experts per token (ids of -1 mean "no expert")
    max_tokens_per_rank  most tokens one rank may dispatch in one call
    dispatch_dtype       torch.bfloat16, or fp8 with 1x128 float32 block scales: torch.float8_e4m3fn
                         (NVIDIA, MI355X) or torch.float8_e4m3fnuz (MI300X; ``moe_ep.native_fp8_dtype()``
                         gives the device's)
    mode                 "ll" (low latency), "ht" (high throughput) or "auto" (the scheduler picks)
    backend              symmetric-heap backend ("host", "cuda", "hip", "nvshmem"); None picks by device
                         ("hip" on ROCm GPUs: moe_ep.transport.heap)
    timeout_s            how long a kernel waits for a peer before reporting a timeout
    gpus_per_node        ranks per node (consecutive ranks form a node); None: all on one node
    ll_max_tokens        "auto": the most tokens per rank the LL path takes (its heap grows with it)
    crossover_tokens     "auto": LL up to this shared token count (and ll_max_tokens), HT above
    inter_transport      how a token crosses between nodes: "put" (staged in the own arena, put,
                         completed, then signalled: NVSHMEM/rocSHMEM calls on the "nvshmem" heap,
                         else the same steps over peer pointers), "peer" (stored straight into
                         the proxy's arena: simulated nodes only), "auto" ("put" on the "nvshmem"
                         heap, else "peer")
    ht_parts             HT: each rank's tokens form this many ranges. The dispatch signals each
                         range once sent, and a receiver lays it out while later ranges are still
                         being sent; the combine sums each range as soon as every rank has sent
                         its rows back (1: no overlap)
    layouts              the dispatch output layouts this Buffer serves (each has heap regions of its
                         own): "flat" ([capacity, hidden] rows in source order, the default) and/or
                         "expert" (``dispatch(..., layout="expert")``: [experts_per_rank, slots, hidden],
                         one row per (token, expert) pair, written in place by the senders; LL-sized
                         batches: up to ``expert_tokens`` tokens per rank; one node only)
    expert_slots         rows per local expert in the "expert" layout (None: the worst case,
                         expert_tokens * world size); a call that would overflow them is an error
    """

    hidden: int
    num_experts: int
    topk: int
    max_tokens_per_rank: int
    dispatch_dtype: torch.dtype = torch.bfloat16
    mode: str = "auto"
    backend: str | None = None
    timeout_s: float = 60.0
    gpus_per_node: int | None = None
    ll_max_tokens: int = DEFAULT_LL_MAX_TOKENS
    crossover_tokens: int = DEFAULT_CROSSOVER_TOKENS
    inter_transport: str = "auto"
    ht_parts: int = DEFAULT_HT_PARTS
    layouts: tuple = ("flat",)
    expert_slots: int | None = None

    def __post_init__(self):
        for name in ("hidden", "num_experts", "topk", "max_tokens_per_rank", "ll_max_tokens", "crossover_tokens",
                     "ht_parts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EpConfig.{name} must be a positive int, got {value!r}")
        if self.dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"EpConfig.dispatch_dtype must be one of {DISPATCH_DTYPES}, got {self.dispatch_dtype}")
        if self.fp8 and self.hidden % QUANT_BLOCK:
            raise ValueError(f"fp8 dispatch needs hidden to be a multiple of {QUANT_BLOCK}, got {self.hidden}")
        if self.topk > self.num_experts:
            raise ValueError(f"EpConfig.topk ({self.topk}) exceeds num_experts ({self.num_experts})")
        if self.mode not in MODES:
            raise ValueError(f"EpConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.gpus_per_node is not None and (not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1):
            raise ValueError(f"EpConfig.gpus_per_node must be a positive int or None, got {self.gpus_per_node!r}")
        if self.inter_transport not in INTER_TRANSPORTS:
            raise ValueError(f"EpConfig.inter_transport must be one of {INTER_TRANSPORTS}, got {self.inter_transport!r}")
        if self.ht_parts > MAX_HT_PARTS:
            raise ValueError(f"EpConfig.ht_parts must be at most {MAX_HT_PARTS}, got {self.ht_parts}")
        if not self.timeout_s > 0:
            raise ValueError(f"EpConfig.timeout_s must be positive, got {self.timeout_s}")
        if isinstance(self.layouts, str) or not self.layouts or any(lay not in LAYOUTS for lay in self.layouts):
            raise ValueError(f"EpConfig.layouts must be a non-empty tuple of {LAYOUTS}, got {self.layouts!r}")
        object.__setattr__(self, "layouts", tuple(dict.fromkeys(self.layouts)))
        if self.expert_slots is not None and (not isinstance(self.expert_slots, int) or self.expert_slots < 1):
            raise ValueError(f"EpConfig.expert_slots must be a positive int or None, got {self.expert_slots!r}")

    @property
    def fp8(self) -> bool:
        return self.dispatch_dtype in FP8_DTYPES

    @property
    def inter_puts(self) -> bool:
        """Whether the inter-node legs are puts (see inter_transport)."""
        return self.inter_transport == "put" or (self.inter_transport == "auto" and self.backend == "nvshmem")

    @property
    def inter_shmem(self) -> bool:
        """Whether those puts are NVSHMEM/rocSHMEM calls (the "nvshmem" heap) rather than copies
        through peer pointers."""
        return self.inter_puts and self.backend == "nvshmem"

    @property
    def num_scales(self) -> int:
        """float32 scales per token row (0 for bf16 dispatch)."""
        return self.hidden // QUANT_BLOCK if self.fp8 else 0

    @property
    def ll_tokens(self) -> int:
        """Tokens per rank the LL path takes (0: no LL path)."""
        if self.mode == "ht":
            return 0
        if self.mode == "ll":
            return self.max_tokens_per_rank
        return min(self.max_tokens_per_rank, self.ll_max_tokens, self.crossover_tokens)

    @property
    def ht_tokens(self) -> int:
        """Tokens per rank the HT path takes (0: no HT path; "auto" never takes HT when every
        call fits the LL path)."""
        if self.mode == "ll" or (self.mode == "auto" and self.max_tokens_per_rank <= self.ll_tokens):
            return 0
        return self.max_tokens_per_rank

    @property
    def expert_tokens(self) -> int:
        """Tokens per rank the "expert" layout takes (0: not among ``layouts``): the LL capacity
        (decode-sized batches), or max_tokens_per_rank in mode "ht"."""
        if "expert" not in self.layouts:
            return 0
        return self.ll_tokens or self.max_tokens_per_rank

    def slots(self, world_size: int) -> int:
        """Rows per local expert of the "expert" layout's outputs."""
        return self.expert_slots or self.expert_tokens * world_size

    @staticmethod
    def path_options(path: str, gpus_per_node: int | None = None) -> dict:
        """Keyword arguments that make every call of a Buffer take ``path``: "ll", "ht" or "auto"
        as the mode, or "inter" / "inter_ht" (the inter-node path's LL / HT variant: mode "ll" / "ht"
        across nodes of gpus_per_node)."""
        if path in INTER_PATHS:
            return {"mode": "ll" if path == "inter" else "ht", "gpus_per_node": gpus_per_node}
        return {"mode": path}

    def nodes(self, world_size: int) -> int:
        """Nodes of ``gpus_per_node`` consecutive ranks (1 when gpus_per_node is None)."""
        per_node = self.gpus_per_node or world_size
        if world_size % per_node:
            raise ValueError(f"the world size ({world_size}) is not a multiple of gpus_per_node ({per_node})")
        return world_size // per_node

    def experts_per_rank(self, world_size: int) -> int:
        if self.num_experts % world_size:
            raise ValueError(f"num_experts ({self.num_experts}) is not divisible by the world size ({world_size})")
        return self.num_experts // world_size

    def capacity(self, world_size: int) -> int:
        """Rows of every dispatch output: max_tokens_per_rank * world_size."""
        return self.max_tokens_per_rank * world_size
