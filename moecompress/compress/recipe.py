"""A compression recipe: the ordered stages `moecompress compress` runs in one layer-streamed pass.

A recipe file is YAML or JSON, either a list of stages or ``{"stages": [...]}``; each stage is a one-key mapping
from the operation to its options:

    stages:
      - prune: {ratio: 0.25}                      # drop 25% of the routed experts (output-error + down refit)
      - merge: {ratio: 0.25}                      # or merge them in clusters
      - atom: {ratio: 0.2}                        # drop 20% of each expert's channels (HEAPr by default)
      - quantize: {bits: 3}                       # then quantize what is left

The command-line shorthands (``--prune 0.25 --atom 0.2 --bits 3``) build the same list in the order expert
removal (prune or merge), channel removal, quantization. Everything is checked here, before any work: an unknown
operation or option, a value of the wrong type or range, or an order that cannot run is one line saying what to
change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError

# op -> option -> (type, check, help). Every stage's options mirror its single command's flags.
_RATIO = (float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (exclusive)")
OPTIONS: dict[str, dict[str, tuple[type | tuple[type, ...], Any, str]]] = {
    "prune": {
        "ratio": _RATIO,
        "method": (str, lambda v: v in ("output-error", "reap", "frequency", "routing-mass", "random"), "a method"),
        "refit": (str, lambda v: v in ("none", "router", "down", "router+down"), "none, router, down or router+down"),
        "protect_super": (bool, lambda v: True, "true or false"),
        "error_tokens": (int, lambda v: v >= 1, "a whole number >= 1"),
    },
    "merge": {
        "ratio": _RATIO,
    },
    "atom": {
        "ratio": _RATIO,
        "score": (str, lambda v: v in ("heapr", "magnitude"), "heapr or magnitude"),
        "refit": (str, lambda v: v in ("down", "none"), "down or none"),
    },
    "quantize": {
        "bits": (int, lambda v: v in (2, 3, 4, 8), "2, 3, 4 or 8"),
        "method": (str, lambda v: v in ("gptq", "rtn"), "gptq or rtn"),
        "other_bits": (int, lambda v: v in (2, 3, 4, 8, 16), "2, 3, 4, 8 or 16 (keep)"),
    },
}
REQUIRED = {"prune": ("ratio",), "merge": ("ratio",), "atom": ("ratio",), "quantize": ("bits",)}
# the order stages may come in: expert count first, then widths, then bits
RANK = {"prune": 0, "merge": 0, "atom": 1, "quantize": 2}


@dataclass(frozen=True)
class Stage:
    op: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.op}({opts})"


def _stage(i: int, raw: Any, where: str) -> Stage:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise UserError(
            f"{where} stage {i + 1} is {json.dumps(raw)[:60]}: write each stage as one operation mapping to its "
            f"options, e.g. `- prune: {{ratio: 0.25}}`"
        )
    ((op, opts),) = raw.items()
    if op not in OPTIONS:
        raise UserError(f"{where} stage {i + 1}: unknown operation {op!r}; use one of {', '.join(OPTIONS)}")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise UserError(f"{where} stage {i + 1} ({op}): its options must be a mapping, e.g. `{op}: {{ratio: 0.25}}`")
    known = OPTIONS[op]
    clean: dict[str, Any] = {}
    for k, v in opts.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise UserError(f"{where} stage {i + 1} ({op}): unknown option {k!r}; {op} takes {', '.join(known)}")
        typ, ok, what = known[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, bool) and typ is not bool or not isinstance(v, typ) or not ok(v):
            raise UserError(f"{where} stage {i + 1} ({op}): {key} is {v!r}; it must be {what}")
        clean[key] = v
    missing = [k for k in REQUIRED[op] if k not in clean]
    if missing:
        raise UserError(f"{where} stage {i + 1} ({op}) needs {', '.join(missing)}, e.g. `{op}: {{{missing[0]}: ...}}`")
    return Stage(op, clean)


def check_order(stages: list[Stage], where: str = "the recipe") -> None:
    if not stages:
        raise UserError(f"{where} has no stages: give at least one of {', '.join(OPTIONS)}")
    for a, b in zip(stages, stages[1:], strict=False):
        if RANK[b.op] < RANK[a.op]:
            raise UserError(
                f"{where}: {b.op} after {a.op} cannot run; order the stages expert removal (prune/merge), then "
                "channel removal (atom), then quantize"
            )
        if RANK[a.op] == RANK[b.op]:
            raise UserError(f"{where}: {a.op} and {b.op} both change the same thing; keep one of them")


def parse(data: Any, where: str = "the recipe") -> list[Stage]:
    """Stages from a loaded recipe (a list, or a mapping with ``stages``)."""
    if isinstance(data, dict) and set(data) == {"stages"}:
        data = data["stages"]
    if not isinstance(data, list):
        raise UserError(f"{where} must be a list of stages (or `stages:` holding one), e.g. `- quantize: {{bits: 3}}`")
    stages = [_stage(i, s, where) for i, s in enumerate(data)]
    check_order(stages, where)
    return stages


def load(path: Path) -> list[Stage]:
    """Read a YAML or JSON recipe file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe {p} is not a file: give a .yaml or .json file listing the stages")
    if p.stat().st_size > 1 << 20:
        raise UserError(f"recipe {p} is over 1 MiB: a recipe is a short list of stages")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = (str(err).splitlines() or [""])[0][:160]
        raise UserError(f"recipe {p} cannot be read ({first}): write it as YAML or JSON") from None
    return parse(data, f"recipe {p.name}")


def from_flags(prune: float | None, merge: float | None, atom: float | None, bits: int | None) -> list[Stage]:
    """The stages the shorthand flags ask for, in the order they run."""
    raw: list[dict[str, Any]] = []
    if prune is not None:
        raw.append({"prune": {"ratio": prune}})
    if merge is not None:
        raw.append({"merge": {"ratio": merge}})
    if atom is not None:
        raw.append({"atom": {"ratio": atom}})
    if bits is not None:
        raw.append({"quantize": {"bits": bits}})
    if not raw:
        raise UserError("nothing to do: give --recipe FILE or at least one of --prune, --merge, --atom, --bits")
    return parse(raw, "the flags")
