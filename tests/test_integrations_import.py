"""The framework adapters without their frameworks (default CI, no vLLM or SGLang needed; under a
second): importing an adapter says what to install, the plugin entry points do nothing and import
nothing unless switched on, and $MOE_EP_CONFIG is checked. The adapters themselves are tested
against the frameworks by ``make test-integrations`` (tests/integrations/)."""

import importlib
import re
import sys

import pytest

from moe_ep.integrations import _common, plugins

ADAPTERS = [pytest.param("vllm", "vllm==0.33.0", plugins.VLLM_ENV, "vllm_plugin", id="vllm"),
            pytest.param("sglang", "sglang==0.5.23", plugins.SGLANG_ENV, "sglang_plugin", id="sglang")]


@pytest.mark.parametrize("framework, install, env, plugin", ADAPTERS)
def test_adapter_without_framework_names_what_to_install(monkeypatch, framework, install, env, plugin):
    monkeypatch.setitem(sys.modules, framework, None)  # not importable here, even where it is installed
    monkeypatch.delitem(sys.modules, f"moe_ep.integrations.{framework}", raising=False)
    message = re.escape(f"moe_ep.integrations.{framework} needs {framework} (pip install '{install}')")
    with pytest.raises(ImportError, match=message):
        importlib.import_module(f"moe_ep.integrations.{framework}")
    monkeypatch.setenv(env, "1")  # the switched-on plugin fails the same way
    with pytest.raises(ImportError, match=message):
        getattr(plugins, plugin)()


@pytest.mark.parametrize("framework, install, env, plugin", ADAPTERS)
def test_plugin_switched_off_does_nothing(monkeypatch, framework, install, env, plugin):
    for value in (None, "", "0"):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
        before = set(sys.modules)
        assert getattr(plugins, plugin)() is None
        loaded = {m for m in set(sys.modules) - before if m.split(".")[0] in ("vllm", "sglang") or
                  m.startswith("moe_ep.integrations.")}
        assert not loaded, loaded


def test_config_overrides(monkeypatch):
    monkeypatch.delenv(_common.CONFIG_ENV, raising=False)
    assert _common.config_overrides() == {}
    monkeypatch.setenv(_common.CONFIG_ENV, '{"crossover_tokens": 512, "timeout_s": 30}')
    cfg = _common.make_config(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=1024, mode="ll")
    assert (cfg.crossover_tokens, cfg.timeout_s, cfg.mode) == (512, 30, "ll")
    for text, match in [('{"hiden": 1}', "unknown EpConfig fields \\['hiden'\\]"),
                        ('{"topk": 4}', "fields the framework decides \\['topk'\\]"),
                        ('[1, 2]', "must be a JSON object"), ("{oops", "must be a JSON object")]:
        monkeypatch.setenv(_common.CONFIG_ENV, text)
        with pytest.raises(ValueError, match=match):
            _common.config_overrides()
    monkeypatch.setenv(_common.CONFIG_ENV, '{"crossover_tokens": 0}')
    with pytest.raises(ValueError, match="crossover_tokens must be a positive int"):
        _common.make_config(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=16)
