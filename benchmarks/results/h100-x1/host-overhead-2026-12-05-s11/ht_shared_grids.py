"""Do HT's failures with two ranks on one GPU come from the grids' size? The same HT calls, two ranks
sharing the GPU (MPS), with small grids (a few programs per kernel) and then the default grids."""
import sys
sys.path.insert(0, "tests")
import torch
from moe_ep.testing import RankPool


def body(ctx, small: bool):
    import moe_ep
    from moe_ep import reference
    from moe_ep.kernels.params import CombineParams, DispatchParams
    from moe_ep.tuning import Choice
    from ep_cases import GPU_SHAPE, make_inputs, check_dispatch, check_part_rows, expert_outputs, assert_equal
    shape = GPU_SHAPE
    E = shape.num_experts_per_rank * ctx.world_size
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=E, topk=shape.topk, max_tokens_per_rank=shape.max_tokens_per_rank,
                          dispatch_dtype=torch.float8_e4m3fn, mode="ht", timeout_s=20)
    buf = moe_ep.Buffer(ctx.group, cfg)
    done = 0
    try:
        for call in range(4):
            xs, ids, ws = make_inputs(call, "uniform", shape, ctx.world_size, seed=3)
            me = ctx.rank
            if small:
                choice = Choice(DispatchParams(send_programs=8, recv_parts=1, stage_programs=4, block_h=1024, block_t=32,
                                               block_copy=4096, num_warps=4, block_scan=32, send_groups=1),
                                CombineParams(send_programs=8, reduce_programs=8, block_h=1024, num_warps=4), "small")
                buf.set_launch_params("ht", xs[me].shape[0], choice)
            exp = reference.dispatch(xs, ids, ws, E, torch.float8_e4m3fn)
            out = buf.dispatch(xs[me].to(ctx.device), ids[me].to(ctx.device), ws[me].to(ctx.device))
            n = check_dispatch(out, exp[me], buf.capacity)
            check_part_rows(out, exp[me], [len(i) for i in ids], cfg.ht_parts)
            ys = [expert_outputs(exp[r], r) for r in range(ctx.world_size)]
            y = torch.zeros(buf.capacity, shape.hidden, dtype=torch.bfloat16)
            y[:n] = ys[me]
            z = buf.combine(y.to(ctx.device), out.handle)
            assert_equal("combine", reference.combine(ys, exp, [len(i) for i in ids])[me], z.cpu())
            done += 1
        buf.check()
    finally:
        buf.close()
    return done


if __name__ == "__main__":
  for small in (True, False):
    pool = RankPool(2, "cuda", share_device=True)
    try:
        print("small grids" if small else "default grids", pool.run(body, small, timeout=120), flush=True)
    except Exception as err:
        print("small grids" if small else "default grids", "FAILED:", str(err).strip().splitlines()[-1][:300], flush=True)
    finally:
        pool.close()
