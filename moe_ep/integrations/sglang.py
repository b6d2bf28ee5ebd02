"""moe_ep in SGLang 0.5.23: a token dispatcher in DeepEP's place, and its registration.

SGLang runs an MoE layer as dispatch -> experts -> combine through a ``BaseDispatcher``; with
``--moe-a2a-backend deepep``, ``create_moe_dispatcher`` builds SGLang's two-batch-overlap
wrapper (``MaybeTboDeepEPDispatcher``), which holds one ``DeepEPDispatcher`` per micro-batch.
``MoeEpDispatcher`` takes DeepEPDispatcher's constructor arguments and emits DeepEP's output
formats, SGLang's own dataclasses, so its DeepEP expert runners consume them unchanged:

- ``DEEPEP_NORMAL`` (extend/prefill batches; ``--deepep-mode normal``, or ``auto`` with
  ``is_extend_in_batch``): moe_ep's flat layout. ``DeepEPNormalDispatchOutput`` holds the
  received rows ``[n, hidden]`` (and ``[n, hidden // 128]`` float32 scales when SGLang dispatches
  fp8 here, i.e. with DeepGEMM), ``topk_ids`` int64 *local* expert ids with -1 for another rank's
  expert (DeepEP normal's ``recv_topk_idx``), their weights (0 there), and
  ``num_recv_tokens_per_expert`` as a host list, each count rounded up to 128 when DeepGEMM runs
  the experts (DeepEP's ``expert_alignment``; the rows themselves are not padded). Reading ``n``
  and the counts is one host synchronisation, as DeepEP normal makes. The dispatch picks moe_ep's
  LL or HT path from the largest batch over the DP ranks (``get_dp_global_num_tokens()``, a host
  list every rank shares) and returns HT rows zero-copy unless two-batch overlap is on.
  ``DeepEPNormalCombineInput.hidden_states`` ``[n, hidden]``: each row already weighted and summed
  over the token's local experts; the combine sums the ranks.
- ``DEEPEP_LL`` (decode batches): moe_ep's expert layout. ``DeepEPLLDispatchOutput`` holds
  ``[local experts, max_tokens * ranks, hidden]`` rows (fp8 scales column-major per expert as
  DeepEP's ``low_latency_dispatch`` returns them), the source side's ``topk_ids`` (int64) and
  ``topk_weights``, ``masked_m`` (rows per local expert, a device tensor) and ``expected_m``
  computed on the host from shapes as DeepEP does. The combine weights each (token, expert) pair
  with the weights of ``DeepEPLLCombineInput`` and sums. Nothing on this path waits for the host.
``dispatch_a`` issues the sends and ``dispatch_b`` waits (the LL receive hook), ``combine_a`` /
``combine_b`` likewise; SGLang's deepep dispatch hooks run between the two halves of
``dispatch``. Two micro-batches (two dispatchers) may be in flight on the shared Buffers.

Buffers: one per configuration and process (``BUFFERS``): the flat one for normal batches
(capacity ``$MOE_EP_SGLANG_NORMAL_TOKENS`` tokens per rank, else ``--chunked-prefill-size``),
the expert-layout one for decode (``SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK``, as DeepEP),
plus ``$MOE_EP_CONFIG`` (``moe_ep.integrations._common``). Dispatch dtypes as SGLang picks
DeepEP's: fp8 (moe_ep's quantisation, 1x128 float32 scales) or bf16.

Registration: moe_ep's ``sglang.srt.plugins`` entry point (``plugins.sglang_plugin``), which
SGLang runs in every process, calls ``install()`` when ``MOE_EP_SGLANG=1``. It registers, through
SGLang's ``HookRegistry``, a class replacement of ``token_dispatcher.deepep.DeepEPDispatcher`` by
``MoeEpDispatcher`` (so the dispatcher ``create_moe_dispatcher`` returns for ``--moe-a2a-backend
deepep`` is SGLang's TBO wrapper around moe_ep, which its models' isinstance checks expect), and
an around hook that makes ``DeepEPBuffer.clean_buffer`` skip when no DeepEP buffer exists
(SGLang's CUDA-graph runner switches DeepEP's mode around capture). Not supported: single-batch overlap (combine overlap
arguments), Blackwell's UE8M0 scale formats, fp4 dispatch, NPUs.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

import moe_ep
from moe_ep.integrations import require
from moe_ep.integrations._common import (BufferCache, align_counts, column_major_scales, make_config, padded_rows,
                                         read_counts)

_INSTALL = "sglang==0.5.23"
_base = require("sglang.srt.layers.moe.token_dispatcher.base", _INSTALL, "sglang")
_deepep = require("sglang.srt.layers.moe.token_dispatcher.deepep", _INSTALL, "sglang")
_moe_utils = require("sglang.srt.layers.moe.utils", _INSTALL, "sglang")
_dp_attention = require("sglang.srt.layers.dp_attention", _INSTALL, "sglang")

NORMAL_TOKENS_ENV = "MOE_EP_SGLANG_NORMAL_TOKENS"
DEEPGEMM_ALIGNMENT = 128  # DeepEP normal's expert_alignment when DeepGEMM runs the experts
DeepEPMode = _moe_utils.DeepEPMode
BUFFERS = BufferCache()  # every dispatcher of the process (layers, TBO micro-batches) shares these


def _deep_gemm():
    return require("sglang.srt.layers.deep_gemm_wrapper", _INSTALL, "sglang")


def _default_dtype(mode: DeepEPMode, runner_backend) -> torch.dtype:
    """The dtype SGLang has DeepEP dispatch in ``mode`` (``get_deepep_output_dtype`` as DeepEP's
    dispatcher calls it at construction; the normal mode quantises only for DeepGEMM)."""
    probe = SimpleNamespace(quant_config=None, runner_backend=runner_backend, dispatch_mode=mode)
    choice = _moe_utils.get_deepep_output_dtype(probe)
    kind = _moe_utils.DispatcherOutputDtype
    if choice not in (kind.FP8, kind.BF16):
        raise NotImplementedError(f"moe_ep dispatches bf16 or fp8; SGLang asks for {choice.value}")
    deep_gemm = _deep_gemm()
    fp8 = choice == kind.FP8 and (mode == DeepEPMode.LOW_LATENCY or deep_gemm.ENABLE_JIT_DEEPGEMM)
    if fp8 and (deep_gemm.DEEPGEMM_SCALE_UE8M0 or deep_gemm.DEEPGEMM_BLACKWELL):
        raise NotImplementedError("moe_ep gives float32 1x128 scales, not DeepGEMM's UE8M0 ones (Blackwell)")
    return moe_ep.native_fp8_dtype() if fp8 else torch.bfloat16


def _default_normal_tokens() -> int:
    text = os.environ.get(NORMAL_TOKENS_ENV)
    if text:
        return int(text)
    from sglang.srt.runtime_context import get_server_args

    chunk = getattr(get_server_args(), "chunked_prefill_size", None)
    if chunk is None or chunk <= 0:
        raise ValueError(f"moe_ep needs the most tokens a rank dispatches in a prefill batch: set "
                         f"${NORMAL_TOKENS_ENV} (or --chunked-prefill-size)")
    return chunk


def shared_token_count() -> int | None:
    """The largest batch over the DP ranks of this forward pass (a host list every rank shares),
    or None where SGLang has none (every rank then falls back to the Buffer's capacity alike)."""
    counts = _dp_attention.get_dp_global_num_tokens()
    return max(counts) if counts else None


class MoeEpDispatcher(_base.BaseDispatcher):
    """DeepEP's dispatcher interface and output formats over moe_ep (see the module docstring).
    The arguments are DeepEPDispatcher's; the keyword-only ones override what SGLang's settings
    give (dispatch dtypes, token capacities, the DeepGEMM count alignment of the normal mode)."""

    def __init__(self, group, router_topk: int, permute_fusion: bool = False, num_experts: int = None,
                 num_local_experts: int = None, hidden_size: int = None, params_dtype: torch.dtype = None,
                 deepep_mode: DeepEPMode = DeepEPMode.AUTO, async_finish: bool = False, return_recv_hook: bool = False,
                 runner_backend=None, *, normal_dtype: torch.dtype | None = None,
                 low_latency_dtype: torch.dtype | None = None, normal_max_tokens: int | None = None,
                 low_latency_max_tokens: int | None = None, expert_alignment: int | None = None,
                 column_major: bool = True):
        super().__init__()
        self.group = group
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.deepep_mode = deepep_mode
        self.runner_backend = runner_backend
        self.column_major = column_major
        # DeepEPDispatcher's mask for AITER experts (ROCm): -1 slots go to a sink expert at index
        # num_local_experts, masked off; DEEPEP_NORMAL's ids here carry -1 the same way.
        self.expert_mask_gpu = None
        if _deepep._use_aiter and num_local_experts is not None:
            self.expert_mask_gpu = torch.ones(num_local_experts + 1, dtype=torch.int,
                                              device=torch.cuda.current_device())
            self.expert_mask_gpu[-1] = 0
        self._deepep_dispatch_hooks = _deepep.DeepEPPDispatchHooks()
        self._stage = "initial"
        self._dispatch_state = None
        self._combine_state = None
        self._handle = None
        self._combine_weights = None  # the LL dispatch's topk_weights (the combine's, unless SGLang passes others)
        self.last_path: str | None = None  # path of the last dispatch: for logs and tests
        common = dict(hidden=hidden_size, num_experts=num_experts, topk=router_topk)
        self.flat = self.expert = None
        if deepep_mode.enable_normal():
            if expert_alignment is None:
                expert_alignment = DEEPGEMM_ALIGNMENT if _deep_gemm().ENABLE_JIT_DEEPGEMM else 1
            dtype = normal_dtype or _default_dtype(DeepEPMode.NORMAL, runner_backend)
            self.flat = BUFFERS.get(group, make_config(
                **common, max_tokens_per_rank=normal_max_tokens or _default_normal_tokens(), dispatch_dtype=dtype,
                layouts=("flat",)))
        self.expert_alignment = expert_alignment or 1
        if deepep_mode.enable_low_latency():
            tokens = low_latency_max_tokens or _moe_utils.envs.SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK.get()
            dtype = low_latency_dtype or _default_dtype(DeepEPMode.LOW_LATENCY, runner_backend)
            self.expert = BUFFERS.get(group, make_config(**{"mode": "ll", **common}, max_tokens_per_rank=tokens,
                                                         dispatch_dtype=dtype, layouts=("expert",)))

    # -- dispatch ---------------------------------------------------------------------------------

    def dispatch(self, hidden_states: torch.Tensor, topk_output) -> _base.DispatchOutput:
        self.dispatch_a(hidden_states, topk_output)
        self._deepep_dispatch_hooks(self)
        return self.dispatch_b()

    def dispatch_a(self, hidden_states: torch.Tensor, topk_output) -> None:
        """Issue the sends of ``hidden_states`` [num_tokens, hidden] bf16 to the ranks of
        ``topk_output``'s experts (its ``topk_ids`` global, -1: none; ``topk_weights`` float32)."""
        self._advance("initial", "dispatched_a")
        x = hidden_states.contiguous()
        ids = topk_output.topk_ids.contiguous()
        weights = topk_output.topk_weights.float().contiguous()
        if self._mode().is_low_latency():
            out, hook = self.expert.dispatch(x, ids, weights, layout="expert", return_recv_hook=True)
            expected_m = (x.shape[0] * self.expert.world_size * ids.shape[1] + self.num_experts) // self.num_experts
            self._dispatch_state = ("ll", out, hook, ids.to(torch.int64), weights, expected_m)
        else:
            zero_copy = not _moe_utils.is_tbo_enabled()  # two micro-batches: the second dispatch reuses the memory
            out = self.flat.dispatch(x, ids, weights, num_tokens_hint=shared_token_count(), zero_copy=zero_copy)
            self._dispatch_state = ("normal", out)
        self._handle = out.handle
        self.last_path = out.handle.path

    def dispatch_b(self) -> _base.DispatchOutput:
        """Wait for the peers; the received tokens in DEEPEP_LL or DEEPEP_NORMAL format."""
        self._advance("dispatched_a", "dispatched")
        state, self._dispatch_state = self._dispatch_state, None
        recorder = _deepep.get_global_expert_distribution_recorder()
        if state[0] == "ll":
            _, out, hook, ids, weights, expected_m = state
            hook()
            recorder.on_deepep_dispatch_low_latency(out.tokens_per_expert)
            scales = out.x_scales
            if scales is not None and self.column_major:
                scales = column_major_scales(scales)
            self._combine_weights = weights
            return _deepep.DeepEPLLDispatchOutput(out.x, scales, ids, weights, out.tokens_per_expert, expected_m)
        out = state[1]
        num_rows, per_expert = read_counts(out.num_tokens, out.tokens_per_expert)
        if self.expert_alignment > 1:
            per_expert = align_counts(per_expert, self.expert_alignment)
        recorder.on_deepep_dispatch_normal(per_expert, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                                           num_tokens_per_expert=None)
        scales = None if out.x_scales is None else out.x_scales[:num_rows]
        return _deepep.DeepEPNormalDispatchOutput(out.x[:num_rows], scales, out.topk_ids[:num_rows].to(torch.int64),
                                                  out.topk_weights[:num_rows], per_expert)

    # -- combine ----------------------------------------------------------------------------------

    def combine(self, combine_input) -> torch.Tensor:
        self.combine_a(combine_input)
        return self.combine_b()

    def combine_a(self, combine_input) -> None:
        """Issue the sends of the expert outputs back: DEEPEP_LL ``[local experts, rows, hidden]``
        unweighted (weighted here by ``combine_input.topk_weights``), or DEEPEP_NORMAL ``[n, hidden]``
        already weighted and summed per row."""
        hidden_states, _, topk_weights = combine_input
        self._advance("dispatched", "combined_a")
        if self.overlap_args is not None:
            raise NotImplementedError("moe_ep's combine does not take SGLang's single-batch-overlap arguments")
        handle, self._handle = self._handle, None
        if handle.path == "expert":
            if topk_weights is not self._combine_weights:  # DeepEP's LL combine weights with these
                handle.pair_weights.copy_(topk_weights)
            out, hook = self.expert.combine(hidden_states.contiguous(), handle, weighted=True, return_recv_hook=True)
            self._combine_state = (out, hook)
        else:
            self._combine_state = (self.flat.combine(padded_rows(hidden_states, self.flat.capacity), handle), None)
        self._combine_weights = None

    def combine_b(self) -> torch.Tensor:
        """Wait for the peers; ``[num_tokens, hidden]`` bf16, this rank's tokens."""
        self._advance("combined_a", "initial")
        (out, hook), self._combine_state = self._combine_state, None
        if hook is not None:
            hook()
        return out

    # -- SGLang's dispatcher interface ------------------------------------------------------------

    def register_deepep_dispatch_hook(self, hook):
        """``hook(dispatcher)`` runs between the two halves of ``dispatch`` (DeepEPDispatcher's hook)."""
        return self._deepep_dispatch_hooks.register_hook(hook)

    def _mode(self) -> DeepEPMode:
        mode = self.deepep_mode.resolve(_dp_attention.get_is_extend_in_batch())
        if (mode.is_low_latency() and self.expert is None) or (mode.is_normal() and self.flat is None):
            raise RuntimeError(f"this dispatcher serves deepep_mode={self.deepep_mode.value}, not {mode.value}")
        return mode

    def _advance(self, expected: str, stage: str) -> None:
        if self._stage != expected:
            raise RuntimeError(f"MoeEpDispatcher: step '{stage}' after '{self._stage}' (dispatch_a, dispatch_b, "
                               f"combine_a, combine_b run in this order)")
        self._stage = stage


# -- registration --------------------------------------------------------------------------------

def _clean_buffer_if_any(original, cls, *args, **kwargs):
    """``DeepEPBuffer.clean_buffer`` when DeepEP made a buffer; nothing when moe_ep serves instead."""
    if cls._state().buffer is None:
        return None
    return original(cls, *args, **kwargs)


def install() -> None:
    """Register the hooks of the module docstring with SGLang's ``HookRegistry`` (its plugin loader
    applies them after the plugins ran; ``HookRegistry.apply_hooks()`` does elsewhere)."""
    hooks = require("sglang.srt.plugins.hook_registry", _INSTALL, "sglang")
    target = "sglang.srt.layers.moe.token_dispatcher.deepep"
    hooks.HookRegistry.register(f"{target}.DeepEPDispatcher", MoeEpDispatcher, hooks.HookType.REPLACE)
    hooks.HookRegistry.register(f"{target}.DeepEPBuffer.clean_buffer", _clean_buffer_if_any, hooks.HookType.AROUND)
