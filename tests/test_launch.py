"""The direct launches of compiled kernels (``moe_ep.kernels.launch``), checked without a GPU.

On GPUs every dispatch and combine goes through ``Launcher.launch``: its argument list must be the
kernel's, in order, with each pointer as its address, and its key must change exactly when Triton
would compile another kernel (so a call never runs a kernel specialised for other arguments), and
never for what changes on every call (token counts, call words: one compile each would stall every
call). The CPU ranks run the kernels in the interpreter, which bypasses all this, so the check runs
in a process where the kernels are Triton's compiled functions (no launch happens).
"""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = r'''
import torch
from moe_ep.kernels import dispatch, dispatch_expert, dispatch_ht
from moe_ep.kernels.launch import LaunchArgs

launcher = dispatch_expert._launch_dispatch_expert
names = launcher.names
dynamic_names = ("x_ptr", "x_scales_ptr", "topk_ids_ptr", "topk_weights_ptr", "out_tokens_per_expert_ptr",
                 "pair_ids_ptr", "pair_weights_ptr", "num_tokens", "call_word", "ALIGNED")
statics = {}
for i, name in enumerate(n for n in names if n not in dynamic_names):
    param = launcher._params[names.index(name)]
    statics[name] = torch.zeros(4, dtype=torch.int32) if name.endswith("_ptr") else (i + 3 if not param.is_constexpr else i)
static = LaunchArgs(dict(statics, num_warps=4))
bf16 = torch.zeros(64, 256, dtype=torch.bfloat16)
ids = torch.zeros(64, 8, dtype=torch.int64)


def dynamic(x=bf16[0:8], num_tokens=8, call_word=9, aligned=True, ids=ids[:8]):
    return dict(x_ptr=x, x_scales_ptr=torch.zeros(8), topk_ids_ptr=ids, topk_weights_ptr=torch.zeros(8, 8),
                out_tokens_per_expert_ptr=torch.zeros(4, dtype=torch.int32),
                pair_ids_ptr=torch.zeros(8, 8, dtype=torch.int32), pair_weights_ptr=torch.zeros(8, 8),
                num_tokens=num_tokens, call_word=call_word, ALIGNED=aligned)


first = dynamic()
prepared = launcher._prepare(static, first)
args, key = launcher._args_and_key(prepared, first)
everything = dict(statics, **first)
expected = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in (everything[n] for n in names)]
assert args == expected, "the argument list is not the kernel's, in order, pointers as addresses"
assert sorted(name for _, name, _ in prepared[1]) == sorted(dynamic_names)
same = [dynamic(num_tokens=1), dynamic(num_tokens=17), dynamic(call_word=(5 << 3) | 3), dynamic(x=bf16[8:16])]
for other in same:
    assert launcher._args_and_key(prepared, other)[1] == key, "a per-call value changed the compiled kernel"
flat = bf16.view(-1)
differs = [dynamic(aligned=False), dynamic(x=flat[1:1 + 8 * 256].view(8, 256)), dynamic(x=bf16[0:8].to(torch.float8_e4m3fn)),
           dynamic(ids=ids[:8].to(torch.int32))]
for other in differs:
    assert launcher._args_and_key(prepared, other)[1] != key, "a different specialisation kept the same kernel"
for module, name in ((dispatch, "_launch_dispatch"), (dispatch_ht, "_launch_dispatch_ht"),
                     (dispatch_expert, "_launch_dispatch_expert")):
    params = {p.name: p for p in getattr(module, name)._params}
    assert params["call_word"].do_not_specialize and params["num_tokens"].do_not_specialize, name
print("ok")
'''


def test_launch_arguments_and_keys_follow_the_kernel():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
