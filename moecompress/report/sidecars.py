"""Readers for the sidecar files that moecompress commands write.

A run folder (``moecompress profile -o RUN``) or an output folder (``prune``/``merge``/``quantize``/``compress -o
OUT``) may hold: ``profile.json``, ``moecompress.json`` (the manifest), ``bit_plan.json``, ``eval.json`` and
``eval_base.json``. Every piece is optional; a file that is missing is ``None``, a file that cannot be read becomes
a line in ``RunSidecars.problems`` (shown in the report) instead of an exception. Nothing here recomputes a
statistic.

The manifest has one schema (``moecompress.core.manifest``): it is read strictly with ``Manifest.from_dict``
(schema-1 outputs of earlier versions read as one stage); one that does not fit is not guessed at but shown as
an unreadable manifest with the reason (``RunSidecars.manifest_error``). Each stage section holds its op's own
fields (``prune``: ``layers[l].kept``; ``atom``: ``layers[l].kept_experts``/``widths``; ``merge``:
``layers[l].clusters``; ``quantize``: per-expert widths in ``bit_plan.json``).

Every field is still untrusted. ``read_json`` bounds what is read (size, nesting depth; numbers beyond +-2**53,
NaN and Inf become ``None``) and ``check_ranges`` turns counts and indices outside what any real model has
(``MAX_LAYERS`` layers, ``MAX_EXPERTS`` experts per layer) into "problems" lines; the helpers below skip those
same values, so the work the report does is bounded by the real model's size, never by a number someone wrote
into a file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecompress.core.errors import UserError
from moecompress.core.manifest import Manifest
from moecompress.report.svg import MAX_CELLS  # noqa: F401  (re-exported: layers x experts drawn per chart)

PROFILE = "profile.json"
MANIFEST = "moecompress.json"
BIT_PLAN = "bit_plan.json"
EVAL = "eval.json"
EVAL_BASE = "eval_base.json"
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64  # JSON nesting; the commands write at most 5 levels
MAX_INT = 2**53  # larger integers are not exact as floats (and overflow charts); they are shown as missing
MAX_LAYERS = 1024  # decoder layers of the largest real MoE are ~100
MAX_EXPERTS = 4096  # routed experts per layer of the largest real MoE are ~400
MAX_LIST = 200  # warnings shown per source
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
    manifest: Manifest | None = None
    manifest_error: str | None = None  # why moecompress.json is not a manifest this moecompress reads
    tool_version: str | None = None  # of the manifest (Manifest holds what the output is, not who wrote it)
    bit_plan: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    eval_base: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no sidecar at all was found."""
        return not any((self.profile, self.manifest, self.manifest_error, self.bit_plan, self.eval, self.eval_base))


def read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """Read a JSON object; ``None`` when absent; an unreadable, too large, too deeply nested or non-object file
    adds a line to ``problems``. Out-of-range numbers are replaced by ``None`` (and counted in ``problems``)."""
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            problems.append(f"{path.name}: larger than {MAX_JSON_BYTES // 2**20} MiB, not read")
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        problems.append(f"{path.name}: nested too deeply (more than {MAX_DEPTH} levels), not read")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an integer of >4300 digits
        problems.append(f"{path.name}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: expected a JSON object, found {type(data).__name__}")
        return None
    if _depth(data) > MAX_DEPTH:
        problems.append(f"{path.name}: nested too deeply (more than {MAX_DEPTH} levels), not read")
        return None
    bad: list[tuple[str, Any]] = []
    data = _scrub(data, "", bad)
    if bad:
        where, value = bad[0]
        shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "…"
        problems.append(
            f"{path.name}: {len(bad)} number(s) out of range (first: {where or 'value'} = {shown}); shown as –"
        )
    return data


def read_manifest(run: RunSidecars, path: Path) -> None:
    """Fill ``run.manifest`` from ``path`` (strictly), or ``run.manifest_error`` with the one-line reason."""
    n = len(run.problems)
    data = read_json(path, run.problems)
    if data is None:
        if len(run.problems) > n:  # present but unreadable: read_json said why
            run.manifest_error = run.problems[-1]
        return
    _set_manifest(run, data)


def _set_manifest(run: RunSidecars, data: dict[str, Any]) -> None:
    try:
        run.manifest = Manifest.from_dict(data, MANIFEST)
    except UserError as err:
        run.manifest_error = str(err)
        run.problems.append(f"unreadable manifest: {err}")
        return
    run.tool_version = text(data.get("tool_version"))


def _depth(data: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return deepest


def _scrub(value: Any, where: str, bad: list[tuple[str, Any]]) -> Any:
    """``value`` with integers beyond +-MAX_INT and NaN/Inf floats replaced by ``None`` (recorded in ``bad``)."""
    if isinstance(value, dict):
        return {k: _scrub(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if (isinstance(value, int) and abs(value) > MAX_INT) or (isinstance(value, float) and not math.isfinite(value)):
        bad.append((where, value))
        return None
    return value


def _kind_of(data: dict[str, Any], name: str) -> str:
    if "perplexity" in data or "kl_to_base" in data:
        return "eval_base" if "base" in name else "eval"
    if "experts" in data and "moe_layers" in data:
        return "profile"
    if "command" in data or "schema" in data:  # every manifest names its command (bit plans do not)
        return "manifest"
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
        if kind == "manifest":
            _set_manifest(run, data)
        else:
            setattr(run, kind, data)
        if kind == "profile":
            run.profile_path = path
        check_ranges(run)
        return run
    name = path.resolve().name or str(path)
    shown = path
    if m := ATOMIC_TMP.match(name):  # a report written inside a command's temporary output folder
        name, shown = m["name"], path.parent / m["name"]
    run = RunSidecars(path=path, name=name, shown_path=shown)
    read_manifest(run, path / MANIFEST)
    run.bit_plan = read_json(path / BIT_PLAN, run.problems)
    run.eval = read_json(path / EVAL, run.problems)
    run.eval_base = read_json(path / EVAL_BASE, run.problems)
    run.profile_path = _find_profile(path, run.manifest)
    if run.profile_path is not None:
        run.profile = read_json(run.profile_path, run.problems)
    check_ranges(run)
    return run


def check_ranges(run: RunSidecars) -> None:
    """Add a "problems" line for every count or index that no real model has (the report then ignores it)."""
    out = run.problems

    def bad(src: str, key: str, value: Any, allowed: str) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:36] + "…"
        out.append(f"{src}: {key} = {shown} is out of range ({allowed}); ignored")

    p = run.profile
    if p is not None:
        for key in ("num_experts", "top_k"):
            if key in p and p[key] is not None and count_of(p[key]) is None:
                bad(PROFILE, key, p[key], f"a whole number 1..{MAX_EXPERTS}")
        layers = p.get("moe_layers")
        if layers is not None and (not isinstance(layers, list) or any(layer_of(x) is None for x in layers)):
            bad(PROFILE, "moe_layers", layers, f"a list of layer indices 0..{MAX_LAYERS - 1}")
        n = profile_layers(p)[1]
        recs = [e for e in _list(p.get("experts")) if isinstance(e, dict)]
        wrong = [e for e in recs if layer_of(e.get("layer")) is None or (expert_of(e.get("expert")) or 0) >= max(n, 1)
                 or expert_of(e.get("expert")) is None]  # fmt: skip
        if wrong:
            out.append(f"{PROFILE}: {len(wrong)} expert record(s) with a layer or expert index out of range; ignored")
    for i, st in enumerate(run.manifest.stages if run.manifest is not None else []):
        src = f"{MANIFEST} stage {i + 1} ({st['op']})"
        for key in ("experts_before", "experts_after"):
            if st.get(key) is not None and count_of(st[key]) is None:
                bad(src, key, st[key], f"a whole number 1..{MAX_EXPERTS}")
        layers = st.get("layers")
        if layers not in (None, {}) and int_key_dict(layers) is None:
            out.append(f"{src}: layers is not a map of layer indices 0..{MAX_LAYERS - 1}; ignored")
        for layer, entry in (int_key_dict(layers) or {}).items():
            key = LISTED.get(st["op"])
            if key is not None and entry_experts(st["op"], entry) is None:
                if isinstance(entry, dict) and entry.get(key) is not None:
                    out.append(f"{src}: layer {layer} lists experts out of range 0..{MAX_EXPERTS - 1}; ignored")
                else:
                    out.append(f"{src}: layer {layer} has no {key} list; ignored")


def _find_profile(folder: Path, manifest: Manifest | None) -> Path | None:
    """The folder's own profile.json, else the profile run a stage reused (its ``profile``: a path, absolute or
    relative to the folder)."""
    if (folder / PROFILE).is_file():
        return folder / PROFILE
    for st in manifest.stages if manifest is not None else []:
        ref = st.get("profile")
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


def index(x: Any, limit: int) -> int | None:
    """A whole number in [0, limit) (a layer or expert index), or ``None``."""
    v = num(x)
    if v is None or v != int(v) or not 0 <= v < limit:
        return None
    return int(v)


def layer_of(x: Any) -> int | None:
    return index(x, MAX_LAYERS)


def expert_of(x: Any) -> int | None:
    return index(x, MAX_EXPERTS)


def count_of(x: Any, limit: int = MAX_EXPERTS) -> int | None:
    """A count in [1, limit], or ``None``."""
    v = index(x, limit + 1)
    return v if v else None


def text(x: Any, limit: int = 1000) -> str | None:
    """A name-like field (model, family, fingerprint, ...) as a short string; ``None`` for lists, objects, null."""
    if isinstance(x, bool) or not isinstance(x, (str, int, float)):
        return None
    t = str(x)
    return t if len(t) <= limit else t[:limit] + "…"


def first(*values: Any) -> Any:
    """First value that is not ``None``."""
    return next((v for v in values if v is not None), None)


def profile_layers(profile: dict[str, Any]) -> tuple[list[int], int]:
    """(MoE layer indices in order, number of routed experts per layer) from a profile.

    Only indices in range count; a declared ``num_experts`` out of range gives way to what the records show."""
    layers = list(dict.fromkeys(l for x in _list(profile.get("moe_layers")) if (l := layer_of(x)) is not None))
    experts = [e for e in _list(profile.get("experts")) if isinstance(e, dict)]
    if not layers:
        layers = sorted({l for e in experts if (l := layer_of(e.get("layer"))) is not None})
    n = count_of(profile.get("num_experts"))
    if n is None:
        n = max((x + 1 for e in experts if (x := expert_of(e.get("expert"))) is not None), default=0)
    return layers, n


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def expert_matrix(profile: dict[str, Any], key: str) -> tuple[list[int], list[list[float | None]]]:
    """Per-layer x per-expert matrix of ``experts[*][key]`` (``None`` where absent). Returns (layers, matrix)."""
    layers, n = profile_layers(profile)
    row = {layer: i for i, layer in enumerate(layers)}
    mat: list[list[float | None]] = [[None] * n for _ in layers]
    for e in _list(profile.get("experts")):
        if not isinstance(e, dict):
            continue
        layer, ex = layer_of(e.get("layer")), expert_of(e.get("expert"))
        if layer in row and ex is not None and ex < n:
            mat[row[layer]][ex] = num(e.get(key))
    return layers, mat


def expert_flags(profile: dict[str, Any], key: str) -> set[tuple[int, int]]:
    """(row, column) cells of experts whose ``key`` is truthy; for ``super`` also the ``super_experts`` list."""
    layers, n = profile_layers(profile)
    row = {layer: i for i, layer in enumerate(layers)}
    cells = set()
    for e in _list(profile.get("experts")):
        if isinstance(e, dict) and e.get(key):
            layer, ex = layer_of(e.get("layer")), expert_of(e.get("expert"))
            if layer in row and ex is not None and ex < n:
                cells.add((row[layer], ex))
    if key == "super":
        for pair in _list(profile.get("super_experts")):
            if isinstance(pair, list) and len(pair) == 2:
                layer, ex = layer_of(pair[0]), expert_of(pair[1])
                if layer in row and ex is not None and ex < n:
                    cells.add((row[layer], ex))
    return cells


def domain_frequencies(profile: dict[str, Any]) -> dict[str, list[list[float | None]]]:
    """Per domain: routing frequency per layer x expert = counts / (top_k x domain tokens)."""
    domains = profile.get("domains")
    if not isinstance(domains, dict):
        return {}
    layers, n = profile_layers(profile)
    top_k = count_of(profile.get("top_k")) or 1
    out = {}
    for name, d in list(domains.items())[:64]:
        if not isinstance(d, dict) or not isinstance(d.get("counts"), list):
            continue
        tokens = num(d.get("tokens"))
        rows = []
        for counts in d["counts"][: max(len(layers), 1)]:
            if not isinstance(counts, list):
                continue
            counts = [c if num(c) is not None and c >= 0 else None for c in counts[: max(n, 1)]]
            total = tokens * top_k if tokens and tokens > 0 else sum(c for c in counts if c is not None)
            rows.append([(c / total if total and c is not None else None) for c in counts])
        out[str(name)] = rows
    return out


def int_key_dict(d: Any, limit: int = MAX_LAYERS) -> dict[int, Any] | None:
    """``{"3": x}`` -> ``{3: x}`` when every key is an integer string in [0, limit); else ``None``."""
    if not isinstance(d, dict) or not d:
        return None
    out = {}
    for k, v in d.items():
        i = index(int(k), limit) if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 12 else None
        if i is None:
            return None
        out[i] = v
    return out


def _indices(xs: Any) -> list[int] | None:
    """Sorted expert indices from a list, or ``None`` when any entry is not an index in range."""
    if not isinstance(xs, list) or len(xs) > MAX_EXPERTS:
        return None
    out = [expert_of(x) for x in xs]
    return None if any(x is None for x in out) else sorted(out)  # type: ignore[type-var]


# op -> the key of its layer entry that lists experts (prune: kept originals; atom: originals with >= 1 channel;
# merge: one cluster of originals per new expert)
LISTED = {"prune": "kept", "atom": "kept_experts", "merge": "clusters"}


def entry_experts(op: str, entry: Any) -> list[int] | list[list[int]] | None:
    """What a stage's layer entry lists (see ``LISTED``): sorted expert indices, or for ``merge`` the clusters;
    ``None`` when absent or when any index is out of range."""
    value = entry.get(LISTED[op]) if isinstance(entry, dict) else None
    if op != "merge":
        return _indices(value)
    if not isinstance(value, list) or not value or len(value) > MAX_EXPERTS:
        return None
    out = [_indices(c) for c in value]
    if any(c is None for c in out) or sum(len(c) for c in out) > MAX_EXPERTS:  # type: ignore[arg-type]
        return None
    return [[int(x) for x in c] for c in value]


def plan_widths(bit_plan: dict[str, Any] | None) -> dict[tuple[int, int], float]:
    """{(layer, expert): bits} from bit_plan.json's ``layers[l].experts`` records (``{"expert", "bits", ...}``)."""
    out: dict[tuple[int, int], float] = {}
    layers = int_key_dict(bit_plan.get("layers")) if isinstance(bit_plan, dict) else None
    for layer, entry in (layers or {}).items():
        records = entry.get("experts") if isinstance(entry, dict) else None
        for r in records[:MAX_EXPERTS] if isinstance(records, list) else []:
            ex = expert_of(r.get("expert")) if isinstance(r, dict) else None
            bits = num(r.get("bits")) if isinstance(r, dict) else None
            if ex is not None and bits is not None and 0 < bits <= 64:
                out[(layer, ex)] = bits
    return out


def perplexities(ev: dict[str, Any] | None) -> dict[str, float]:
    """Domain -> perplexity from an eval JSON (numbers only)."""
    ppl = (ev or {}).get("perplexity")
    if isinstance(ppl, dict):
        return {str(k): v for k, v in ppl.items() if num(v) is not None}
    if num(ppl) is not None:
        return {"all": ppl}
    return {}
