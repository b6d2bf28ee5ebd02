"""`import moe_ep` changes nothing global: Triton's interpreter only where asked for.

A host program that imports moe_ep keeps its environment, Triton's interpreter and its own
compiled kernels; moe_ep's kernels are defined on first use of a name that needs them.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from moe_ep.testing import RankPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_IMPORT_CHANGES_NOTHING = textwrap.dedent("""
    import os, sys, warnings
    import torch, triton, triton.runtime.interpreter as interpreter
    from triton.runtime.jit import KernelInterface

    def moe_ep_kernels():
        return [f"{name}.{attr}" for name, module in list(sys.modules.items())
                if name.split(".")[0] == "moe_ep" and module is not None
                for attr, value in vars(module).items() if isinstance(value, KernelInterface)]

    environ, filters, patch_lang = dict(os.environ), list(warnings.filters), interpreter._patch_lang
    import moe_ep
    # Names that need no kernel: the config, the reference, heap sizes, the error type, the version.
    cfg = moe_ep.EpConfig(hidden=256, num_experts=8, topk=2, max_tokens_per_rank=4)
    moe_ep.heap_bytes(cfg, 2), moe_ep.reference.dispatch, moe_ep.PeerTimeoutError, moe_ep.__version__
    assert dict(os.environ) == environ, set(os.environ.items()) ^ set(environ.items())
    assert warnings.filters == filters
    assert interpreter._patch_lang is patch_lang
    assert not triton.knobs.runtime.interpret
    assert moe_ep_kernels() == [], moe_ep_kernels()
    try:  # triton.language's own @jit functions (tl.zeros...) were defined compiled above
        moe_ep.use_interpreter()
        raise AssertionError("use_interpreter() after `import triton` should raise")
    except RuntimeError as err:
        assert "came too late" in str(err) and "before anything imports triton" in str(err), err
    assert dict(os.environ) == environ

    @triton.jit
    def host_kernel(x):  # the host program's own kernel stays compiled
        pass

    assert type(host_kernel).__name__ == "JITFunction", type(host_kernel)
    moe_ep.Buffer  # now moe_ep's kernels are defined, compiled (nobody asked for the interpreter)
    kinds = {type(v).__name__ for name, module in list(sys.modules.items()) if name.split(".")[0] == "moe_ep"
             for v in vars(module).values() if isinstance(v, KernelInterface)}
    assert kinds == {"JITFunction"}, kinds
    assert interpreter._patch_lang is patch_lang and not triton.knobs.runtime.interpret
    # torch's _nvshmem_triton (imported by moe_ep.transport.shmem) sets its Inductor cache path.
    assert {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} == \
        {k: v for k, v in environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    print("ok")
""")


def test_import_changes_nothing_global(tmp_path):
    script = tmp_path / "host_program.py"  # a file: Triton reads a @jit function's source
    script.write_text(_IMPORT_CHANGES_NOTHING)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-3000:] + proc.stderr[-3000:]


def _buffer_without_interpreter(ctx):
    import torch

    import moe_ep
    from ep_cases import CPU_SHAPE

    assert "TRITON_INTERPRET" not in os.environ
    cfg = moe_ep.EpConfig(hidden=CPU_SHAPE.hidden, num_experts=CPU_SHAPE.num_experts_per_rank * ctx.world_size,
                          topk=CPU_SHAPE.topk, max_tokens_per_rank=CPU_SHAPE.max_tokens_per_rank,
                          dispatch_dtype=torch.float8_e4m3fn)
    def mapped_segments():  # host heap segments mapped into this process
        with open("/proc/self/maps") as maps:
            return [line for line in maps if "memfd:moe_ep" in line or "/moe_ep-" in line]

    errors = []
    with pytest.raises(RuntimeError, match=r"needs moe_ep's kernels \(and triton.language\) in Triton's "
                                           r"interpreter, but they are compiled: set TRITON_INTERPRET=1 .* "
                                           r"moe_ep.use_interpreter\(\)") as e:
        moe_ep.Buffer(ctx.group, cfg)
    assert mapped_segments() == []  # raised before allocating anything
    errors.append(str(e.value))
    with pytest.raises(RuntimeError, match=r"use_interpreter\(\) came too late: .* already defined compiled") as e:
        moe_ep.use_interpreter()
    errors.append(str(e.value))
    return errors


def _use_interpreter_then_buffer(ctx):
    assert "TRITON_INTERPRET" not in os.environ
    import moe_ep

    moe_ep.use_interpreter()
    assert os.environ["TRITON_INTERPRET"] == "1"
    from ep_cases import CPU_SHAPE, run_calls

    # Fresh random inputs, poisoned outputs, every row checked against the reference, twice.
    return run_calls(ctx, "masked", "float8_e4m3fn", CPU_SHAPE, calls=2, mode="ll")


def test_use_interpreter_then_buffer_works():
    with RankPool(2, env={"TRITON_INTERPRET": None}) as pool:
        received = pool.run(_use_interpreter_then_buffer, timeout=300)
    assert sum(received) > 0


def test_cpu_buffer_with_compiled_kernels_raises():
    with RankPool(2, env={"TRITON_INTERPRET": None}) as pool:
        errors = pool.run(_buffer_without_interpreter, timeout=300)
    assert len(errors) == 2 and errors[0] == errors[1]  # every rank raised, alike


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.3.5", False), ("3.6.0", "2.4.6", True), ("3.6.0+git4f3e", "2.4.0rc1", True),
    ("3.7.0", "2.4.6", False), ("3.8.0", "2.4.6", False), ("3.9.0", "2.3.5", False)])
def test_interpreter_numpy_constraint(triton_version, numpy_version, refused):
    """Triton 3.6's interpreter with numpy >= 2.4 fails inside a kernel (int() of a 1-element
    array); a CPU Buffer says so first. pyproject's `cpu` extra keeps numpy below 2.4."""
    import importlib.util

    from moe_ep._platform import interpreter_problem

    spec = importlib.util.spec_from_file_location("requirements", os.path.join(ROOT, "scripts", "requirements.py"))
    requirements = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(requirements)
    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert "needs numpy < 2.4" in problem and "Triton >= 3.7" in problem, problem
    assert requirements.requirements(["cpu"], False) == ["numpy<2.4"]
