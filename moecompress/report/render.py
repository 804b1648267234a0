"""Build the self-contained HTML report from sidecar files (never recomputes a statistic).

Python API::

    from moecompress.report import build_report, write_report
    html = build_report(["runs/profile", "out/pruned", "out/merged"])   # one HTML string
    write_report(Path("out/pruned"))                                      # -> out/pruned/report.html
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moecompress.core.errors import UserError
from moecompress.report.actions import actions_section
from moecompress.report.blocks import generic, note, num_cell, section, table, text_cell
from moecompress.report.profile_view import profile_section
from moecompress.report.sidecars import MAX_LIST, RunSidecars, first, load_run, num, perplexities, text
from moecompress.report.svg import esc, fmt_num, grouped_bars, pareto_scatter

REPORT_NAME = "report.html"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;background:#fafafa;
margin:0}
main{max-width:1240px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;border-bottom:2px solid #4c72b0;padding-bottom:3px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px}h3.stage{font-size:16px;border-top:1px solid #ddd;padding-top:10px}
h4{font-size:14px;margin:14px 0 4px}
.unreadable{border-left:4px solid #b42318;padding:2px 10px;background:#fff4f2}
nav{font-size:13px;margin:6px 0 10px}nav a{margin-right:12px;color:#4c72b0}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#f0f3f8}table.kv th{background:#f7f7f7;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}.mono{font-family:ui-monospace,Consolas,monospace;
font-size:12px;word-break:break-all}
figure{margin:10px 0 16px;overflow-x:auto}.grid{display:flex;flex-wrap:wrap;gap:0 28px}figcaption{margin-bottom:4px}
svg.chart{max-width:100%;height:auto}
.note{color:#666;font-size:13px}.warn li{margin:2px 0}.better{color:#1a7f37}.worse{color:#b42318}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.runname{font-weight:600}table.summary td{min-width:90px;max-width:260px;word-break:break-word}.scroll{overflow-x:auto}
"""


def human_bytes(x: Any) -> str:
    """1536 -> '1.54 kB' (decimal units)."""
    v = num(x)
    if v is None:
        return "–"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(v) < 1000 or unit == "TB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
        v /= 1000
    return str(x)


def _bytes_cell(x: Any, key: str) -> str:
    v = num(x)
    if v is None:
        return f'<td data-key="{esc(key)}">–</td>'
    return f'<td class="num" data-key="{esc(key)}" data-value="{esc(repr(v))}">{esc(human_bytes(v))}</td>'


def run_facts(run: RunSidecars) -> dict[str, Any]:
    """The summary numbers of one run: the manifest's common fields and stages, else the profile and eval."""
    m, p, ev, base = run.manifest, run.profile or {}, run.eval or {}, run.eval_base or {}
    stages = m.stages if m is not None else []
    cal = p.get("calibration") if isinstance(p.get("calibration"), dict) else {}
    mcal = (m.calibration if m is not None else None) or {}
    return {
        "model": text(first((m.source_model or None) if m else None, p.get("model"), ev.get("model"))),
        "family": text(p.get("family")),
        "command": first(
            text(m.command) if m is not None else None, "profile" if run.profile else None, "eval" if run.eval else None
        ),  # fmt: skip
        "method": " + ".join(t for st in stages if (t := text(st.get("method")))) or None,
        "setting": " → ".join(s for st in stages if (s := _setting(st))) or None,
        "params_before": first(num(m.params_before) if m else None, num(base.get("params"))),
        "params_after": first(num(m.params_after) if m else None, num(ev.get("params"))),
        "bytes_before": first(num(m.bytes_before) if m else None, num(base.get("bytes"))),
        "bytes_after": first(num(m.bytes_after) if m else None, num(ev.get("bytes"))),
        "kl_to_base": num(ev.get("kl_to_base")),
        "top1_agreement": num(ev.get("top1_agreement")),
        "elapsed_s": num(m.elapsed_s) if m is not None else None,
        "profile_elapsed_s": num(p.get("elapsed_s")),
        "tool_version": text(first(run.tool_version, p.get("tool_version"))),
        "calibration_fingerprint": text(
            first(
                *(st.get("calibration_fingerprint") for st in stages),
                mcal.get("fingerprint"),
                cal.get("fingerprint"),
            )
        ),  # fmt: skip
        "source_fingerprint": text(first((m.source_fingerprint or None) if m else None, p.get("model_fingerprint"))),
    }


def _setting(stage: dict[str, Any]) -> str | None:
    """ "ratio 0.25" for a prune/atom/merge stage, "3 bits" for a quantize stage."""
    if stage["op"] == "quantize":
        bits = text(stage.get("bits"))
        return f"{bits} bits" if bits is not None else None
    ratio = text(stage.get("ratio"))
    return f"ratio {ratio}" if ratio is not None else None


def _change(before: Any, after: Any, key: str, fmt=fmt_num, as_bytes: bool = False) -> str:
    b, a = num(before), num(after)
    show = human_bytes if as_bytes else fmt
    if b is None and a is None:
        return f'<td data-key="{esc(key)}">–</td>'
    text = f"{show(b)} → {show(a) if a is not None else '–'}" if b is not None else show(a)
    if b and a is not None:
        text += f" ({(a - b) / b * 100:+.1f}%)"
    vals = f' data-before="{esc(repr(b))}" data-after="{esc(repr(a))}"'
    return f'<td data-key="{esc(key)}"{vals}>{esc(text)}</td>'


def _summary(runs: list[RunSidecars]) -> str:
    """One table, one column per run: what was run and what it cost and saved."""
    facts = [run_facts(r) for r in runs]
    rows: list[tuple[str, list[str]]] = [
        ("Folder", [f'<td class="mono">{esc(r.shown_path or r.path)}</td>' for r in runs]),
        ("Model", [text_cell(f["model"]) for f in facts]),
        ("Family", [text_cell(f["family"]) for f in facts]),
        (
            "Command / method",
            [text_cell(" / ".join(str(x) for x in (f["command"], f["method"]) if x) or None) for f in facts],
        ),  # fmt: skip
        ("Ratio / bits", [text_cell(f["setting"]) for f in facts]),
        ("Parameters", [_change(f["params_before"], f["params_after"], f"run{i}.params") for i, f in enumerate(facts)]),
        (
            "Bytes on disk",
            [_change(f["bytes_before"], f["bytes_after"], f"run{i}.bytes", as_bytes=True) for i, f in enumerate(facts)],
        ),  # fmt: skip
        ("KL(base ‖ model)", [num_cell(f["kl_to_base"], f"run{i}.kl_to_base") for i, f in enumerate(facts)]),
        ("Top-1 agreement", [num_cell(f["top1_agreement"], f"run{i}.top1_agreement") for i, f in enumerate(facts)]),
        (
            "Perplexity (all)",
            [num_cell(perplexities(r.eval).get("all"), f"run{i}.ppl_all") for i, r in enumerate(runs)],
        ),  # fmt: skip
        ("Run time (s)", [num_cell(f["elapsed_s"], f"run{i}.elapsed_s") for i, f in enumerate(facts)]),
        (
            "Profile time (s)",
            [num_cell(f["profile_elapsed_s"], f"run{i}.profile_elapsed_s") for i, f in enumerate(facts)],
        ),  # fmt: skip
        ("Tool version", [text_cell(f["tool_version"]) for f in facts]),
        (
            "Calibration fingerprint",
            [_fingerprint(f["calibration_fingerprint"]) for f in facts],
        ),  # fmt: skip
        (
            "Source model fingerprint",
            [_fingerprint(f["source_fingerprint"]) for f in facts],
        ),  # fmt: skip
    ]
    head = "<th></th>" + "".join(f'<th class="runname">{esc(r.name)}</th>' for r in runs)
    body = "".join(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>" for label, cells in rows)
    page = f'<div class="scroll"><table class="kv summary"><thead><tr>{head}</tr></thead>'
    page += f"<tbody>{body}</tbody></table></div>"
    if all(f["kl_to_base"] is None for f in facts):
        page += note("KL and top-1 agreement come from `moecompress eval OUT --base MODEL --json OUT/eval.json`.")
    return page


def _fingerprint(value: Any) -> str:
    """A table cell with the first 16 characters of a fingerprint; the full value is in the tooltip."""
    if not value:
        return "<td>–</td>"
    text = str(value)
    short = text if len(text) <= 16 else text[:16] + "…"
    return f'<td class="mono" title="{esc(text)}">{esc(short)}</td>'


def _base_ppl(runs: list[RunSidecars]) -> dict[str, float] | None:
    """Perplexities of the uncompressed model: an ``eval_base.json``, or the eval of a folder whose ``model`` is a
    compressed run's ``source_model`` (e.g. the profile run's eval of the base model)."""
    for run in runs:
        if run.eval_base is not None and perplexities(run.eval_base):
            return perplexities(run.eval_base)
    sources = {r.manifest.source_model for r in runs if r.manifest is not None and r.manifest.source_model}
    for run in runs:
        if run.manifest is None and run.eval is not None and str(run.eval.get("model")) in sources:
            return perplexities(run.eval)
    return None


def _ppl_cell(value: float | None, base: float | None, key: str) -> str:
    cell = num_cell(value, key)
    if value is None or not base:
        return cell
    change = (value - base) / base * 100
    cls = "worse" if change > 0.05 else ("better" if change < -0.05 else "note")
    return cell.replace("</td>", f' <span class="{cls}">({change:+.1f}%)</span></td>')


def _quality(runs: list[RunSidecars]) -> str:
    series: dict[str, dict[str, float]] = {}
    is_base: set[str] = set()
    seen_base: set[str] = set()
    for run in runs:
        if run.eval_base is not None:
            key = json.dumps(perplexities(run.eval_base), sort_keys=True)
            if key not in seen_base:
                seen_base.add(key)
                name = f"base ({run.name})" if len(runs) > 1 else "base model"
                series[name] = perplexities(run.eval_base)
                is_base.add(name)
        if run.eval is not None:
            series[run.name] = perplexities(run.eval)
    if not series:
        return note("No evaluation found (run `moecompress eval --json OUT/eval.json`, with `--base` for KL).")
    base = _base_ppl(runs)
    series = {(f"{n} (base model)" if s == base and n not in is_base else n): s for n, s in series.items()}
    domains = list(dict.fromkeys(d for s in series.values() for d in s))
    if "all" in domains:
        domains = [d for d in domains if d != "all"] + ["all"]
    rows = []
    for name, s in series.items():
        ref = None if name in is_base or s == base else base
        rows.append([text_cell(name)] + [_ppl_cell(s.get(d), (ref or {}).get(d), f"ppl.{name}.{d}") for d in domains])
    svg = grouped_bars(domains, {n: [s.get(d) for d in domains] for n, s in series.items()}, value_name="perplexity",
                       chart_id="perplexity")  # fmt: skip
    text = "Held-out perplexity per domain (lower is better)" + (
        ", change vs the base model in brackets" if base else ""
    )
    return f'<h3>{esc(text)}</h3><div class="scroll">{table(["", *domains], rows)}</div><figure>{svg}</figure>'


def _plottable(v: Any, most: float) -> bool:
    """A number the chart can place: finite, 0..most (sidecars are untrusted: 1e308 bytes is not a size)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= most


def _pareto(runs: list[RunSidecars]) -> tuple[str, list[str]]:
    points, skipped, base_bytes = [], [], None
    for run in runs:
        f = run_facts(run)
        base_bytes = base_bytes if base_bytes is not None else f["bytes_before"]
        if _plottable(f["bytes_after"], 1e18) and _plottable(f["kl_to_base"], 1e9):
            points.append((float(f["bytes_after"]), float(f["kl_to_base"]), run.name))
        elif run.manifest is not None:
            skipped.append(run.name)
    reference = None
    if _plottable(base_bytes, 1e18) and points:
        points.insert(0, (float(base_bytes), 0.0, "base model"))
        reference = 0
    if len(points) < 2:
        return "", skipped
    svg = pareto_scatter(points, x_name="bytes on disk", y_name="KL(base ‖ model)", fmt_x=human_bytes,
                         reference=reference, chart_id="pareto")  # fmt: skip
    text = "Lower-left is better; the dashed line joins the runs no other run beats on both bytes and KL."
    if skipped:
        text += f" Left out (no bytes or no KL to base): {', '.join(skipped)}."
    return note(text) + f"<figure>{svg}</figure>", skipped


def _warnings(runs: list[RunSidecars]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    seen_profiles: set[str] = set()
    fps = {f for r in runs if (f := run_facts(r)["source_fingerprint"])}
    if len(fps) > 1:
        out.append(("report", f"the runs come from {len(fps)} different source models; compare with care"))
    for run in runs:
        if run.empty:
            out.append((run.name, "no sidecar files found in this folder"))
        out += [(run.name, p) for p in run.problems]
        prof_key = str(run.profile_path.resolve()) if run.profile_path else f"run{id(run)}"
        docs = [("bit plan", run.bit_plan), ("eval", run.eval)]
        if prof_key not in seen_profiles:  # a profile shared by several runs is reported once
            seen_profiles.add(prof_key)
            docs.insert(0, ("profile", run.profile))
            out += _low_token_warning(run)
        if run.manifest is not None:
            out += _capped(f"{run.name} (manifest)", run.manifest.warnings)
        for label, doc in docs:
            ws = (doc or {}).get("warnings")
            out += _capped(f"{run.name} ({label})", ws if isinstance(ws, list) else ([ws] if ws else []))
        plan = run.bit_plan or {}
        few = plan.get("few_token_experts")
        if isinstance(few, list) and few:
            cells = ", ".join(f"L{x[0]}/E{x[1]}" if isinstance(x, list) and len(x) == 2 else str(x) for x in few[:60])
            rule = plan.get("few_token_rule") or "too few routed calibration tokens"
            more = f" and {len(few) - 60} more" if len(few) > 60 else ""
            out.append((f"{run.name} (bit plan)", f"{len(few)} experts fell back ({rule}): {cells}{more}"))
    return out


def _capped(source: str, items: list[Any]) -> list[tuple[str, Any]]:
    """At most MAX_LIST warnings from one source, then one line saying how many more there are."""
    out: list[tuple[str, Any]] = [(source, w) for w in items[:MAX_LIST]]
    if len(items) > MAX_LIST:
        out.append((source, f"... and {len(items) - MAX_LIST:,} more"))
    return out


def _low_token_warning(run: RunSidecars) -> list[tuple[str, Any]]:
    """One line listing the profile's low-token experts, unless the profile's own warnings already name them."""
    prof = run.profile or {}
    experts = prof.get("experts") if isinstance(prof.get("experts"), list) else []
    low = [e for e in experts if isinstance(e, dict) and e.get("low_tokens")]
    own = prof.get("warnings") if isinstance(prof.get("warnings"), list) else []
    if not low or sum("token" in str(w) for w in own) >= len(low):
        return []
    listing = ", ".join(
        f"L{e.get('layer')}/E{e.get('expert')} ({fmt_num(num(e.get('tokens')))} tokens)" for e in low[:60]
    )
    more = f" and {len(low) - 60} more" if len(low) > 60 else ""
    return [(f"{run.name} (profile)", f"{len(low)} experts with too few calibration tokens: {listing}{more}")]


def build_report(paths: Sequence[str | Path], title: str | None = None, names: Sequence[str] | None = None) -> str:
    """Render one self-contained HTML page (no scripts, no network) from the sidecars of ``paths``.

    Each path is a run folder (``profile -o``), an output folder (``prune``/``merge``/``quantize -o``) or a single
    sidecar JSON file. Several paths give a comparison table and a bytes-vs-KL Pareto plot. ``names`` overrides
    the displayed run names (default: folder names). A profile-only folder whose profile another folder already
    uses (e.g. the run given to ``prune --profile``) is not shown twice.
    """
    if not paths:
        raise UserError("give at least one run or output folder to report on")
    runs = [load_run(p) for p in paths]
    for run, name in zip(runs, names or [], strict=False):
        run.name = name
    runs = _drop_redundant_profiles(runs)
    for i, run in enumerate(runs):  # unique names for tables, charts and anchors
        if sum(r.name == run.name for r in runs[:i]) > 0:
            run.name = f"{run.name} #{i + 1}"
    facts = [run_facts(r) for r in runs]
    model = next((f["model"] for f in facts if f["model"]), "unknown model")
    sections: list[tuple[str, str, str]] = []
    sections.append(("summary", "Summary", _summary(runs)))
    sections.append(("quality", "Quality", _quality(runs)))
    pareto, _ = _pareto(runs)
    if pareto:
        sections.append(("pareto", "Bytes vs KL (Pareto)", pareto))
    seen_profiles: set[str] = set()
    for i, run in enumerate(runs):
        if run.profile is None:
            continue
        key = str(run.profile_path.resolve()) if run.profile_path else f"run{i}"
        if key in seen_profiles:
            continue
        seen_profiles.add(key)
        sections.append((f"profile{i}", f"Profile: {run.name}", profile_section(run.profile, str(run.profile_path),
                                                                                 f"profile{i}")))  # fmt: skip
    for i, run in enumerate(runs):
        body = actions_section(run.manifest, run.manifest_error, run.bit_plan, run.profile, f"run{i}", run.eval)
        if body:
            sections.append((f"done{i}", f"What was done: {run.name}", body))
    warns = _warnings(runs)
    wbody = (
        '<ul class="warn">' + "".join(f"<li><b>{esc(src)}</b>: {generic(w)}</li>" for src, w in warns) + "</ul>"
        if warns
        else note("No warnings.")
    )
    sections.append(("warnings", f"Warnings ({len(warns)})", wbody))
    heading = title or f"moecompress report — {model}"
    toc = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(heading)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{esc(heading)}</h1><p class="note">Generated {esc(stamp)} from {esc(len(runs))} folder(s); '
        f"every number comes from the sidecar files listed in each section.</p><nav>{toc}</nav>{body}"
        "</main></body></html>"
    )


def _drop_redundant_profiles(runs: list[RunSidecars]) -> list[RunSidecars]:
    def key(r: RunSidecars) -> str | None:
        return str(r.profile_path.resolve()) if r.profile_path is not None else None

    def profile_only(r: RunSidecars) -> bool:
        return r.profile is not None and not any((r.manifest, r.manifest_error, r.bit_plan, r.eval, r.eval_base))

    used = {key(r) for r in runs if not profile_only(r)}
    kept = [r for r in runs if not (profile_only(r) and key(r) in used)]
    return kept or runs


def write_report(folder: Path, extra: Sequence[Path] = (), name: str | None = None) -> Path:
    """Write ``folder/report.html`` from the sidecars in ``folder`` (plus ``extra`` folders, e.g. the profile run)
    atomically, and return its path. Commands call this at the end of every run that writes an output folder.
    ``name`` is the run name shown in the page (default: the folder name; pass the final name when ``folder`` is a
    temporary folder that is renamed afterwards)."""
    folder = Path(folder)
    page = build_report([folder, *extra], names=[name] if name else None)
    target = folder / REPORT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
