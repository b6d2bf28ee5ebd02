"""Tuned launch parameters: chosen per GPU, world size, hidden, experts, top-k, dispatch dtype,
path and token bucket, with the defaults of ``kernels/params.py`` as the fallback.

Token counts are bucketed to powers of two, so a new batch size reuses a bucket's parameters
(and its compiled kernels) instead of compiling new ones. Tables are JSON files:

    {"format_version": "2.0",
     "entries": [{"gpu": "NVIDIA H200", "world_size": 4, "hidden": 7168, "num_experts": 256,
                  "topk": 8, "dispatch_dtype": "fp8", "path": "ll", "bucket": 128,
                  "gpus_per_node": 0, "zero_copy": false,
                  "dispatch": {...DispatchParams...}, "combine": {...CombineParams...},
                  "measured": {...}}]}

An entry without "combine" (null) takes the default combine parameters of its key (the shipped
HT entries since the HT combine's kernel changed: they await a re-tune).

Reading is forgiving, so that no tuned file can stop a ``Buffer`` from being built: a file of a
newer major format version is skipped, keys this version does not know (in an entry, or in its
"dispatch" / "combine" parameters) are dropped, and an entry that is still unusable (a missing
key field, an invalid parameter) is skipped, each with a ``TunedTableWarning``. A file without
"format_version" is format 1 (before ``num_experts`` and ``topk`` joined the key): its entries
are read as DeepSeek-V3's 256 experts and top-8, the shape ``moe_ep.tune`` tuned by default.

Where ``Buffer`` looks, a later file's entry winning over an earlier one's for the same key:
  1. the files shipped under ``moe_ep/tuned/``;
  2. the user's files, ``$XDG_CACHE_HOME/moe_ep/tuned/*.json`` (``~/.cache/moe_ep/tuned/``
     where XDG_CACHE_HOME is unset): where ``python -m moe_ep.tune`` writes by default;
  3. the file named by ``$MOE_EP_TUNED``;
  4. the file passed as ``Buffer(tuned=...)``.
"off" as ``$MOE_EP_TUNED`` or ``Buffer(tuned=...)`` leaves every choice at the defaults (to
compare them). A bucket with no entry takes the nearest tuned bucket's of the same key;
``Buffer.launch_params(path, num_tokens).source`` names the file an entry came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from moe_ep.kernels.params import CombineParams, DispatchParams, default_combine, default_dispatch

SHIPPED_DIR = Path(__file__).parent / "tuned"
ENV_VAR = "MOE_EP_TUNED"
OFF = "off"  # as $MOE_EP_TUNED or Buffer(tuned=...): the defaults, no tuned table
FORMAT_VERSION = (2, 0)  # (major, minor) written as "2.0"; files of a newer major are skipped
LEGACY_SHAPE = {"num_experts": 256, "topk": 8}  # format 1's entries: DeepSeek-V3, the tuner's default
_PARAMS_KEYS = ("dispatch", "combine", "measured")  # an entry's keys besides its TuneKey fields


class TunedTableWarning(UserWarning):
    """A tuned file, or part of one, that this version of moe_ep cannot use (and skips)."""


def token_bucket(num_tokens: int) -> int:
    """The power of two >= num_tokens (1 for 0): the unit parameters are tuned and chosen by."""
    return 1 << max(num_tokens - 1, 0).bit_length()


def user_dir() -> Path:
    """The user's tuned files: ``$XDG_CACHE_HOME/moe_ep/tuned`` (``~/.cache/moe_ep/tuned``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "moe_ep" / "tuned"


def card_file_name(card: str) -> str:
    """The tuned file's name for a card: "NVIDIA H200" -> "nvidia-h200.json"."""
    return f"{card.replace('NVIDIA ', '').replace(' ', '-').lower()}.json"


@dataclass(frozen=True)
class TuneKey:
    gpu: str  # device name, e.g. "NVIDIA H200" ("cpu" under the interpreter)
    world_size: int
    hidden: int
    num_experts: int  # experts of the whole group
    topk: int
    dispatch_dtype: str  # "fp8" or "bf16"
    path: str  # "ll", "ht" or "inter"
    bucket: int  # token_bucket of the tokens per rank
    gpus_per_node: int = 0  # the inter path's node size; 0 on one node
    zero_copy: bool = False  # HT: a dispatch(zero_copy=True) call (no receive copy: its own best parameters)


_KEY_FIELDS = tuple(f.name for f in dataclasses.fields(TuneKey))


def _key_fields(entry: dict) -> dict:
    """TuneKey fields of a JSON entry (optional fields missing from it take their default)."""
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

    @staticmethod
    def paths(extra: str | os.PathLike | None = None) -> list[Path]:
        """The files ``load`` reads, in order (see the module docstring); [] when "off"."""
        if OFF in (os.environ.get(ENV_VAR), extra):
            return []
        paths = sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []
        paths += sorted(user_dir().glob("*.json")) if user_dir().is_dir() else []
        return paths + [Path(p) for p in (os.environ.get(ENV_VAR), extra) if p]

    @classmethod
    def load(cls, extra: str | os.PathLike | None = None) -> "TunedTable":
        """Shipped files, the user's, $MOE_EP_TUNED, then ``extra`` (a later entry wins); none at
        all (the defaults everywhere) when either of the last two is "off"."""
        table = cls()
        for path in cls.paths(extra):
            table.entries.update(read_entries(path))
        return table

    def choose(self, key: TuneKey, on_gpu: bool) -> Choice:
        """The tuned entry for ``key``; else that of the nearest tuned token bucket (by powers of
        two, the smaller on a tie) of the same GPU, world, shape, dtype and path: every launch
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


def _format_version(data: dict) -> tuple[int, int] | None:
    """A file's (major, minor) format version; format 1 without one; None when unreadable."""
    version = data.get("format_version")
    if version is None:
        return (1, 0)
    try:
        major, minor = (int(part) for part in str(version).split("."))
        return major, minor
    except ValueError:
        return None


def _params(cls, values: dict, unknown: set[str], where: str):
    """``cls(**values)`` without the keys ``cls`` does not have (added to ``unknown``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown.update(f"{where}.{k}" for k in values if k not in names)
    return cls(**{k: v for k, v in values.items() if k in names})


def read_entries(path: str | os.PathLike) -> dict[TuneKey, Choice]:
    """The usable entries of one tuned JSON file (a file that does not exist has none); what it
    cannot use is skipped with a ``TunedTableWarning`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"tuned file {path} is not readable JSON, ignored: {err}", TunedTableWarning, stacklevel=2)
        return {}
    version = _format_version(data) if isinstance(data, dict) else None
    if version is None:
        warnings.warn(f"tuned file {path} has no valid format_version, ignored", TunedTableWarning, stacklevel=2)
        return {}
    if version[0] > FORMAT_VERSION[0]:
        warnings.warn(f"tuned file {path} has format {version[0]}.{version[1]}, newer than this moe_ep reads "
                      f"({FORMAT_VERSION[0]}.x), ignored: upgrade moe_ep or re-tune", TunedTableWarning,
                      stacklevel=2)
        return {}
    unknown = {k for k in data if k not in ("format_version", "entries")}
    entries, skipped = {}, []
    for index, raw in enumerate(data.get("entries", [])):
        entry = dict(LEGACY_SHAPE, **raw) if version[0] == 1 else raw
        unknown.update(f"entries[].{k}" for k in entry if k not in _KEY_FIELDS and k not in _PARAMS_KEYS)
        try:
            key = TuneKey(**_key_fields(entry))
            dispatch = _params(DispatchParams, entry["dispatch"], unknown, "dispatch")
            combine = _params(CombineParams, entry["combine"], unknown, "combine") if entry.get("combine") else None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            skipped.append(f"entry {index}: {type(err).__name__}: {err}")
            continue
        entries[key] = Choice(dispatch, combine, f"tuned: {path}")  # combine None: the default's
    if unknown:
        warnings.warn(f"tuned file {path}: keys this moe_ep does not know, ignored: {', '.join(sorted(unknown))}",
                      TunedTableWarning, stacklevel=2)
    if skipped:
        warnings.warn(f"tuned file {path}: {len(skipped)} unusable entries skipped ({'; '.join(skipped[:3])}"
                      f"{'; ...' if len(skipped) > 3 else ''})", TunedTableWarning, stacklevel=2)
    return entries


def write_entries(path: str | os.PathLike, new: list[dict]) -> None:
    """Merge ``new`` entry dicts (TuneKey fields, "dispatch", "combine", optional "measured")
    into the JSON file at ``path`` (format FORMAT_VERSION), replacing entries with the same key.
    A format-1 file's entries are given DeepSeek-V3's shape (``LEGACY_SHAPE``) first; a file of a
    newer major format is not overwritten (ValueError)."""
    path = Path(path)
    old = []
    if path.exists():
        data = json.loads(path.read_text())
        version = _format_version(data)
        if version is None or version[0] > FORMAT_VERSION[0]:
            raise ValueError(f"{path} has format {data.get('format_version')!r}, which this moe_ep does not write "
                             f"({FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}): choose another file")
        old = [dict(LEGACY_SHAPE, **e) if version[0] == 1 else e for e in data["entries"]]

    def key(e):
        return tuple(_key_fields(e).values())

    merged = {key(e): e for e in old}
    merged.update({key(e): e for e in new})
    path.parent.mkdir(parents=True, exist_ok=True)
    version = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"
    path.write_text(json.dumps({"format_version": version, "entries": sorted(merged.values(), key=key)}, indent=1)
                    + "\n")
