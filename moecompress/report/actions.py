"""Report section "what was done" for one output folder: kept/removed experts, merge clusters, bit widths,
protected experts, and every other manifest field rendered generically."""

from __future__ import annotations

from typing import Any

from moecompress.report.blocks import generic, note, num_cell, table, text_cell
from moecompress.report.sidecars import (
    MAX_CELLS,
    clusters_of,
    count_of,
    expert_of,
    first,
    int_key_dict,
    kept_experts,
    layer_of,
    plan_widths,
    profile_layers,
)
from moecompress.report.svg import esc, fmt_num, heatmap

# Manifest keys shown elsewhere (summary / dedicated blocks); all others go to "other fields".
KNOWN_KEYS = {
    "tool", "tool_version", "command", "source_model", "source_fingerprint", "method", "ratio", "bits", "layers",
    "protected", "calibration_fingerprint", "params_before", "params_after", "bytes_before", "bytes_after",
    "elapsed_s", "seconds", "warnings", "model", "family", "protected_why",
}  # fmt: skip
STATE_COLORS = {"kept": "#55a868", "removed": "#d9d9d9"}
BIT_COLORS = {2: "#c44e52", 3: "#dd8452", 4: "#e8c547", 5: "#b5cf6b", 6: "#8fbc8f", 8: "#4c72b0", 16: "#8172b3"}


def protected_cells(manifest: dict[str, Any]) -> list[tuple[int, int, str]]:
    """(layer, expert, reason) of protected experts; accepts ``[[l, e], ...]``, ``[{layer, expert, reason}]`` or
    ``{layer: [experts]}``. Indices out of range are left out."""
    prot = manifest.get("protected")
    out: list[tuple[int, int, str]] = []
    if isinstance(prot, dict):
        for layer, experts in (int_key_dict(prot) or {}).items():
            for e in experts if isinstance(experts, list) else []:
                if (ex := expert_of(e)) is not None:
                    out.append((layer, ex, ""))
    for p in prot if isinstance(prot, list) else []:
        if isinstance(p, list) and len(p) >= 2:
            layer, ex, why = layer_of(p[0]), expert_of(p[1]), str(p[2]) if len(p) > 2 else ""
        elif isinstance(p, dict):
            layer, ex, why = (
                layer_of(p.get("layer")),
                expert_of(p.get("expert")),
                str(first(p.get("reason"), p.get("why"), "")),
            )
        else:
            continue
        if layer is not None and ex is not None:
            out.append((layer, ex, why))
    why_of = {}
    for w in manifest.get("protected_why") if isinstance(manifest.get("protected_why"), list) else []:
        if (
            isinstance(w, dict)
            and (l := layer_of(w.get("layer"))) is not None
            and (e := expert_of(w.get("expert"))) is not None
        ):
            why_of[(l, e)] = str(first(w.get("why"), w.get("reason"), ""))
    out = [(layer, e, r or why_of.get((layer, e), "")) for layer, e, r in out]
    return sorted(set(out))


def protected_modules(manifest: dict[str, Any]) -> list[tuple[Any, str, str]]:
    """(layer, module, why) of protected modules that are not routed experts (e.g. shared experts)."""
    why = manifest.get("protected_why")
    return [
        (w.get("layer"), str(w["module"]), str(first(w.get("why"), w.get("reason"), "")))
        for w in (why if isinstance(why, list) else [])
        if isinstance(w, dict) and w.get("module") is not None
    ]


def actions_section(
    manifest: dict[str, Any] | None, bit_plan: dict[str, Any] | None, profile: dict | None, anchor: str
) -> str:
    """HTML for what one command did to the model (empty string when there is no manifest and no plan)."""
    if manifest is None and bit_plan is None:
        return ""
    manifest = manifest or {}
    layers = int_key_dict(manifest.get("layers")) or {}
    n_before = _experts_before(manifest, layers, profile)
    prot = protected_cells(manifest)
    parts = []
    kept = {layer: k for layer, entry in layers.items() if (k := kept_experts(entry)) is not None}
    clusters = {layer: c for layer, entry in layers.items() if (c := clusters_of(entry)) is not None}
    widths = plan_widths(bit_plan) or plan_widths({"layers": manifest.get("layers")})
    mods = protected_modules(manifest)
    seen = [e for k in kept.values() for e in k] + [e for c in clusters.values() for m in c for e in m]
    n_wide = max([n_before] + [e + 1 for _, e in widths] + [e + 1 for e in seen])
    rows = len(set(kept) | set(clusters) | {layer for layer, _ in widths})
    if rows * n_wide > MAX_CELLS:
        parts.append(note(f"{rows} layers x {n_wide} experts is more than a chart can show ({MAX_CELLS:,} cells)."))
        kept, clusters, widths = {}, {}, {}
    if kept and not clusters:
        parts.append(_kept_block(kept, n_before, prot, anchor))
    if clusters:
        parts.append(_cluster_block(clusters, n_before, prot, anchor))
    if widths:
        parts.append(_bits_block(widths, n_before, prot, anchor))
    if bit_plan is not None:
        scalars = {k: v for k, v in bit_plan.items() if not isinstance(v, (dict, list))}
        if scalars:
            parts.append(f"<h3>Bit plan</h3>{generic(scalars)}")
    parts.append(_protected_block(prot, mods))
    other_layers = {k: v for k, v in layers.items() if k not in kept and k not in clusters}
    if other_layers and not widths:
        parts.append(f"<h3>Per-layer record</h3>{generic(other_layers)}")
    elif layers:
        parts.append(f"<details><summary>Per-layer record (raw)</summary>{generic(layers, 1)}</details>")
    other = {k: v for k, v in manifest.items() if k not in KNOWN_KEYS or (k == "command" and " " in str(v))}
    if other:
        parts.append(f"<details><summary>Other manifest fields ({len(other)})</summary>{generic(other)}</details>")
    return "".join(parts)


def _experts_before(manifest: dict[str, Any], layers: dict[int, Any], profile: dict | None) -> int:
    keys = ("num_experts_before", "experts_before", "num_experts")
    n = first(*(count_of(manifest.get(k)) for k in keys))
    if n is not None:
        return n
    if profile:
        _, n_prof = profile_layers(profile)
        if n_prof:
            return n_prof
    seen = [x for entry in layers.values() for x in (kept_experts(entry) or [])]
    seen += [x for entry in layers.values() for c in (clusters_of(entry) or []) for x in c]
    return max(seen, default=-1) + 1


def _kept_block(kept: dict[int, list[int]], n: int, prot, anchor: str) -> str:
    order = sorted(kept)
    n = max([n] + [e + 1 for k in kept.values() for e in k])
    keep = {layer: set(kept[layer]) for layer in order}
    mat = [["kept" if e in keep[layer] else "removed" for e in range(n)] for layer in order]
    marks = {(order.index(layer), e) for layer, e, _ in prot if layer in kept and e < n}
    svg = heatmap(mat, row_names=order, value_name="expert", palette=STATE_COLORS, fmt=str, marks=marks,
                  mark_label="protected", chart_id=f"{anchor}-kept")  # fmt: skip
    rows = [
        [num_cell(layer, "kept.layer"), num_cell(len(kept[layer]), f"kept.count.{layer}"),
         text_cell(", ".join(map(str, kept[layer]))),
         text_cell(", ".join(str(e) for e in range(n) if e not in keep[layer]))]
        for layer in order
    ]  # fmt: skip
    total = sum(len(k) for k in kept.values())
    return (
        f"<h3>Kept and removed experts</h3>"
        f"<p>{esc(total)} of {esc(n * len(order))} routed experts kept over {esc(len(order))} MoE layers.</p>"
        f"<figure>{svg}</figure>"
        f"<details><summary>Per-layer lists</summary>{table(['layer', 'kept', 'kept experts', 'removed'], rows)}"
        f"</details>"
    )


def _cluster_block(clusters: dict[int, list[list[int]]], n: int, prot, anchor: str) -> str:
    order = sorted(clusters)
    mat: list[list[float | None]] = []
    for layer in order:
        size = {x: len(c) for c in clusters[layer] for x in c}
        mat.append([size.get(e) for e in range(n)])
    marks = {(order.index(layer), e) for layer, e, _ in prot if layer in clusters and e < n}
    svg = heatmap(mat, row_names=order, value_name="cluster size", fmt=lambda v: fmt_num(int(v)), marks=marks,
                  mark_label="protected", chart_id=f"{anchor}-clusters")  # fmt: skip
    rows = []
    for layer in order:
        desc = "; ".join(f"{j} ← {{{', '.join(map(str, c))}}}" for j, c in enumerate(clusters[layer]) if len(c) > 1)
        rows.append([num_cell(layer, "clusters.layer"), num_cell(len(clusters[layer]), f"clusters.count.{layer}"),
                     text_cell(desc or "no merges")])  # fmt: skip
    return (
        "<h3>Merge clusters</h3>"
        + note(
            "Each cell is an original expert, coloured by the size of the cluster it was merged into "
            "(1 = kept as it was; grey = not in any cluster)."
        )
        + f"<figure>{svg}</figure>"
        + table(["layer", "experts after", "new expert ← merged old experts"], rows)
    )


def _bits_block(widths: dict[tuple[int, int], float], n: int, prot, anchor: str) -> str:
    order = sorted({layer for layer, _ in widths})
    n = max(n, max(e for _, e in widths) + 1)
    mat = [[widths.get((layer, e)) for e in range(n)] for layer in order]
    used = sorted({v for v in widths.values()})
    palette = {b: BIT_COLORS.get(int(b), "#999999") if float(b).is_integer() else "#999999" for b in used}
    marks = {(order.index(layer), e) for layer, e, _ in prot if layer in order and e < n}
    svg = heatmap(mat, row_names=order, value_name="bits", palette=palette, fmt=lambda v: f"{fmt_num(v)} bit",
                  marks=marks, mark_label="protected", chart_id=f"{anchor}-bits")  # fmt: skip
    mean = sum(widths.values()) / len(widths)
    return (
        f"<h3>Bit widths</h3><p>Mean width over {esc(len(widths))} routed experts: "
        f'<b data-key="bits.mean" data-value="{esc(repr(mean))}">{esc(fmt_num(mean))}</b> bits.</p>'
        f"<figure>{svg}</figure>"
    )


def _protected_block(prot: list[tuple[int, int, str]], mods: list[tuple[Any, str, str]]) -> str:
    if not prot and not mods:
        return "<h3>Protected experts</h3>" + note("None recorded.")
    rows = [[num_cell(layer, "protected.layer"), text_cell(f"expert {e}"), text_cell(why or "–")]
            for layer, e, why in prot]  # fmt: skip
    rows += [[num_cell(layer, "protected.layer"), text_cell(mod), text_cell(why or "–")] for layer, mod, why in mods]
    return "<h3>Protected experts and modules</h3>" + table(["layer", "expert / module", "why"], rows)
