"""moe_ep inside serving frameworks: adapters for vLLM and SGLang.

- ``moe_ep.integrations.vllm``: prepare/finalize classes for vLLM's modular MoE kernel (activation
  formats Standard and BatchedExperts), an all2all manager that owns the Buffers, and
  ``register()``, vLLM's ``vllm.general_plugins`` entry point.
- ``moe_ep.integrations.sglang``: a token dispatcher for SGLang emitting its DEEPEP_NORMAL and
  DEEPEP_LL formats, and ``register()``, SGLang's ``sglang.srt.plugins`` entry point.

Importing this package imports no framework; importing an adapter without its framework raises an
ImportError that names the package to install. The README's "Serving frameworks" section tells
how to launch each framework with moe_ep and what was tested.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, install: str, integration: str) -> ModuleType:
    """Import ``module`` of a framework, or raise an ImportError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"moe_ep.integrations.{integration} needs {install.split('==')[0]} "
                          f"(pip install '{install}'): importing {module} failed: {err}") from err
