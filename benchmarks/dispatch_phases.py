"""Where a dispatch's time goes: the whole fp8 dispatch, the same with fp8 input (no
quantisation), and (HT) both with zero-copy outputs and the stage kernel alone, beside a plain
peer copy of the same remote bytes, on the GPUs at hand (a diagnostic, not a benchmark of
record; the dispatch counterpart of combine_phases.py).

    python benchmarks/dispatch_phases.py --world 2 --tokens 4096 --paths ht --variants "stage_programs=1056"
"""

from __future__ import annotations

import dataclasses
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository may not be installed
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import phase_common  # noqa: E402


def _phases(ctx, opts):
    from bench_ep import make_inputs
    from moe_ep import reference
    from moe_ep.kernels.dispatch import launch_stage
    from moe_ep.kernels.peer_copy import peer_copy_regions
    from moe_ep.timing import DeviceBarrier

    dev, world, rank = ctx.device, ctx.world_size, ctx.rank
    hidden, tokens = opts["hidden"], opts["tokens"]
    barrier = DeviceBarrier(ctx.group, rank, world, dev, peer_copy_regions(world, tokens * (hidden + 64) * 2))
    timed = phase_common.call_timer(dev, barrier, opts)
    xs, ids, ws = make_inputs(0, "uniform", tokens, hidden, opts["num_experts"], opts["topk"], world, dev)
    x, topk_ids, weights = xs[rank], ids[rank], ws[rank]
    x_fp8 = reference.quantize_fp8(x)
    out = {}
    for name, path, buf, d, remote in phase_common.path_buffers(ctx, opts, x, topk_ids, weights):
        cfg = buf.cfg
        row_bytes = hidden + 4 * cfg.num_scales  # fp8 values and their scales
        out[name] = {"remote_rows": remote, **phase_common.copy_times(timed, barrier, remote * row_bytes, opts)}
        base = buf.launch_params(path, tokens)
        base_zc = buf.launch_params(path, tokens, zero_copy=True)  # (HT) zero-copy calls have their own
        for variant in [""] + opts["variants"]:
            fields = phase_common.variant_fields(variant)
            for zero_copy, start in ((True, base_zc), (False, base)):  # the variant applied to each
                buf.set_launch_params(path, tokens, dataclasses.replace(
                    start, dispatch=dataclasses.replace(start.dispatch, **fields)), zero_copy)
            params = buf.launch_params(path, tokens).dispatch  # the copy-out call's: the stage timings
            row = {"dispatch_us": timed(lambda: buf.dispatch(x, topk_ids, weights, out=d)),
                   "prequantized_us": timed(lambda: buf.dispatch(x_fp8, topk_ids, weights, out=d))}
            if path == "ht":  # zero-copy outputs (no receive copy), then the stage kernel alone: routing
                # layout and quantisation, then the layout alone
                row["zero_copy_us"] = timed(lambda: buf.dispatch(x, topk_ids, weights, zero_copy=True))
                row["prequantized_zc_us"] = timed(lambda: buf.dispatch(x_fp8, topk_ids, weights, zero_copy=True))
                for key, (values, scales) in (("stage_us", (x, None)), ("stage_layout_us", x_fp8)):
                    row[key] = timed(lambda: launch_stage(buf.heap, buf.sync, cfg, params, buf._staging, values,
                                                          scales, topk_ids, d.handle.send_mask, 1))
            out[name][variant or "default"] = row
        out[name]["params"] = dataclasses.asdict(base.dispatch)
        if path == "ht":
            out[name]["params_zero_copy"] = dataclasses.asdict(base_zc.dispatch)
        buf.check()
    barrier.close()
    return out


if __name__ == "__main__":
    phase_common.main(__doc__, _phases, "stage_programs=1056;recv_parts=16,send_programs=528",
                      phase_common.HT_PARTS_FLAG)
