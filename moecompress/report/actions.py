"""Report section "what was done" for one output folder: the output's common facts, then one block per stage of
its manifest, in order (prune: kept/removed experts; atom: channels kept per expert; merge: clusters; quantize:
bit widths from bit_plan.json), each with its settings, protected experts and the rest of its section."""

from __future__ import annotations

from typing import Any

from moecompress.core.manifest import Manifest
from moecompress.report.blocks import generic, kv_table, note, num_cell, table, text_cell
from moecompress.report.sidecars import (
    LISTED,
    MAX_CELLS,
    MAX_EXPERTS,
    count_of,
    entry_experts,
    expert_of,
    int_key_dict,
    layer_of,
    num,
    plan_widths,
    profile_layers,
)
from moecompress.report.svg import esc, fmt_num, heatmap

TITLES = {
    "profile": "profile",
    "prune": "expert pruning",
    "atom": "channel (atomic) pruning",
    "merge": "expert merging",
    "quantize": "quantization",
    "budget": "byte-budget plan",
}
# The fields of each op's section shown in its settings table, in this order (what the op writes today; "recipe":
# the stage's options as `compress` was given them); every other field of the section is under "other fields".
SETTINGS: dict[str, tuple[str, ...]] = {
    "profile": ("recipe",),
    "prune": ("recipe", "method", "ratio", "granularity", "experts_before", "experts_after", "experts_removed_total",
              "refit", "top_k", "n_group", "output_error_inputs", "refit_inputs", "profile"),
    "atom": ("recipe", "method", "score", "ratio", "original_width", "width", "width_key",
             "routed_channels_removed_fraction", "params_removed", "params_removed_fraction_of_all", "protection",
             "hessian", "compensation"),
    "merge": ("recipe", "method", "ratio", "experts_before", "experts_after", "similarity", "router_rebuild",
              "neuron_alignment", "down_refit", "choice", "propagation", "profile"),
    "quantize": ("recipe", "method", "plan", "bits", "budget_gb", "other_bits", "format", "servable",
                 "bytes_predicted", "command_line"),
    "budget": ("layout", "budget_rule", "budget_bytes", "total_bytes", "written_tensor_bytes", "fixed_bytes",
               "routed_bytes", "predicted_cost", "cost_unit", "other_bits", "counts", "solver", "bytes_counted"),
}  # fmt: skip
# drawn by the stage block itself (or in the summary)
DRAWN = {"op", "layers", "protected", "protected_why", "calibration_fingerprint"}
STATE_COLORS = {"kept": "#55a868", "removed": "#d9d9d9"}
BIT_COLORS = {2: "#c44e52", 3: "#dd8452", 4: "#e8c547", 5: "#b5cf6b", 6: "#8fbc8f", 8: "#4c72b0", 16: "#8172b3"}


def protected_cells(stage: dict[str, Any]) -> list[tuple[int, int, str]]:
    """(layer, expert, why) of a stage's ``protected`` [[layer, expert], ...], the reason from its
    ``protected_why`` [{layer, expert, why}]. Indices out of range are left out."""
    why_of: dict[tuple[int, int], str] = {}
    for w in _list(stage.get("protected_why")):
        if isinstance(w, dict) and (l := layer_of(w.get("layer"))) is not None:
            if (e := expert_of(w.get("expert"))) is not None:
                why_of[(l, e)] = str(w.get("why") or "")
    out = set()
    for p in _list(stage.get("protected")):
        if isinstance(p, list) and len(p) == 2 and (l := layer_of(p[0])) is not None:
            if (e := expert_of(p[1])) is not None:
                out.add((l, e, why_of.get((l, e), "")))
    return sorted(out)


def protected_modules(stage: dict[str, Any]) -> list[tuple[Any, str, str]]:
    """(layer, module, why) of protected modules that are not routed experts (e.g. shared experts)."""
    return [
        (w.get("layer"), str(w["module"]), str(w.get("why") or ""))
        for w in _list(stage.get("protected_why"))
        if isinstance(w, dict) and w.get("module") is not None
    ]


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def actions_section(
    manifest: Manifest | None,
    manifest_error: str | None,
    bit_plan: dict[str, Any] | None,
    profile: dict | None,
    anchor: str,
    evaluation: dict | None = None,
) -> str:
    """HTML for what one command did to the model (empty string when there is no manifest and no plan);
    ``evaluation`` (the folder's eval.json) puts the measured KL beside a budget plan's predicted one."""
    parts = []
    if manifest_error is not None:
        parts.append(
            '<div class="unreadable"><h3>Unreadable manifest</h3>'
            + note(f"moecompress.json is not a manifest this moecompress reads, so nothing of it is shown: "
                   f"{manifest_error}")
            + "</div>"
        )  # fmt: skip
    if manifest is None:
        if bit_plan is not None:  # quantize --plan-only: the plan alone
            parts.append(_quantize_block({}, bit_plan, 0, f"{anchor}-plan"))
        return "".join(parts)
    ops = [st["op"] for st in manifest.stages]
    facts = [("command", text_cell(manifest.command)), ("stages", text_cell(" → ".join(ops) or "none")),
             ("layout", text_cell(manifest.layout)), ("load with", text_cell(manifest.load_with))]  # fmt: skip
    if manifest.calibration:
        facts.append(("calibration", f"<td>{generic(manifest.calibration, 1)}</td>"))
    parts.append(kv_table(facts))
    if len(ops) > 1:
        parts.append(note(f"{len(ops)} stages in one layer-streamed pass, in this order: each stage works on the "
                          "layer as the stages before it left it."))  # fmt: skip
    n = _experts_in(manifest, profile)
    renumbered = False
    for i, st in enumerate(manifest.stages):
        n_in = count_of(st.get("experts_before")) or n
        parts.append(_stage_block(st, i, len(ops), n_in, bit_plan, f"{anchor}-s{i}", renumbered, evaluation))
        n = count_of(st.get("experts_after")) or n_in
        renumbered = renumbered or n != n_in
    return "".join(parts)


def _experts_in(manifest: Manifest, profile: dict | None) -> int:
    """Routed experts per layer before the first stage: the stage's own count, else the profile's, else 0 (each
    chart then widens to the largest index it is given)."""
    if manifest.stages and (n := count_of(manifest.stages[0].get("experts_before"))) is not None:
        return n
    return profile_layers(profile)[1] if profile else 0


def _stage_block(
    st: dict[str, Any], i: int, n_stages: int, n: int, bit_plan: dict | None, anchor: str, renumbered: bool,
    evaluation: dict | None = None,
) -> str:  # fmt: skip
    op = st["op"]
    head = f"Stage {i + 1} of {n_stages}: {op} ({TITLES[op]})" if n_stages > 1 else f"{op} ({TITLES[op]})"
    settings = [(k, f"<td>{generic(st[k], 1)}</td>") for k in SETTINGS[op] if k in st]
    parts = [f'<h3 class="stage" data-op="{esc(op)}" id="{esc(anchor)}">{esc(head)}</h3>']
    if renumbered:
        parts.append(note(f"Experts are numbered as the earlier stages left them ({n} per layer)."))
    if settings:
        parts.append(kv_table(settings))
    layers = int_key_dict(st.get("layers")) or {}
    if op == "quantize":
        parts.append(_quantize_block(st, bit_plan, n, anchor))
    elif op == "budget":
        parts.append(_budget_block(st, layers, count_of(st.get("source_experts")) or n, anchor, evaluation))
    elif op in LISTED:
        listed = {l: v for l, e in layers.items() if (v := entry_experts(op, e)) is not None}
        n = max([n] + [x + 1 for v in listed.values() for x in _flat(v)])
        if len(listed) * n > MAX_CELLS:
            parts.append(note(f"{len(listed)} layers x {n} experts is more than a chart can show ({MAX_CELLS:,})."))
        elif listed and op == "prune":
            parts.append(_kept_block(listed, n, protected_cells(st), anchor))  # type: ignore[arg-type]
        elif listed and op == "merge":
            parts.append(_cluster_block(listed, n, protected_cells(st), anchor))  # type: ignore[arg-type]
        elif listed:
            parts.append(_widths_block(listed, layers, n, protected_cells(st), anchor))  # type: ignore[arg-type]
    parts.append(_protected_block(protected_cells(st), protected_modules(st)))
    if layers:
        parts.append(f"<details><summary>Per-layer record (raw)</summary>{generic(layers, 1)}</details>")
    other = {k: v for k, v in st.items() if k not in DRAWN and k not in SETTINGS[op]}
    if other:
        parts.append(f"<details><summary>Other fields of this stage ({len(other)})</summary>{generic(other)}</details>")
    return "".join(parts)


def _flat(v: list) -> list[int]:
    return [x for c in v for x in (c if isinstance(c, list) else [c])]


def _quantize_block(st: dict[str, Any], bit_plan: dict | None, n: int, anchor: str) -> str:
    """Per-expert widths of bit_plan.json; without one, of the section's layers that hold a single width (the
    section holds each layer's set of widths: one width means every routed expert of the layer has it)."""
    widths = plan_widths(bit_plan) if bit_plan is not None else _layer_widths(st, n)
    if not widths and bit_plan is None:
        return note("No bit_plan.json in this folder: per-expert widths are not shown.")
    parts = []
    rows = len({layer for layer, _ in widths})
    n = max([n] + [e + 1 for _, e in widths])
    if rows * n > MAX_CELLS:
        parts.append(note(f"{rows} layers x {n} experts is more than a chart can show ({MAX_CELLS:,} cells)."))
    elif widths:
        parts.append(_bits_block(widths, n, protected_cells(st), anchor))
    scalars = {k: v for k, v in (bit_plan or {}).items() if not isinstance(v, (dict, list))}
    if scalars:
        parts.append(f"<h4>Bit plan</h4>{generic(scalars)}")
    return "".join(parts)


def _layer_widths(st: dict[str, Any], n: int) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for layer, entry in (int_key_dict(st.get("layers")) or {}).items():
        bits = entry.get("bits") if isinstance(entry, dict) else None
        b = num(bits[0]) if isinstance(bits, list) and len(bits) == 1 else None
        if b is not None and 0 < b <= 64 and 0 < n <= MAX_EXPERTS:
            out.update({(layer, e): b for e in range(n)})
    return out


def _kept_block(kept: dict[int, list[int]], n: int, prot, anchor: str) -> str:
    order = sorted(kept)
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
        f"<h4>Kept and removed experts</h4>"
        f"<p>{esc(total)} of {esc(n * len(order))} routed experts kept over {esc(len(order))} MoE layers.</p>"
        f"<figure>{svg}</figure>"
        f"<details><summary>Per-layer lists</summary>{table(['layer', 'kept', 'kept experts', 'removed'], rows)}"
        f"</details>"
    )


def _widths_block(kept: dict[int, list[int]], layers: dict[int, Any], n: int, prot, anchor: str) -> str:
    """Atomic pruning: channels kept in each original expert (``kept_experts[i]`` keeps ``widths[i]``)."""
    order = sorted(kept)
    mat: list[list[float | None]] = []
    for layer in order:
        widths = _list(layers[layer].get("widths"))
        row: list[float | None] = [None] * n
        for e, w in zip(layers[layer].get("kept_experts"), widths, strict=False):
            v = count_of(w, 2**20)
            row[int(e)] = v
        mat.append(row)
    marks = {(order.index(layer), e) for layer, e, _ in prot if layer in kept and e < n}
    svg = heatmap(mat, row_names=order, value_name="channels kept", fmt=lambda v: fmt_num(int(v)), marks=marks,
                  mark_label="protected", chart_id=f"{anchor}-widths")  # fmt: skip
    kept_n = sum(v for r in mat for v in r if v is not None)
    return (
        "<h4>Channels kept per expert</h4>"
        + note(
            "Each cell is an original expert, coloured by how many of its channels were kept "
            "(grey: the expert was removed from routing)."
        )  # fmt: skip
        + f'<p><b data-key="{esc(anchor)}.channels_kept" data-value="{esc(kept_n)}">{esc(f"{kept_n:,}")}</b> '
        f"channels kept over {esc(len(order))} MoE layers.</p><figure>{svg}</figure>"
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
        "<h4>Merge clusters</h4>"
        + note(
            "Each cell is an original expert, coloured by the size of the cluster it was merged into "
            "(1 = kept as it was; grey = not in any cluster)."
        )
        + f"<figure>{svg}</figure>"
        + table(["layer", "experts after", "new expert ← merged old experts"], rows)
    )


def _bits_block(widths: dict[tuple[int, int], float], n: int, prot, anchor: str) -> str:
    order = sorted({layer for layer, _ in widths})
    mat = [[widths.get((layer, e)) for e in range(n)] for layer in order]
    used = sorted({v for v in widths.values()})
    palette = {b: BIT_COLORS.get(int(b), "#999999") if float(b).is_integer() else "#999999" for b in used}
    marks = {(order.index(layer), e) for layer, e, _ in prot if layer in order and e < n}
    svg = heatmap(mat, row_names=order, value_name="bits", palette=palette, fmt=lambda v: f"{fmt_num(v)} bit",
                  marks=marks, mark_label="protected", chart_id=f"{anchor}-bits")  # fmt: skip
    mean = sum(widths.values()) / len(widths)
    return (
        f"<h4>Bit widths</h4><p>Mean width over {esc(len(widths))} routed experts: "
        f'<b data-key="bits.mean" data-value="{esc(repr(mean))}">{esc(fmt_num(mean))}</b> bits.</p>'
        f"<figure>{svg}</figure>"
    )


def _budget_block(
    st: dict[str, Any], layers: dict[int, Any], n: int, anchor: str, evaluation: dict | None = None
) -> str:
    """The plan of a byte budget: per layer and source expert, its bits and the share of its channels it kept
    (grey: removed), and the plan's predicted cost next to its bytes."""
    order = sorted(layers)
    width = num(st.get("source_width"))
    bits_of: dict[tuple[int, int], float] = {}
    frac: list[list[float | None]] = []
    for layer in order:
        entry = layers[layer] if isinstance(layers[layer], dict) else {}
        row: list[float | None] = [None] * n
        for e, w, b in zip(_list(entry.get("kept_experts")), _list(entry.get("widths")), _list(entry.get("bits")),
                           strict=False):  # fmt: skip
            e, w, b = expert_of(e), num(w), num(b)
            if e is None or e >= n or w is None or b is None:
                continue
            bits_of[(layer, e)] = b
            row[e] = w / width if width else None
        frac.append(row)
    if not order or len(order) * n > MAX_CELLS:
        return note("No per-layer plan to draw.") if not order else note(f"{len(order)} x {n} cells: too many to draw.")
    used = sorted(set(bits_of.values()))
    palette = {b: BIT_COLORS.get(int(b), "#999999") for b in used}
    bits_mat = [[bits_of.get((layer, e)) for e in range(n)] for layer in order]
    svg_b = heatmap(bits_mat, row_names=order, value_name="bits", palette=palette, fmt=lambda v: f"{fmt_num(v)} bit",
                    chart_id=f"{anchor}-budget-bits")  # fmt: skip
    svg_w = heatmap(frac, row_names=order, value_name="channels kept", vmin=0.0, vmax=1.0,
                    fmt=lambda v: f"{v:.0%}", chart_id=f"{anchor}-budget-widths")  # fmt: skip
    kept = len(bits_of)
    pred, total = num(st.get("predicted_cost")), num(st.get("total_bytes"))
    kl = num((evaluation or {}).get("kl_to_base"))
    measured = (
        f'Measured KL (eval.json): <b data-key="budget.measured_kl" data-value="{esc(kl)}">{esc(fmt_num(kl))}</b>.'
        if kl is not None
        else "Measured KL: `moecompress eval OUT --base SOURCE --json OUT/eval.json`, then `moecompress report OUT`."
    )
    return (
        "<h4>What each expert got</h4>"
        + note(
            "Each cell is an original expert: its bit width (left) and the share of its channels it kept "
            "(right); empty: removed. One integer program chose them together for the byte budget."
        )  # fmt: skip
        + f'<p><b data-key="budget.kept" data-value="{esc(kept)}">{esc(kept)}</b> of {esc(n * len(order))} routed '
        f"experts kept; predicted cost {esc(fmt_num(pred))} (predicted KL to the source model) for "
        f"{esc(fmt_num(total))} bytes. {measured}{_check_note(st.get('check'))}</p>"
        f"<figure>{svg_b}</figure><figure>{svg_w}</figure>"
    )


def _check_note(chk: Any) -> str:
    """The quantize-only guard's calibration-window KL of both plans and which one was written (budget/check.py)."""
    if not isinstance(chk, dict) or chk.get("chosen") not in ("joint", "bits_only"):
        return ""
    j, q = num(chk.get("joint_kl")), num(chk.get("bits_only_kl"))
    which = "the joint plan" if chk["chosen"] == "joint" else "the quantize-only plan (no removal, no cuts)"
    key = f'data-key="budget.written" data-value="{esc(chk["chosen"])}"'
    return (f" KL on the calibration windows: joint plan {esc(fmt_num(j))}, quantize-only plan {esc(fmt_num(q))}; "
            f"<b {key}>{esc(which)}</b> was written.")  # fmt: skip


def _protected_block(prot: list[tuple[int, int, str]], mods: list[tuple[Any, str, str]]) -> str:
    if not prot and not mods:
        return "<h4>Protected experts</h4>" + note("None recorded.")
    rows = [[num_cell(layer, "protected.layer"), text_cell(f"expert {e}"), text_cell(why or "–")]
            for layer, e, why in prot]  # fmt: skip
    rows += [[num_cell(layer, "protected.layer"), text_cell(mod), text_cell(why or "–")] for layer, mod, why in mods]
    return "<h4>Protected experts and modules</h4>" + table(["layer", "expert / module", "why"], rows)
