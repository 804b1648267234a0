"""Every MoE model type of the installed transformers: supported operations or the refusal reason.

For each model type whose modeling file uses ``use_experts_implementation``, runs the checks of
tests/families/family_checks.py (derive or refuse; tiny model saved with save_pretrained; checkpoint opens;
view -> write bit-identical; profile statistics equal a brute-force loop on the full transformers model; prune
25% --method frequency and quantize --bits 4 --plan uniform --method rtn load in plain transformers with no
missing/unexpected keys, pruned logits equal the base with those experts masked; info, atom, merge, eval, load,
report) and writes reports/families.json. ``--readme`` regenerates the README table from it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/families.py [--types a b ...] [--readme]   # run (then the table)
    .venv/bin/python bench/families.py --readme       # README "Supported model types" table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MOECOMPRESS_QUIET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "families"))
REPORT = ROOT / "reports" / "families.json"
BEGIN, END = "<!-- families-table:begin -->", "<!-- families-table:end -->"
OPS = ("open", "view_write", "profile", "prune", "quantize", "info", "atom", "merge", "eval", "load", "report")


def run(types: list[str] | None) -> dict:
    import torch
    import transformers
    from family_checks import run_checks
    from family_models import installed_moe_types, make_tokenizer

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    all_types = installed_moe_types()
    old = json.loads(REPORT.read_text())["types"] if REPORT.exists() and types else {}
    results = dict(old)
    with tempfile.TemporaryDirectory(prefix="moecompress-families-") as tmp:
        tok = make_tokenizer(Path(tmp) / "tok")
        for mt in types or all_types:
            t0 = time.time()
            try:
                r = run_checks(mt, Path(tmp), tok, ops=OPS)
            except Exception as err:  # a tiny model that cannot even be built is recorded, not hidden
                r = {"model_type": mt, "supported": False, "reason": f"check crashed: {type(err).__name__}: {err}"}
            r["seconds"] = round(time.time() - t0, 1)
            results[mt] = r
            print(json.dumps(r)[:300], flush=True)
    counted = {t: r for t, r in results.items() if t in all_types}  # (extra --types, e.g. gemma4_text: listed only)
    ok = [t for t, r in counted.items() if r.get("supported") and all(v == "ok" for v in r["ops"].values())]
    opened = [t for t, r in counted.items() if r.get("supported")]
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/families.py",
        "installed_moe_types": len(all_types),
        "all_ops_pass": len(ok),
        "supported": len(opened),
        "also_checked": sorted(set(results) - set(all_types)),
        "types": {t: results[t] for t in sorted(results)},
    }


def table(report: dict) -> str:
    rows = [
        f"Measured by `bench/families.py` with transformers {report['transformers']}: of the "
        f"{report['installed_moe_types']} MoE model types (those whose experts use `use_experts_implementation`, "
        "and Llama-4's `llama4` / `llama4_text`, whose experts module predates it), "
        f"**{report['supported']} are supported** and {report['all_ops_pass']} pass every check below"
        + (
            f" (also listed, not counted: {', '.join(f'`{t}`' for t in report['also_checked'])}, a model type "
            "that shares another's modeling file)"
            if report.get("also_checked")
            else ""
        )
        + " (tiny model "
        "of each built from its config class, saved by `save_pretrained`; ✓ passes, – refused on purpose in one "
        "line, the line listed under the table, ✗ fails). Columns: `info`; view→write bit-identical; profile "
        "statistics = a brute-force token loop on the transformers model; `prune --ratio 0.25` (the default "
        "output-error search with `--refit none` where `routing_known`, else and for gpt-oss's biased experts "
        "`--method frequency`) "
        "loads in plain transformers with no missing/unexpected keys and its logits equal the base model's with "
        "the removed experts masked out of routing; `quantize --bits 4 --plan uniform --method rtn` loads in plain "
        "transformers (gpt-oss: MXFP4 in the release layout, at expert width 64); "
        "`prune --granularity atom --refit none` loads with `moecompress.load`; `merge --ratio 0.25` "
        "loads in plain transformers; `eval --base` and `report` run on the prune output; `moecompress.load` of "
        "the prune output gives transformers' logits. `routing_known`: moecompress re-implements the family's "
        "routing (output-error search, refits, merge) because it is hand-written, its router code equals a "
        "hand-written family's (source), or its own MoE block routes as the re-implementation on random inputs "
        "(behaviour, `core/routing_check.py`). A multimodal wrapper (`record` wrapper) is checked on its MoE "
        'language model, and "plain transformers" is the image-text-to-text class its model type maps to.',
        "",
        "| model type | record | `routing_known` | open | view→write | profile | prune | quantize | info | atom "
        "| merge | eval | load | report |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    refused = []
    for t, r in report["types"].items():
        if not r.get("supported"):
            refused.append(f"- `{t}`: {r['reason']}")
            continue
        cells = [
            "✓" if (v := r["ops"].get(op, "not run")) == "ok" else "–" if v.startswith("refused:") else "✗"
            for op in OPS
        ]
        kind = "wrapper" if r.get("nest") else "derived" if r.get("derived") else "hand-written"
        by = r.get("routing_verified_by")
        known = ("yes" + (f" ({by})" if by in ("source", "behaviour") else "")) if r.get("routing_known") else "no"
        rows.append(f"| `{t}` | {kind} | {known} | " + " | ".join(cells) + " |")
    failed = [
        f"- `{t}` {op}: {v}"
        for t, r in report["types"].items()
        if r.get("supported")
        for op, v in r["ops"].items()
        if v != "ok" and not v.startswith("refused:")
    ]
    partial = [
        f"- `{t}` {op}: {v[len('refused: ') :]}"
        for t, r in report["types"].items()
        if r.get("supported")
        for op, v in r["ops"].items()
        if v.startswith("refused:")
    ]
    out = rows + ["", f"Refused ({len(refused)}), each with its one-line reason:", "", *refused]
    if partial:
        out += ["", "Operations refused for a supported type (the others work):", "", *partial]
    if failed:
        out += ["", "Failed checks:", "", *failed]
    return "\n".join(out)


def write_readme(report: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:a] + "\n" + table(report) + "\n" + text[b:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", help="only these model types (merged into the existing report)")
    ap.add_argument(
        "--readme",
        action="store_true",
        help="regenerate the README table from reports/families.json (alone: without running; with --types: after)",
    )
    args = ap.parse_args()
    if args.readme and args.types is None:
        write_readme(json.loads(REPORT.read_text()))
        return
    report = run(args.types)
    REPORT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['all_ops_pass']} of {report['installed_moe_types']} model types pass every check -> {REPORT}")
    if args.readme:
        write_readme(report)


if __name__ == "__main__":
    main()
