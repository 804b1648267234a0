"""Report section for one calibration profile: calibration facts and per-layer x per-expert heatmaps."""

from __future__ import annotations

from typing import Any

from moecompress.report.blocks import generic, kv_table, note, num_cell, table, text_cell
from moecompress.report.sidecars import (
    MAX_CELLS,
    domain_frequencies,
    expert_flags,
    expert_matrix,
    expert_of,
    layer_of,
    num,
    profile_layers,
    text,
)
from moecompress.report.svg import esc, fmt_num, heatmap

# (profile key, title, explanation)
HEATMAPS = [
    ("frequency", "Routing frequency", "Share of routed token slots each expert receives (a layer sums to 1)."),
    ("routing_mass", "Routing mass", "Mean router weight each expert receives over all calibration tokens."),
    ("reap", "REAP saliency", "Mean over routed tokens of router weight x ||expert output||: low = cheap to remove."),
    (
        "max_abs_out",
        "Max |down_proj output|",
        "Largest absolute value an expert writes into the residual stream; super experts stand out here.",
    ),
]
LOG_RATIO = 100.0


def _log_scale(mat: list[list[float | None]]) -> bool:
    vals = [v for row in mat for v in row if v is not None and v > 0]
    return bool(vals) and max(vals) / min(vals) > LOG_RATIO


def profile_section(profile: dict[str, Any], source: str, anchor: str) -> str:
    """HTML for one profile: calibration table, super-expert rule, heatmaps and per-domain routing."""
    layers, n_exp = profile_layers(profile)
    cal = profile.get("calibration") if isinstance(profile.get("calibration"), dict) else {}
    rows = [
        ("Profile file", text_cell(source)),
        ("Model", text_cell(profile.get("model"))),
        ("Family", text_cell(profile.get("family"))),
        ("MoE layers", num_cell(len(layers), "profile.moe_layers")),
        ("Routed experts per layer", num_cell(n_exp, "profile.num_experts")),
        ("Top-k", num_cell(profile.get("top_k"), "profile.top_k")),
        ("Calibration tokens", num_cell(profile.get("tokens"), "profile.tokens")),
        ("Calibration set", text_cell(cal.get("name"))),
        (
            "Samples x seq-len, seed",
            text_cell(
                f"{text(cal.get('samples')) or '?'} x {text(cal.get('seq_len')) or '?'}, seed {text(cal.get('seed'))}"
            ),
        ),
        ("Calibration fingerprint", f'<td class="mono">{esc(text(cal.get("fingerprint")) or "–")}</td>'),
        ("Model fingerprint", f'<td class="mono">{esc(text(profile.get("model_fingerprint")) or "–")}</td>'),
        ("Profile time (s)", num_cell(profile.get("elapsed_s"), "profile.elapsed_s")),
        ("Tool version", text_cell(profile.get("tool_version"))),
    ]
    parts = [kv_table(rows)]
    big = len(layers) * n_exp > MAX_CELLS
    supers = set() if big else expert_flags(profile, "super")
    low = set() if big else expert_flags(profile, "low_tokens")
    parts.append(_super_block(profile, layers, supers))
    if not layers or not n_exp:
        parts.append(note("This profile lists no MoE layers or experts, so there is nothing to draw."))
        return "".join(parts)
    if len(layers) * n_exp > MAX_CELLS:
        parts.append(
            note(f"{len(layers)} layers x {n_exp} experts is more than a chart can show ({MAX_CELLS:,} cells).")
        )
        return "".join(parts)
    maps = []
    for key, title, explain in HEATMAPS:
        _, mat = expert_matrix(profile, key)
        if all(v is None for row in mat for v in row):
            parts.append(note(f"{title}: not in this profile."))
            continue
        log = key == "max_abs_out" and _log_scale(mat)
        svg = heatmap(
            mat,
            row_names=layers,
            value_name=key,
            log=log,
            marks=supers,
            mark_label="super expert",
            dots=low,
            dot_label="too few calibration tokens",
            chart_id=f"{anchor}-{key}",
        )
        cap = f'<b>{esc(title)}</b><br><span class="note">{esc(explain)}</span>'
        maps.append(f"<figure><figcaption>{cap}</figcaption>{svg}</figure>")
    parts.append(f'<div class="grid">{"".join(maps)}</div>')
    parts.append(_domain_block(profile, layers, anchor))
    return "".join(parts)


def _super_block(profile: dict[str, Any], layers: list[int], supers: set[tuple[int, int]]) -> str:
    rule = profile.get("super_rule")
    out = ["<h3>Super experts</h3>"]
    if supers:
        _, max_out = expert_matrix(profile, "max_abs_out")
        experts = profile.get("experts") if isinstance(profile.get("experts"), list) else []
        by_cell = {(layer_of(e.get("layer")), expert_of(e.get("expert"))): e for e in experts if isinstance(e, dict)}
        rows = []
        for r, c in sorted(supers):
            e = by_cell.get((layers[r], c), {})
            rows.append(
                [
                    num_cell(layers[r], "super.layer"),
                    num_cell(c, "super.expert"),
                    num_cell(max_out[r][c], "super.max_abs_out"),
                    num_cell(e.get("max_abs_channel"), "super.channel"),
                ]
            )
        out.append(table(["layer", "expert", "max |down out|", "channel"], rows))
    else:
        out.append(note("No super experts found by the rule below."))
    if rule is not None:
        out.append(f"<details><summary>Detection rule and thresholds</summary>{generic(rule)}</details>")
    return "".join(out)


def _domain_block(profile: dict[str, Any], layers: list[int], anchor: str) -> str:
    freqs = domain_frequencies(profile)
    if not freqs:
        return note("Per-domain routing: the calibration set had no domains.")
    maps = []
    parts = [
        "<h3>Per-domain routing</h3>",
        note(
            "Routing frequency per domain on the same colour scale; experts that light up in one domain only "
            "are domain specialists."
        ),
    ]
    hi = max((v for m in freqs.values() for row in m for v in row if v is not None), default=1.0)
    domains = profile.get("domains") if isinstance(profile.get("domains"), dict) else {}
    for name, mat in freqs.items():
        d = domains.get(name) if isinstance(domains.get(name), dict) else {}
        size = (
            f"{fmt_num(num(d['tokens']))} tokens"
            if num(d.get("tokens")) is not None
            else (f"{fmt_num(num(d['windows']))} calibration windows" if num(d.get("windows")) is not None else "")
        )
        svg = heatmap(
            mat,
            row_names=layers[: len(mat)] if len(layers) >= len(mat) else list(range(len(mat))),
            value_name="frequency",
            vmin=0.0,
            vmax=hi,
            chart_id=f"{anchor}-domain-{name}",
        )
        maps.append(f'<figure class="domain"><figcaption><b>{esc(name)}</b> {esc(size)}</figcaption>{svg}</figure>')
    return "".join(parts) + f'<div class="grid">{"".join(maps)}</div>'
