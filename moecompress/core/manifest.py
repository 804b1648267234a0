"""moecompress.json: one schema for every output, the common fields plus one section per stage.

    {"tool": "moecompress", "tool_version": "...", "schema": 2,
     "command": "compress", "layout": "uniform", "load_with": "transformers",
     "source_model": "...", "source_fingerprint": "...", "calibration": {...} | null,
     "params_before": ..., "bytes_before": ..., "params_after": ..., "bytes_after": ..., "elapsed_s": ...,
     "warnings": [...],
     "stages": [{"op": "prune", ...its fields...}, {"op": "quantize", ...}]}

A single command (prune, merge, quantize, atomic prune) is a one-stage manifest. ``Manifest.from_dict`` reads
strictly: a missing common field or a field of the wrong type is an error naming it. Outputs of moecompress
before schema 2 (all fields at the top level) are read as one stage named by their ``command``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..version import __version__
from .errors import UserError
from .jsonfile import read_json_file

SCHEMA = 2
OPS = ("profile", "prune", "atom", "merge", "quantize", "budget")
LAYOUTS = ("uniform", "per-layer", "atomic_exact", "quantized", "budget_exact")

# common field -> accepted types (None allowed where listed)
_COMMON: dict[str, tuple[type, ...]] = {
    "command": (str,),
    "layout": (str,),
    "load_with": (str,),
    "source_model": (str,),
    "source_fingerprint": (str,),
    "calibration": (dict, type(None)),
    "params_before": (int,),
    "bytes_before": (int,),
    "params_after": (int, type(None)),
    "bytes_after": (int, type(None)),
    "elapsed_s": (float, int, type(None)),
    "warnings": (list,),
}


@dataclass
class Manifest:
    """What moecompress.json says about one output."""

    command: str
    layout: str
    load_with: str
    source_model: str
    source_fingerprint: str
    calibration: dict[str, Any] | None
    params_before: int
    bytes_before: int
    params_after: int | None = None
    bytes_after: int | None = None
    elapsed_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def stage(self, op: str) -> dict[str, Any] | None:
        """The last section of ``op`` (None when no stage did it)."""
        found = [s for s in self.stages if s.get("op") == op]
        return found[-1] if found else None

    def add(self, op: str, section: dict[str, Any]) -> dict[str, Any]:
        if op not in OPS:
            raise ValueError(f"unknown stage op {op!r}")
        s = {"op": op, **section}
        self.stages.append(s)
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"tool": "moecompress", "tool_version": __version__, "schema": SCHEMA, **asdict(self)}

    def write(self, folder: Path) -> None:
        (folder / "moecompress.json").write_text(json.dumps(json_safe(self.to_dict())[0], indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Any, where: str = "moecompress.json") -> Manifest:
        if not isinstance(d, dict):
            raise UserError(f"{where} is not a JSON object: it was not written by moecompress")
        if d.get("schema") is None:  # schema 1: one command, its fields at the top level
            d = _from_schema1(d)
        elif d.get("schema") != SCHEMA:
            raise UserError(f"{where} has schema {d.get('schema')!r}; this moecompress reads {SCHEMA}: upgrade it")
        for k, types in _COMMON.items():
            v = d.get(k)
            out_of_range = isinstance(v, int | float) and not (math.isfinite(v) and 0 <= v < 2**63)
            if k not in d or not isinstance(v, types) or isinstance(v, bool) or out_of_range:
                shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:56] + "…"
                raise UserError(f"{where} field {k} is {shown}: not what moecompress writes (rewrite the output)")
        stages = d.get("stages")
        if not isinstance(stages, list) or not all(isinstance(s, dict) and s.get("op") in OPS for s in stages):
            raise UserError(f"{where} has no valid stages list: not what moecompress writes (rewrite the output)")
        return cls(**{k: d[k] for k in _COMMON}, stages=stages)

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """``folder``/moecompress.json read with bounds (size, depth) and strictly, or None when absent."""
        f = Path(folder) / "moecompress.json"
        if not f.exists():
            return None
        return cls.from_dict(read_json_file(f, "moecompress manifest (JSON)"), str(f))


def _from_schema1(d: dict[str, Any]) -> dict[str, Any]:
    """A flat manifest of an earlier moecompress as a one-stage schema-2 dict."""
    out = {k: d.get(k) for k in _COMMON}
    out["command"] = d.get("command") or "unknown"
    out["layout"] = d.get("layout") or "uniform"
    out["load_with"] = d.get("load_with") or "transformers"
    out["warnings"] = d.get("warnings") or []
    for k, missing in (("source_model", ""), ("source_fingerprint", ""), ("params_before", 0), ("bytes_before", 0)):
        out[k] = missing if d.get(k) is None else d[k]  # not coerced: a wrong type is named by from_dict
    cmd = out["command"] if isinstance(out["command"], str) else ""
    op = {"prune": "prune", "merge": "merge", "quantize": "quantize"}.get(cmd, "prune")
    if d.get("granularity") == "atom" or out["command"] == "prune --granularity atom":  # atomic prune wrote the latter
        op = "atom"
    section = {k: v for k, v in d.items() if k not in _COMMON and k not in ("tool", "tool_version", "schema")}
    out["stages"] = [{"op": op, **section}]
    return out


def json_safe(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of ``obj`` with every NaN/Inf float replaced by None, and the paths of those replaced."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [path or "value"]
    if isinstance(obj, dict):
        pairs = [(k, json_safe(v, f"{path}.{k}" if path else str(k))) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, ps) in pairs for p in ps]
    if isinstance(obj, list | tuple):
        items = [json_safe(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    return obj, []
