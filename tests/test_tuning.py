"""Tuned launch parameters: bucketing, lookup and fallback, the tuner end to end, and that a
tuned configuration gives bit-identical results to the default one."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from moe_ep.kernels.params import CombineParams, DispatchParams, default_combine, default_dispatch
from moe_ep.tuning import ENV_VAR, TunedTable, TunedTableWarning, TuneKey, read_entries, token_bucket, write_entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("tokens, bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (128, 128), (129, 256), (4096, 4096)])
def test_token_bucket(tokens, bucket):
    assert token_bucket(tokens) == bucket


def _entry(key: TuneKey, send_programs: int) -> dict:
    d = dataclasses.asdict(default_dispatch(key.path, key.hidden, key.world_size, key.bucket, True))
    d["send_programs"], d["token_parts"] = send_programs, 1
    return dict(dataclasses.asdict(key), dispatch=d,
                combine=dict(send_programs=8, reduce_programs=8, block_h=1024, num_warps=4))


def _key(**changes) -> TuneKey:
    # A GPU name no shipped table has, so only this test's files answer.
    return dataclasses.replace(TuneKey(gpu="test GPU", world_size=4, hidden=7168, num_experts=256, topk=8,
                                       dispatch_dtype="fp8", path="ll", bucket=128), **changes)


def test_lookup_prefers_later_files_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no user files
    key = _key()
    env_file, extra_file = tmp_path / "env.json", tmp_path / "extra.json"
    write_entries(env_file, [_entry(key, 11)])
    write_entries(extra_file, [_entry(key, 22)])
    monkeypatch.setenv(ENV_VAR, str(env_file))
    assert TunedTable.load().choose(key, True).dispatch.send_programs == 11
    assert TunedTable.load("off").choose(key, True).source == "default"
    chosen = TunedTable.load(extra_file).choose(key, True)
    assert chosen.dispatch.send_programs == 22 and chosen.source == f"tuned: {extra_file}"
    other = dataclasses.replace(key, bucket=256)
    near = TunedTable.load(extra_file).choose(other, True)  # the nearest tuned bucket of the same key
    assert near.dispatch.send_programs == 22 and near.source == f"tuned: {extra_file} (bucket 128)"
    fallback = TunedTable.load(extra_file).choose(dataclasses.replace(other, hidden=4096), True)
    assert fallback.source == "default"
    assert fallback.dispatch == default_dispatch("ll", 4096, 4, 256, True)
    for shape in (dict(topk=6), dict(num_experts=128)):  # another model's shape: its own entries only
        assert TunedTable.load(extra_file).choose(dataclasses.replace(key, **shape), True).source == "default"
    monkeypatch.setenv(ENV_VAR, "off")
    assert TunedTable.load(extra_file).choose(key, True).source == "default"
    monkeypatch.setenv(ENV_VAR, str(env_file))
    # Merging replaces the entry with the same key and keeps the others.
    write_entries(extra_file, [_entry(key, 33), _entry(other, 44)])
    data = json.loads(extra_file.read_text())
    assert data["format_version"] == "2.0"
    assert sorted(e["dispatch"]["send_programs"] for e in data["entries"]) == [33, 44]
    # Between tuned buckets 128 and 256: the nearer by powers of two, the smaller on a tie.
    table = TunedTable.load(extra_file)
    picks = {b: table.choose(dataclasses.replace(key, bucket=b), True).dispatch.send_programs
             for b in (1, 64, 128, 256, 512, 8192)}
    assert picks == {1: 33, 64: 33, 128: 33, 256: 44, 512: 44, 8192: 44}
    # An entry without combine parameters: its dispatch's, and the default combine of the asked key.
    partial_file = tmp_path / "partial.json"
    write_entries(partial_file, [dict(_entry(key, 66), combine=None)])
    partial = TunedTable.load(partial_file).choose(other, True)
    assert partial.dispatch.send_programs == 66 and partial.source.endswith("combine default")
    assert partial.combine == default_combine("ll", 7168, 4, 256, True)


def test_format_1_files_read_as_deepseek_v3_and_merge(tmp_path):
    """A file written before format_version, num_experts and topk (and with an entry from before
    gpus_per_node): its entries are DeepSeek-V3's 256 experts, top-8; merging into it writes format 2."""
    key = _key()
    legacy = {k: v for k, v in _entry(key, 55).items() if k not in ("num_experts", "topk", "gpus_per_node")}
    old_file = tmp_path / "old.json"
    old_file.write_text(json.dumps({"entries": [legacy]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        table = TunedTable.load(old_file)
    assert table.choose(key, True).dispatch.send_programs == 55
    assert table.choose(_key(topk=4), True).source == "default"
    write_entries(old_file, [_entry(_key(topk=4), 77)])
    data = json.loads(old_file.read_text())
    assert data["format_version"] == "2.0"
    assert sorted((e["topk"], e["num_experts"], e["dispatch"]["send_programs"]) for e in data["entries"]) == \
        [(4, 256, 77), (8, 256, 55)]


def test_unknown_keys_and_bad_entries_are_skipped_with_a_warning(tmp_path):
    """What a newer moe_ep may write (keys this one does not know, a newer major format) and
    broken entries cost a warning, never a Buffer: the usable entries still answer."""
    key, other = _key(), _key(bucket=8)
    good = _entry(key, 12)
    good["dispatch"]["future_knob"] = 3
    good["combine"]["future_combine_knob"] = 1
    good["future_key_field"] = "x"
    broken = dict(_entry(other, 13), dispatch=dict(_entry(other, 13)["dispatch"], block_h=100))  # not a power of 2
    no_path = {k: v for k, v in _entry(_key(bucket=16), 14).items() if k != "path"}
    path = tmp_path / "future.json"
    path.write_text(json.dumps({"format_version": "2.7", "written_by": "moe_ep 9", "entries": [good, broken, no_path]}))
    with pytest.warns(TunedTableWarning) as record:
        table = TunedTable.load(path)
    messages = "\n".join(str(w.message) for w in record)
    for name in ("combine.future_combine_knob", "dispatch.future_knob", "entries[].future_key_field", "written_by"):
        assert name in messages, messages
    assert "2 unusable entries skipped" in messages and "power of two" in messages and "'path'" in messages
    chosen = table.choose(key, True)
    assert chosen.dispatch.send_programs == 12 and chosen.source == f"tuned: {path}"
    assert chosen.combine == CombineParams(**_entry(key, 12)["combine"])
    assert table.choose(other, True).source == f"tuned: {path} (bucket 128)"  # the broken one is not there
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"format_version": "3.0", "entries": [_entry(key, 99)]}))
    with pytest.warns(TunedTableWarning, match=r"format 3.0, newer than this moe_ep reads \(2.x\), ignored"):
        assert TunedTable.load(newer).choose(key, True).source == "default"
    with pytest.raises(ValueError, match="does not write"):
        write_entries(newer, [_entry(key, 1)])
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.warns(TunedTableWarning, match="not readable JSON"):
        assert read_entries(garbage) == {}


def test_shipped_tables_read_cleanly():
    """Every shipped entry is usable by this version (no warning), in the current format."""
    from moe_ep.tuning import SHIPPED_DIR

    for path in sorted(SHIPPED_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        assert data["format_version"] == "2.0", path
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(read_entries(path)) == len(data["entries"]) > 0, path


def test_params_are_validated():
    with pytest.raises(ValueError, match="power of two"):
        DispatchParams(send_programs=4, recv_parts=1, stage_programs=1, block_h=384, block_t=64, block_copy=1024,
                       num_warps=4)


def _default_vs_other_params(ctx):
    import moe_ep
    from moe_ep import reference
    from moe_ep.tuning import Choice
    from ep_cases import CPU_SHAPE, make_inputs

    shape = CPU_SHAPE
    num_experts = shape.num_experts_per_rank * ctx.world_size
    outputs = {}
    for mode in ("ll", "ht"):
        cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk,
                              max_tokens_per_rank=shape.max_tokens_per_rank, dispatch_dtype=torch.float8_e4m3fn,
                              mode=mode)
        buf = moe_ep.Buffer(ctx.group, cfg)
        xs, ids, ws = make_inputs(2, "masked", shape, ctx.world_size, seed=9)
        me, dev = ctx.rank, ctx.device
        for variant in ("default", "other"):
            zero_copy = False
            if variant == "other":  # every field moved away from its default
                base = buf.launch_params(mode, xs[me].shape[0])
                # 2-token blocks, more than the 3 stage programs, prefixed 8 tokens a step: the
                # stage kernel's block loop and a scan step that ends past a block's start; HT
                # quantises in its stage kernel (the default: in its send programs). Launch
                # parameters are each rank's own: odd ranks send in 3 groups, even ranks in 1,
                # and (HT) even ranks take zero-copy outputs beside odd ranks' copied ones.
                other = Choice(DispatchParams(send_programs=6 if me % 2 else 4, recv_parts=2, stage_programs=3,
                                              block_h=128, block_t=2, block_copy=512, num_warps=2, token_parts=2,
                                              block_scan=8, send_groups=3 if me % 2 else 1, send_quantize=False),
                               dataclasses.replace(base.combine, send_programs=3, reduce_programs=3, block_h=128,
                                                   num_warps=2, rows=2, reduce_delay=2), "test")
                assert other.dispatch != base.dispatch
                zero_copy = mode == "ht" and me % 2 == 0
                buf.set_launch_params(mode, xs[me].shape[0], other, zero_copy)
            out = buf.dispatch(xs[me].to(dev), ids[me].to(dev), ws[me].to(dev), zero_copy=zero_copy)
            n = int(out.num_tokens)
            y = reference.dispatch(xs, ids, ws, num_experts, torch.float8_e4m3fn)[me]
            z = buf.combine(torch.randn(buf.capacity, shape.hidden, generator=torch.Generator().manual_seed(me))
                            .to(torch.bfloat16).to(dev), out.handle)
            outputs[(mode, variant)] = tuple(t.cpu().clone() for t in (  # zero-copy views die with the Buffer
                out.x[:n].view(torch.uint8), out.x_scales[:n], out.topk_ids[:n], out.src[:n], out.tokens_per_expert,
                z)) + (y.num_tokens,)
        buf.check()
        buf.close()
    for mode in ("ll", "ht"):
        a, b = outputs[(mode, "default")], outputs[(mode, "other")]
        assert a[-1] == b[-1] and a[-1] > 0
        for i, (ta, tb) in enumerate(zip(a[:-1], b[:-1])):
            assert torch.equal(ta, tb), f"{mode}: output {i} differs between the default and other parameters"
    return True


def test_other_parameters_give_identical_results(ranks):
    """Launch parameters change no result, also where the ranks run different ones (send groups,
    zero-copy outputs beside copied ones)."""
    assert all(ranks.run(_default_vs_other_params))


def test_tuner_writes_a_table_the_buffer_uses(tmp_path, monkeypatch):
    """Without --out the tuner writes the user's file (never the installed package), which
    TunedTable.load (what Buffer calls) then reads."""
    from moe_ep.tuning import SHIPPED_DIR

    shipped = {p.name: p.read_bytes() for p in SHIPPED_DIR.iterdir()}
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "moe_ep.tune", "--smoke"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "cache" / "moe_ep" / "tuned" / "cpu.json"
    assert f"written to {out}" in proc.stdout, proc.stdout
    assert {p.name: p.read_bytes() for p in SHIPPED_DIR.iterdir()} == shipped
    data = json.loads(out.read_text())
    entries = data["entries"]
    assert data["format_version"] == "2.0"
    assert {(e["dispatch_dtype"], e["path"], e["zero_copy"]) for e in entries} == {
        (d, p, zc) for d in ("fp8",)
        for p, zc in (("ll", False), ("ht", False), ("ht", True), ("inter", False), ("expert", False))}
    assert all((e["combine"] is None) == e["zero_copy"] for e in entries)
    assert all(e["gpus_per_node"] == (1 if e["path"] == "inter" else 0) for e in entries)
    assert all((e["num_experts"], e["topk"]) == (8, 2) for e in entries)
    assert all(e["bucket"] == 4 and e["measured"]["dispatch_tuned_us"] <= e["measured"]["dispatch_default_us"]
               for e in entries)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    table = TunedTable.load()  # shipped files, then the user's
    key = TuneKey(gpu="cpu", world_size=2, hidden=256, num_experts=8, topk=2, dispatch_dtype="fp8", path="ll",
                  bucket=4)
    assert table.choose(key, False).source == f"tuned: {out}"
    zero_copy = dataclasses.replace(key, path="ht", zero_copy=True)
    chosen = table.choose(zero_copy, False)
    assert chosen.source.startswith(f"tuned: {out}") and chosen.combine is not None  # the default combine
    inter = dataclasses.replace(key, path="inter", gpus_per_node=1)
    assert table.choose(inter, False).source == f"tuned: {out}"
    assert table.choose(dataclasses.replace(inter, gpus_per_node=2), False).source == "default"
    assert table.choose(dataclasses.replace(key, topk=3), False).source == "default"


def _warmup_then_call(ctx):
    import moe_ep
    from moe_ep import reference
    from ep_cases import CPU_SHAPE, check_dispatch, make_inputs

    shape = dataclasses.replace(CPU_SHAPE, max_tokens_per_rank=3)
    num_experts = shape.num_experts_per_rank * ctx.world_size
    cfg = moe_ep.EpConfig(hidden=shape.hidden, num_experts=num_experts, topk=shape.topk, max_tokens_per_rank=3,
                          dispatch_dtype=torch.float8_e4m3fn, mode="auto", crossover_tokens=2,
                          layouts=("flat", "expert"))
    buf = moe_ep.Buffer(ctx.group, cfg)
    buf.warmup()  # LL and expert-layout buckets 1, 2 and HT buckets 1, 2, 4 (holding 3 tokens)
    chosen = sorted(buf._choices)
    xs, ids, ws = make_inputs(0, "uniform", shape, ctx.world_size, seed=4)
    expected = reference.dispatch(xs, ids, ws, num_experts, torch.float8_e4m3fn)[ctx.rank]
    for zero_copy in (False, True):
        out = buf.dispatch(xs[ctx.rank].to(ctx.device), ids[ctx.rank].to(ctx.device), ws[ctx.rank].to(ctx.device),
                           zero_copy=zero_copy)
        assert out.handle.path == "ht"
        check_dispatch(out, expected, buf.capacity)
    buf.close()
    return chosen


def test_warmup_covers_every_bucket_then_calls_work(ranks):
    chosen = ranks.run(_warmup_then_call)
    assert all(c == [("expert", 1, False), ("expert", 2, False)]
               + [("ht", b, zc) for b in (1, 2, 4) for zc in (False, True)] + [("ll", 1, False), ("ll", 2, False)]
               for c in chosen), chosen
