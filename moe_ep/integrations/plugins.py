"""The frameworks' plugin entry points (``pyproject.toml``): vLLM's ``vllm.general_plugins`` and
SGLang's ``sglang.srt.plugins`` call these in every process of theirs once moe_ep is installed.
Each does nothing, and imports nothing, unless its switch is set (``MOE_EP_VLLM=1`` /
``MOE_EP_SGLANG=1``); then it installs the adapter (``moe_ep.integrations.vllm.install`` /
``moe_ep.integrations.sglang.install``)."""

from __future__ import annotations

import os

VLLM_ENV = "MOE_EP_VLLM"
SGLANG_ENV = "MOE_EP_SGLANG"


def enabled(env: str) -> bool:
    return os.environ.get(env, "0") not in ("", "0")


def vllm_plugin() -> None:
    if enabled(VLLM_ENV):
        from moe_ep.integrations.vllm import install

        install()


def sglang_plugin() -> None:
    if enabled(SGLANG_ENV):
        from moe_ep.integrations.sglang import install

        install()
