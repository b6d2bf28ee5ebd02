"""Where a combine's time goes: the whole combine against its send phase alone, beside a plain
peer copy of the same bytes, on the GPUs at hand (a diagnostic, not a benchmark of record).

The send phase alone is the same kernel on a handle that claims 0 tokens: every received row
is still sent back and every rank still signals and waits, but no sum is computed.

    python benchmarks/combine_phases.py --world 4 --tokens 4096 --paths ht,ll --variants "block_h=8192" --ht-parts 1,4
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository may not be installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import phase_common  # noqa: E402


def _phases(ctx, opts):
    from bench_ep import make_inputs
    from moe_ep.kernels.peer_copy import peer_copy_regions
    from moe_ep.timing import DeviceBarrier

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, tokens = opts["hidden"], opts["tokens"]
    barrier = DeviceBarrier(ctx.group, rank, world, dev, peer_copy_regions(world, tokens * hidden * 2 * 2))
    timed = phase_common.call_timer(dev, barrier, opts)
    xs, ids, ws = make_inputs(0, "uniform", tokens, hidden, opts["num_experts"], opts["topk"], world, dev)
    y = torch.randn(tokens * world, hidden, device=dev).to(torch.bfloat16)
    out = {}
    for name, path, buf, d, remote in phase_common.path_buffers(ctx, opts, xs[rank], ids[rank], ws[rank]):
        empty = dataclasses.replace(d.handle, num_tokens=0)
        z0 = torch.empty(0, hidden, dtype=torch.bfloat16, device=dev)
        out[name] = {"remote_rows": remote, **phase_common.copy_times(timed, barrier, remote * hidden * 2, opts)}
        base = buf.launch_params(path, tokens)
        for variant in [""] + opts["variants"]:
            choice = dataclasses.replace(base, combine=dataclasses.replace(base.combine,
                                                                           **phase_common.variant_fields(variant)))
            for n in (tokens, 0):  # the send-phase-only call's bucket too
                buf.set_launch_params(path, n, choice)
            out[name][variant or "default"] = {"combine_us": timed(lambda: buf.combine(y, d.handle)),
                                               "send_phase_us": timed(lambda: buf.combine(y, empty, out=z0))}
        out[name]["params"] = dataclasses.asdict(base.combine)
    barrier.close()
    return out


if __name__ == "__main__":
    phase_common.main(__doc__, _phases, "block_h=8192;num_warps=4,send_programs=528", phase_common.HT_PARTS_FLAG)
