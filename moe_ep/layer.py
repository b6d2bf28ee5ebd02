"""An expert-parallel MoE layer on the public API, and the dense oracle it is measured against.

``EpMoELayer(buffer, ffn, seed)`` routes each token (softmax over ``x @ w_router``, top-k,
weights renormalised, float32), dispatches it with ``Buffer.dispatch``, runs this rank's experts
(SwiGLU MLPs with bf16 weights, float32 math) on the received rows, and sends the weighted
outputs back with ``Buffer.combine``. ``dense_moe_reference`` computes the same MoE in one
process over every expert, in float32, with no communication.

Weights are a pure function of ``(seed, expert)``: every rank gets the same values for the
same expert, so rank r builds only its slice (experts ``[r*E/R, (r+1)*E/R)``) and a test builds
all of them for the reference. The layer reads ``num_tokens`` on the host (one sync per call);
it is a correctness harness for dispatch and combine, not a fast expert kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ep import reference
from moe_ep.buffer import Buffer

_ROUTER_STREAM = 0  # generator stream of the router; expert e uses stream e + 1


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    # One independent stream per (seed, tensor owner): ranks agree without building everything.
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + stream)


def make_router_weight(hidden: int, num_experts: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[hidden, num_experts]`` float32 router weight, the same on every rank for one seed."""
    device = torch.device(device)
    gen = _generator(seed, _ROUTER_STREAM, device)
    return torch.randn(hidden, num_experts, generator=gen, device=device) / hidden ** 0.5


@dataclass(frozen=True)
class ExpertWeights:
    """SwiGLU weights of the experts ``[first_expert, first_expert + num_experts)``."""

    w_gate: torch.Tensor  # [num_experts, hidden, ffn] bf16
    w_up: torch.Tensor  # [num_experts, hidden, ffn] bf16
    w_down: torch.Tensor  # [num_experts, ffn, hidden] bf16
    first_expert: int  # global id of expert 0 of these tensors

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]


def make_expert_weights(hidden: int, ffn: int, experts: range, seed: int,
                        device: torch.device | str = "cpu") -> ExpertWeights:
    """bf16 SwiGLU weights of the global experts in ``experts`` (a contiguous range).

    Expert e's weights depend only on ``(seed, e)`` and the device type, so a rank that builds
    its slice gets exactly the rows of the full set. Scaled so activations stay of order one.
    """
    if experts.step != 1:
        raise ValueError("experts must be a contiguous range")
    device = torch.device(device)
    w_gate, w_up, w_down = [], [], []
    for e in experts:
        gen = _generator(seed, e + 1, device)
        w_gate.append(torch.randn(hidden, ffn, generator=gen, device=device) / hidden ** 0.5)
        w_up.append(torch.randn(hidden, ffn, generator=gen, device=device) / hidden ** 0.5)
        w_down.append(torch.randn(ffn, hidden, generator=gen, device=device) / ffn ** 0.5)

    def stack(ws, shape):
        return torch.stack(ws).to(torch.bfloat16) if ws else torch.empty(0, *shape, dtype=torch.bfloat16, device=device)

    return ExpertWeights(stack(w_gate, (hidden, ffn)), stack(w_up, (hidden, ffn)), stack(w_down, (ffn, hidden)),
                         experts.start)


def route(x: torch.Tensor, w_router: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: softmax over ``x @ w_router`` in float32, top-k, weights renormalised.

    x         [num_tokens, hidden] bf16
    w_router  [hidden, num_experts] float32
    Returns (topk_ids [num_tokens, topk] int64 global expert ids, never -1;
             topk_weights [num_tokens, topk] float32, each row summing to 1).
    """
    probs = torch.softmax(x.float() @ w_router.float(), dim=-1)  # [num_tokens, num_experts]
    topk_weights, topk_ids = probs.topk(topk, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_ids, topk_weights


def expert_forward(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert in float32: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``.

    x [num_rows, hidden] float32; w_gate, w_up [hidden, ffn] and w_down [ffn, hidden] bf16.
    Returns [num_rows, hidden] float32.
    """
    gate = x @ w_gate.float()
    up = x @ w_up.float()
    return (torch.nn.functional.silu(gate) * up) @ w_down.float()


def _weighted_experts(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                      experts: ExpertWeights) -> torch.Tensor:
    """``[num_rows, hidden]`` float32: per row, sum_k weights[k] * expert_{local_ids[k]}(row)
    over the k with ``0 <= local_ids[k] < experts.num_experts`` (-1 elsewhere: skipped)."""
    acc = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(experts.num_experts):
        rows, ks = (local_ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        out = expert_forward(x[rows], experts.w_gate[e], experts.w_up[e], experts.w_down[e])
        acc.index_add_(0, rows, out * weights[rows, ks, None])
    return acc


def run_local_experts(received, experts: ExpertWeights) -> torch.Tensor:
    """The expert side of an EP layer: this rank's experts over the rows of a dispatch.

    received  a ``moe_ep.DispatchOutput``: x [capacity, hidden] bf16 or fp8 (with x_scales
              [capacity, hidden // 128] float32), topk_ids [capacity, topk] int32 local expert
              ids (-1: an expert on another rank), topk_weights [capacity, topk] float32,
              num_tokens [1] int32 (rows [0, num_tokens) are valid)
    experts   this rank's experts (local id i is ``experts.first_expert + i``)
    Returns [capacity, hidden] bf16: row i = sum_k w_k * expert_{id_k}(x_i) over valid k, computed
    in float32 and rounded once; rows past num_tokens are zeros (combine never reads them).
    """
    capacity, hidden = received.x.shape
    n = int(received.num_tokens.item())
    if received.x_scales is not None:
        x = reference.dequantize_fp8(received.x[:n], received.x_scales[:n])
    else:
        x = received.x[:n].float()
    y = torch.zeros(capacity, hidden, dtype=torch.bfloat16, device=received.x.device)
    y[:n] = _weighted_experts(x, received.topk_ids[:n].long(), received.topk_weights[:n], experts).to(torch.bfloat16)
    return y


class EpMoELayer:
    """An MoE layer whose experts are spread over the ranks of ``buffer``'s group.

    buffer  a ``moe_ep.Buffer`` (its ``cfg`` gives hidden, num_experts, topk, dispatch dtype);
            the layer does not own it (close it yourself)
    ffn     intermediate size of each SwiGLU expert
    seed    weight seed: every rank of the group must pass the same one
    """

    def __init__(self, buffer: Buffer, ffn: int, seed: int = 0):
        cfg = buffer.cfg
        self.buffer = buffer
        self.topk = cfg.topk
        self.w_router = make_router_weight(cfg.hidden, cfg.num_experts, seed, buffer.device)
        first = buffer.rank * buffer.experts_per_rank
        self.experts = make_expert_weights(cfg.hidden, ffn, range(first, first + buffer.experts_per_rank), seed,
                                           buffer.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] bf16 (0 <= num_tokens <= max_tokens_per_rank) ->
        [num_tokens, hidden] bf16: sum over the token's top-k experts of weight * expert(x)."""
        topk_ids, topk_weights = route(x, self.w_router, self.topk)
        received = self.buffer.dispatch(x, topk_ids, topk_weights)
        y = run_local_experts(received, self.experts)
        return self.buffer.combine(y, received.handle)

    __call__ = forward


def dense_moe_reference(x: torch.Tensor, w_router: torch.Tensor, experts: ExpertWeights, topk: int) -> torch.Tensor:
    """The same MoE in one process, over every expert, in float32, without communication.

    x         [num_tokens, hidden] bf16
    w_router  [hidden, num_experts] float32
    experts   the weights of all num_experts experts (``first_expert`` 0)
    Returns [num_tokens, hidden] float32 (no rounding of the expert outputs or of the sum).
    """
    if experts.first_expert != 0 or experts.num_experts != w_router.shape[1]:
        raise ValueError("dense_moe_reference needs the weights of every expert")
    topk_ids, topk_weights = route(x, w_router, topk)
    return _weighted_experts(x.float(), topk_ids, topk_weights, experts)
