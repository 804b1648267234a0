"""Tolerant readers for the sidecar files that moecompress commands write.

A run folder (``moecompress profile -o RUN``) or an output folder (``prune``/``merge``/``quantize -o OUT``) may hold:
``profile.json``, ``moecompress.json`` (manifest), ``bit_plan.json``, ``eval.json`` and ``eval_base.json``. Every
piece is optional; a file that is missing is ``None``, a file that cannot be read becomes a line in
``RunSidecars.problems`` (shown in the report) instead of an exception. Nothing here recomputes a statistic.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecompress.errors import UserError

PROFILE = "profile.json"
MANIFEST = "moecompress.json"
BIT_PLAN = "bit_plan.json"
EVAL = "eval.json"
EVAL_BASE = "eval_base.json"
MAX_JSON_BYTES = 256 * 1024 * 1024
# Manifest keys that may point to the profile run a command reused.
PROFILE_POINTERS = ("profile", "profile_dir", "profile_path", "profile_run")
# writer.atomic_dir builds OUT in ".<name>.tmp-<pid>-<ms>" beside OUT and renames it when complete.
ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-\d+-\d+$")


@dataclass
class RunSidecars:
    """Everything the report knows about one run or output folder."""

    path: Path
    name: str
    shown_path: Path | None = None
    profile: dict[str, Any] | None = None
    profile_path: Path | None = None
    manifest: dict[str, Any] | None = None
    bit_plan: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    eval_base: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no sidecar at all was found."""
        return not any((self.profile, self.manifest, self.bit_plan, self.eval, self.eval_base))


def read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """Read a JSON object; ``None`` when absent; an unreadable or non-object file adds a line to ``problems``."""
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            problems.append(f"{path.name}: larger than {MAX_JSON_BYTES // 2**20} MiB, not read")
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name}: cannot be read ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: expected a JSON object, found {type(data).__name__}")
        return None
    return data


def _kind_of(data: dict[str, Any], name: str) -> str:
    if "perplexity" in data or "kl_to_base" in data:
        return "eval_base" if "base" in name else "eval"
    if "experts" in data and "moe_layers" in data:
        return "profile"
    if "bit_plan" in name or "plan" in data:
        return "bit_plan"
    return "manifest"


def load_run(path: str | Path) -> RunSidecars:
    """Collect the sidecars of one folder (or of one JSON file, classified by its content)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder (profile -o) or an output folder (prune/merge/...)")
    if path.is_file():
        run = RunSidecars(path=path, name=path.stem)
        data = read_json(path, run.problems)
        if data is None:
            raise UserError(f"{path} is not a readable JSON sidecar: give a run or output folder")
        kind = _kind_of(data, path.name)
        setattr(run, kind, data)
        if kind == "profile":
            run.profile_path = path
        return run
    name = path.resolve().name or str(path)
    shown = path
    if m := ATOMIC_TMP.match(name):  # a report written inside a command's temporary output folder
        name, shown = m["name"], path.parent / m["name"]
    run = RunSidecars(path=path, name=name, shown_path=shown)
    run.manifest = read_json(path / MANIFEST, run.problems)
    run.bit_plan = read_json(path / BIT_PLAN, run.problems)
    run.eval = read_json(path / EVAL, run.problems)
    run.eval_base = read_json(path / EVAL_BASE, run.problems)
    run.profile_path = _find_profile(path, run.manifest)
    if run.profile_path is not None:
        run.profile = read_json(run.profile_path, run.problems)
    return run


def _find_profile(folder: Path, manifest: dict[str, Any] | None) -> Path | None:
    if (folder / PROFILE).is_file():
        return folder / PROFILE
    for key in PROFILE_POINTERS:
        ref = (manifest or {}).get(key)
        if not isinstance(ref, str) or not ref:
            continue
        for cand in (Path(ref), folder / ref):
            cand = cand / PROFILE if cand.is_dir() else cand
            if cand.is_file() and cand.suffix == ".json":
                return cand
    return None


# ---------- interpretation helpers (pure, over the parsed dicts) ----------


def num(x: Any) -> float | int | None:
    """A JSON number, or ``None`` for anything else (bools, strings, NaN stay out of charts)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def first(*values: Any) -> Any:
    """First value that is not ``None``."""
    return next((v for v in values if v is not None), None)


def profile_layers(profile: dict[str, Any]) -> tuple[list[int], int]:
    """(MoE layer indices in order, number of routed experts per layer) from a profile."""
    layers = [int(x) for x in profile.get("moe_layers") or [] if num(x) is not None]
    experts = [e for e in profile.get("experts") or [] if isinstance(e, dict)]
    if not layers:
        layers = sorted({int(e["layer"]) for e in experts if num(e.get("layer")) is not None})
    n = num(profile.get("num_experts"))
    if n is None:
        n = max((int(e["expert"]) + 1 for e in experts if num(e.get("expert")) is not None), default=0)
    return layers, int(n)


def expert_matrix(profile: dict[str, Any], key: str) -> tuple[list[int], list[list[float | None]]]:
    """Per-layer x per-expert matrix of ``experts[*][key]`` (``None`` where absent). Returns (layers, matrix)."""
    layers, n = profile_layers(profile)
    row = {layer: i for i, layer in enumerate(layers)}
    mat: list[list[float | None]] = [[None] * n for _ in layers]
    for e in profile.get("experts") or []:
        if not isinstance(e, dict):
            continue
        layer, ex, v = num(e.get("layer")), num(e.get("expert")), num(e.get(key))
        if layer is None or ex is None or int(layer) not in row or not 0 <= int(ex) < n:
            continue
        mat[row[int(layer)]][int(ex)] = v
    return layers, mat


def expert_flags(profile: dict[str, Any], key: str) -> set[tuple[int, int]]:
    """(row, column) cells of experts whose ``key`` is truthy; for ``super`` also the ``super_experts`` list."""
    layers, n = profile_layers(profile)
    row = {layer: i for i, layer in enumerate(layers)}
    cells = set()
    for e in profile.get("experts") or []:
        if isinstance(e, dict) and e.get(key) and num(e.get("layer")) is not None and num(e.get("expert")) is not None:
            if int(e["layer"]) in row and 0 <= int(e["expert"]) < n:
                cells.add((row[int(e["layer"])], int(e["expert"])))
    if key == "super":
        for pair in profile.get("super_experts") or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(num(p) is not None for p in pair):
                if int(pair[0]) in row and 0 <= int(pair[1]) < n:
                    cells.add((row[int(pair[0])], int(pair[1])))
    return cells


def domain_frequencies(profile: dict[str, Any]) -> dict[str, list[list[float | None]]]:
    """Per domain: routing frequency per layer x expert = counts / (top_k x domain tokens)."""
    domains = profile.get("domains")
    if not isinstance(domains, dict):
        return {}
    top_k = num(profile.get("top_k")) or 1
    out = {}
    for name, d in domains.items():
        if not isinstance(d, dict) or not isinstance(d.get("counts"), list):
            continue
        tokens = num(d.get("tokens"))
        rows = []
        for counts in d["counts"]:
            if not isinstance(counts, list):
                continue
            total = tokens * top_k if tokens else sum(c for c in counts if num(c) is not None)
            rows.append([(c / total if total and num(c) is not None else None) for c in counts])
        out[str(name)] = rows
    return out


def int_key_dict(d: Any) -> dict[int, Any] | None:
    """``{"3": x}`` -> ``{3: x}`` when every key is an integer string; else ``None``."""
    if not isinstance(d, dict) or not d:
        return None
    try:
        return {int(k): v for k, v in d.items()}
    except (TypeError, ValueError):
        return None


def kept_experts(entry: Any) -> list[int] | None:
    """Kept original expert indices from one manifest layer entry, whatever shape it has.

    Understands ``{"kept": [...]}``, ``{"kept_map"|"map"|"old_to_new": {old: new}}``, a bare ``{old: new}`` map
    and a bare list of ints.
    """
    if isinstance(entry, list) and entry and all(num(x) is not None for x in entry):
        return sorted(int(x) for x in entry)
    if not isinstance(entry, dict):
        return None
    for key in ("kept", "kept_experts", "keep"):
        if isinstance(entry.get(key), list) and all(num(x) is not None for x in entry[key]):
            return sorted(int(x) for x in entry[key])
    for key in ("kept_map", "map", "old_to_new", "mapping"):
        m = int_key_dict(entry.get(key))
        if m is not None:
            return sorted(k for k, v in m.items() if v is not None)
    m = int_key_dict(entry)
    if m is not None and all(num(v) is not None or v is None for v in m.values()):
        return sorted(k for k, v in m.items() if v is not None)
    return None


def clusters_of(entry: Any) -> list[list[int]] | None:
    """Merge clusters (lists of old expert indices, one per new expert) from one manifest layer entry."""
    cand = entry.get("clusters") if isinstance(entry, dict) else None
    if isinstance(cand, dict):
        m = int_key_dict(cand)
        cand = [m[k] for k in sorted(m)] if m is not None else list(cand.values())
    if isinstance(cand, list) and cand and all(isinstance(c, list) for c in cand):
        if all(num(x) is not None for c in cand for x in c):
            return [[int(x) for x in c] for c in cand]
    return None


def plan_widths(bit_plan: dict[str, Any] | None) -> dict[tuple[int, int], float]:
    """{(layer, expert): bits} from a bit plan, reading ``experts``/``plan``/``assignments`` records or a
    ``layers`` map of per-layer widths (a layer-wide width or a list/map of per-expert widths)."""
    if not isinstance(bit_plan, dict):
        return {}
    out: dict[tuple[int, int], float] = {}
    for key in ("experts", "plan", "assignments", "entries"):
        records = bit_plan.get(key)
        if isinstance(records, list):
            for r in records:
                if not isinstance(r, dict):
                    continue
                layer, ex = num(r.get("layer")), num(r.get("expert"))
                bits = num(first(r.get("bits"), r.get("width"), r.get("w")))
                if layer is not None and ex is not None and bits is not None:
                    out[(int(layer), int(ex))] = bits
            if out:
                return out
    layers = int_key_dict(bit_plan.get("layers"))
    for layer, entry in (layers or {}).items():
        per: Any = entry
        if isinstance(entry, dict):
            per = first(entry.get("experts"), entry.get("widths"))
            n, scalar = num(first(entry.get("num_experts"), entry.get("n_experts"))), num(entry.get("bits"))
            if per is None and n is not None and scalar is not None:  # one width for the whole layer
                per = [scalar] * int(n)
        items = list(enumerate(per)) if isinstance(per, list) else list((int_key_dict(per) or {}).items())
        for ex, b in items:
            if isinstance(b, dict):
                ex = int(b["expert"]) if num(b.get("expert")) is not None else ex
                b = first(b.get("bits"), b.get("width"))
            if num(b) is not None:
                out[(layer, ex)] = b
    return out


def perplexities(ev: dict[str, Any] | None) -> dict[str, float]:
    """Domain -> perplexity from an eval JSON (numbers only)."""
    ppl = (ev or {}).get("perplexity")
    if isinstance(ppl, dict):
        return {str(k): v for k, v in ppl.items() if num(v) is not None}
    if num(ppl) is not None:
        return {"all": ppl}
    return {}
