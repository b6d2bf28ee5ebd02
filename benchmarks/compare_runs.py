"""Two benchmark runs side by side (e.g. default launch parameters vs a tuned table): a markdown
table of the per-rank worst median latency of every moe_ep point both runs have (dispatch, combine
and the dispatch -> combine pair), with the ratio, beside each run's p2p copy of the same bytes
and the first run's nccl-padded baseline (nan for runs before issue 22, which had only the naive
path, then named "nccl").

    python benchmarks/compare_runs.py DEFAULT/results.json TUNED/results.json [--names default,tuned]
"""

from __future__ import annotations

import argparse
import json
import math


def load(path: str) -> dict:
    return {(r["world"], r["dtype"], r["routing"], r["tokens"], r["impl"], r["op"]): r["lat_max_us"]
            for r in json.load(open(path))["rows"]}


def table(a: dict, b: dict, names: tuple[str, str]) -> str:
    def copy_us(run, key):  # the p2p copy of the same bytes: the dispatch dtype's rows, bf16 for combine, both for the pair
        world, dtype, routing, tokens, _, op = key
        dtypes = {"dispatch": [dtype], "combine": ["bf16"], "pair": [dtype, "bf16"]}[op]
        return sum(run.get((world, d, routing, tokens, "p2p-copy", "copy"), math.nan) for d in dtypes)

    lines = [f"| EP | dtype | routing | tokens | path | op | {names[0]} (us) | {names[1]} (us) | {names[1]} / "
             f"{names[0]} | p2p copy (us, {names[0]} / {names[1]} run) | nccl-padded (us) |",
             "|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    keys = sorted((k for k in a if k in b and k[4].startswith("moe_ep")),
                  key=lambda k: (-k[0], k[1] != "fp8", k[2], k[3], k[4], ("dispatch", "combine", "pair").index(k[5])))
    for key in keys:
        world, dtype, routing, tokens, impl, op = key
        nccl = a.get((world, dtype, routing, tokens, "nccl-padded", op), math.nan)
        lines.append(f"| {world} | {dtype} | {routing} | {tokens} | {impl.removeprefix('moe_ep-')} | {op} | "
                     f"{a[key]:.1f} | {b[key]:.1f} | {b[key] / a[key]:.2f} | {copy_us(a, key):.1f} / "
                     f"{copy_us(b, key):.1f} | {nccl:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--names", default="default,tuned", help="the two runs' names, comma-separated")
    args = p.parse_args()
    print(table(load(args.first), load(args.second), tuple(args.names.split(",", 1))), end="")


if __name__ == "__main__":
    main()
