"""Time and peak memory of `merge` next to `quantize` (GPTQ 4-bit) on the same synthetic checkpoints, before/after.

Synthetic bf16 Qwen3-MoE checkpoints (bench/profile_bench.py's builder): 2 layers, hidden 512, width 256, top-8 at
E = 16, 64, 128, and one Qwen3-30B-shaped layer (hidden 2048, E 128, width 768, top-8: 1.2 GB of experts in bf16).
Each command runs in a fresh subprocess with one thread (bench/scale_bench.py's child: CPU seconds user+system and
peak RSS from VmHWM) on the same 4,096 calibration tokens (16 windows x 256), `--device cpu`:

    merge MODEL --ratio 0.5        quantize MODEL --bits 4 --plan uniform --method gptq

A command is stopped past ``--cpu-cap`` CPU seconds or ``--rss-cap`` GiB of resident memory (a watchdog polls
VmRSS), and the row says so. With ``--before DIR`` (e.g. ``git archive <commit> | tar -x -C DIR``) merge also runs
against that code. The checkpoints are deleted afterwards.

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_scale.py --before /tmp/merge-before

Writes reports/merge_bench.scale.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3


def run_capped(code_dir: Path, argv: list[str], cpu_cap: float, rss_cap: float) -> dict:
    """One moecompress command in a fresh one-thread process with the code under ``code_dir``; stopped past
    ``cpu_cap`` CPU seconds (RLIMIT_CPU) or ``rss_cap`` bytes resident (scale_bench.run_watched); a command that
    printed no result raises, as does a child that imported another checkout's code."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scale_bench import run_watched

    res = run_watched(argv, cpu_cap, int(rss_cap), code_dir=code_dir)
    if "stopped" in res:
        peak = res.get("rss_at_stop", res.get("rss_seen", 0))
        return {"stopped": res["stopped"], "wall_s": res["wall_s"], "peak_rss_bytes": peak}
    if "module" not in res:
        raise RuntimeError(f"{' '.join(argv)} failed under {code_dir}:\n{res.get('failed', '')}")
    if not res["module"].startswith(str(code_dir)):
        raise RuntimeError(f"the child imported {res['module']}, not the code under {code_dir}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="E16,E64,E128,qwen3-30b-layer")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (x seq-len = calibration tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--before", type=Path, default=None, help="checkout of the older code to compare against")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout of the new code (default: this one)")
    ap.add_argument("--cpu-cap", type=float, default=1200.0, help="CPU seconds per command")
    ap.add_argument("--rss-cap", type=float, default=6.0, help="GiB resident per command")
    ap.add_argument("--no-quantize", action="store_true", help="skip quantize (e.g. measured in an earlier run)")
    ap.add_argument(
        "--before-from",
        type=Path,
        default=None,
        help="JSON of an earlier run of the old code (as "
        "--after): its merge and quantize rows become this report's before and quantize",
    )
    ap.add_argument("--out", default=str(ROOT / "reports" / "merge_bench.scale"))
    ap.add_argument("--combine", type=Path, nargs="+", default=None, help="JSON reports of earlier runs -> OUT")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (with --combine)")
    args = ap.parse_args()
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        report = {"setup": parts[0]["setup"], "runs": [p["setup"] for p in parts], "notes": args.note,
                  "rows": [r for p in parts for r in p["rows"]]}  # fmt: skip
        Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
        Path(args.out + ".md").write_text(render_md(report))
        print(render_md(report))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_bench import synthetic_checkpoint

    shapes = {
        "E16": (2, 512, 16, 256, 8),
        "E64": (2, 512, 64, 256, 8),
        "E128": (2, 512, 128, 256, 8),
        "qwen3-30b-layer": (1, 2048, 128, 768, 8),
    }
    versions = {"after": args.after.resolve()}
    if args.before_from is not None:
        args.before = Path(json.loads(args.before_from.read_text())["setup"]["after"])
        versions = {"after": args.after.resolve()}
    elif args.before is not None:
        versions = {"before": args.before.resolve(), **versions}
    work = Path(tempfile.mkdtemp(prefix="merge-scale-"))
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", "cpu"]
    rows, t0 = [], time.time()
    try:
        for case in args.cases.split(","):
            layers, hidden, E, width, top_k = shapes[case]
            model = work / case
            size = synthetic_checkpoint(model, layers, hidden, E, width, top_k)
            moe_bytes = layers * E * 3 * hidden * width * 2
            row: dict = {"case": case, "layers": layers, "hidden": hidden, "experts": E, "width": width, "top_k": top_k,
                         "checkpoint_bytes": size, "moe_layer_bytes_bf16": moe_bytes // layers}  # fmt: skip
            caps = (args.cpu_cap, args.rss_cap * GiB)
            order = ["after", "quantize", "before"]  # the new merge first: the old one may only hit a cap
            for what in order:
                if what == "quantize" and not args.no_quantize:
                    q = ["quantize", str(model), "--bits", "4", "--plan", "uniform", "--method", "gptq", "-o"]
                    row["quantize"] = run_capped(args.after.resolve(), [*q, str(work / "q"), *calib], *caps)
                    shutil.rmtree(work / "q", ignore_errors=True)
                    print(case, "quantize", json.dumps(row["quantize"]), flush=True)
                elif what in versions:
                    m = ["merge", str(model), "--ratio", str(args.ratio), "-o", str(work / "m")]
                    res = run_capped(versions[what], [*m, *calib], *caps)
                    man = work / "m" / "moecompress.json"
                    if man.exists():  # seconds per phase and layer (the new code records them)
                        layers = json.loads(man.read_text())["stages"][0]["layers"]
                        res["seconds"] = {l: v["seconds"] for l, v in layers.items() if "seconds" in v}
                    row[f"merge {what}"] = res
                    shutil.rmtree(work / "m", ignore_errors=True)
                    print(case, "merge", what, json.dumps(res), flush=True)
            shutil.rmtree(model, ignore_errors=True)
            rows.append(row)
        if args.before_from is not None:
            old = {r["case"]: r for r in json.loads(args.before_from.read_text())["rows"]}
            for row in rows:
                if row["case"] in old:
                    row["merge before"] = old[row["case"]].get("merge after")
                    row.setdefault("quantize", old[row["case"]].get("quantize"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "setup": {
            "calibration_tokens": args.samples * args.seq_len,
            "ratio": args.ratio,
            "dtype": "bfloat16",
            "threads": 1,
            "before": str(args.before) if args.before else None,
            "after": str(args.after),
            "cpu_cap_s": args.cpu_cap,
            "rss_cap_gib": args.rss_cap,
        },  # fmt: skip
        "rows": rows,
        "elapsed_s": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    prev = Path(args.out + ".json")
    if prev.exists():  # keep rows of cases not rerun (e.g. --cases qwen3-30b-layer after a full sweep)
        old = json.loads(prev.read_text())
        done = {r["case"] for r in rows}
        report["rows"] = [r for r in old.get("rows", []) if r["case"] not in done] + rows
        report["rows"].sort(key=lambda r: list(shapes).index(r["case"]))
    prev.write_text(json.dumps(report, indent=2) + "\n")
    md = render_md(report)
    Path(args.out + ".md").write_text(md)
    print(md)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    mem = f"{r['peak_rss_bytes'] / GiB:.2f} GiB"
    if "stopped" in r:
        return f"stopped after {r['wall_s']:.0f} s wall ({r['stopped']}; peak {mem})"
    return f"{r['cpu_s']:.1f} s, {mem}"


def render_md(rep: dict) -> str:
    s = rep["setup"]
    lines = [
        "# Merge at scale: CPU time and peak RSS next to quantize (GPTQ 4-bit)",
        "",
        f"Synthetic bf16 Qwen3-MoE checkpoints, {s['calibration_tokens']:,} calibration tokens, one thread, "
        f"`merge --ratio {s['ratio']}` and `quantize --bits 4 --plan uniform --method gptq`, `--device cpu`; "
        f"CPU s (user+system) and peak RSS per command; stopped past {s['cpu_cap_s']:.0f} CPU s or "
        f"{s['rss_cap_gib']} GiB resident. Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/merge_scale.py"
        + (" --before DIR`" if s["before"] else "`")
        + (f" (before = `{s['before']}`)." if s["before"] else "."),
        "",
        "| case | MoE layer (bf16) | quantize | merge before | merge after | merge after / quantize |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        q, a = r.get("quantize"), r.get("merge after")
        ratio = f"{a['cpu_s'] / q['cpu_s']:.2f}x" if q and a and "cpu_s" in a and "cpu_s" in q else "-"
        lines.append(
            f"| {r['case']} ({r['layers']} layer(s), H {r['hidden']}, E {r['experts']}, width {r['width']}) | "
            f"{r['moe_layer_bytes_bf16'] / GiB:.2f} GiB | {_cell(q)} | {_cell(r.get('merge before'))} | {_cell(a)} | "
            f"{ratio} |"
        )
    phases = [(r["case"], r["merge after"]["seconds"]) for r in rep["rows"] if r.get("merge after", {}).get("seconds")]
    if phases:
        names = list(dict.fromkeys(k for _, sec in phases for v in sec.values() for k in v))
        lines += [
            "",
            "Where the new merge's time goes (wall seconds per phase, summed over layers, from moecompress.json):",
            "",
            "| case | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for case, sec in phases:
            tot = {k: sum(v.get(k, 0.0) for v in sec.values()) for k in names}
            lines.append(f"| {case} | " + " | ".join(f"{tot[k]:.1f}" for k in names) + " |")
    for note in rep.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
