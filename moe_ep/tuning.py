"""Tuned launch parameters: chosen per GPU, world size, hidden, dispatch dtype, path and token
bucket, with the defaults of ``kernels/params.py`` as the fallback.

Token counts are bucketed to powers of two, so a new batch size reuses a bucket's parameters
(and its compiled kernels) instead of compiling new ones. Tables are JSON files:

    {"entries": [{"gpu": "NVIDIA H200", "world_size": 4, "hidden": 7168, "dispatch_dtype": "fp8",
                  "path": "ll", "bucket": 128, "dispatch": {...DispatchParams...},
                  "combine": {...CombineParams...}, "measured": {...}}]}

An entry without "combine" (null) takes the default combine parameters of its key (the shipped
HT entries since the HT combine's kernel changed: they await a re-tune).

``Buffer`` reads the files shipped under ``moe_ep/tuned/``, then the file named by the
``MOE_EP_TUNED`` environment variable, then the one passed as ``Buffer(tuned=...)``; a later
file's entry wins; "off" in either place leaves every choice at the defaults (to compare them).
A bucket with no entry takes the nearest tuned bucket's. ``python -m moe_ep.tune`` writes such
files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from moe_ep.kernels.params import CombineParams, DispatchParams, default_combine, default_dispatch

SHIPPED_DIR = Path(__file__).parent / "tuned"
ENV_VAR = "MOE_EP_TUNED"
OFF = "off"  # as $MOE_EP_TUNED or Buffer(tuned=...): the defaults, no tuned table


def token_bucket(num_tokens: int) -> int:
    """The power of two >= num_tokens (1 for 0): the unit parameters are tuned and chosen by."""
    return 1 << max(num_tokens - 1, 0).bit_length()


@dataclass(frozen=True)
class TuneKey:
    gpu: str  # device name, e.g. "NVIDIA H200" ("cpu" under the interpreter)
    world_size: int
    hidden: int
    dispatch_dtype: str  # "fp8" or "bf16"
    path: str  # "ll", "ht" or "inter"
    bucket: int  # token_bucket of the tokens per rank
    gpus_per_node: int = 0  # the inter path's node size; 0 on one node
    zero_copy: bool = False  # HT: a dispatch(zero_copy=True) call (no receive copy: its own best parameters)


def _key_fields(entry: dict) -> dict:
    """TuneKey fields of a JSON entry (fields added since a file was written take their default)."""
    return {f.name: entry[f.name] if f.default is dataclasses.MISSING else entry.get(f.name, f.default)
            for f in dataclasses.fields(TuneKey)}


@dataclass(frozen=True)
class Choice:
    """The launch parameters of one (path, bucket), and where they came from."""

    dispatch: DispatchParams
    combine: CombineParams
    source: str  # "default", or "tuned: <file>"


class TunedTable:
    """Entries from tuned JSON files, by ``TuneKey``."""

    def __init__(self, entries: dict | None = None):
        self.entries: dict[TuneKey, Choice] = dict(entries or {})

    @classmethod
    def load(cls, extra: str | os.PathLike | None = None) -> "TunedTable":
        """Shipped files, then $MOE_EP_TUNED, then ``extra`` (a later entry wins); none at all
        (the defaults everywhere) when either of those is "off"."""
        if OFF in (os.environ.get(ENV_VAR), extra):
            return cls()
        paths = sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []
        paths += [Path(p) for p in (os.environ.get(ENV_VAR), extra) if p]
        table = cls()
        for path in paths:
            table.entries.update(read_entries(path))
        return table

    def choose(self, key: TuneKey, on_gpu: bool) -> Choice:
        """The tuned entry for ``key``; else that of the nearest tuned token bucket (by powers of
        two, the smaller on a tie) of the same GPU, world, hidden, dtype and path: every launch
        configuration gives the same results, and one tuned beside a size beats the defaults
        there; else the defaults."""
        args = (key.path, key.hidden, key.world_size, key.bucket, on_gpu, key.dispatch_dtype)
        chosen = self.entries.get(key)
        near = [] if chosen else [k for k in self.entries if dataclasses.replace(k, bucket=key.bucket) == key]
        if near:
            best = min(near, key=lambda k: (abs(k.bucket.bit_length() - key.bucket.bit_length()), k.bucket))
            chosen = self.entries[best]
            chosen = dataclasses.replace(chosen, source=f"{chosen.source} (bucket {best.bucket})")
        if chosen is None:
            return Choice(default_dispatch(*args), default_combine(*args), "default")
        if chosen.combine is None:  # an entry that holds the dispatch's parameters only
            chosen = dataclasses.replace(chosen, combine=default_combine(*args),
                                         source=f"{chosen.source}, combine default")
        return chosen


def read_entries(path: str | os.PathLike) -> dict[TuneKey, Choice]:
    """The entries of one tuned JSON file (a file that does not exist has none)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    entries = {}
    for e in data.get("entries", []):
        key = TuneKey(**_key_fields(e))
        combine = CombineParams(**e["combine"]) if e.get("combine") else None  # None: the default's
        entries[key] = Choice(DispatchParams(**e["dispatch"]), combine, f"tuned: {path}")
    return entries


def write_entries(path: str | os.PathLike, new: list[dict]) -> None:
    """Merge ``new`` entry dicts (TuneKey fields, "dispatch", "combine", optional "measured")
    into the JSON file at ``path``, replacing entries with the same key."""
    path = Path(path)
    old = json.loads(path.read_text())["entries"] if path.exists() else []

    def key(e):
        return tuple(_key_fields(e).values())

    merged = {key(e): e for e in old}
    merged.update({key(e): e for e in new})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"entries": sorted(merged.values(), key=key)}, indent=1) + "\n")
