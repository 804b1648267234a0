"""The default prune's CPU time as a multiple of a profile's (issue 13: <= 2x at E = 128 and 256), repeated, with
one or more checkouts side by side.

For each case (``scale_bench.CASES``: synthetic bf16 Qwen3-MoE checkpoints, generated once per case and deleted
after) and each repeat, every checkout runs ``profile`` and then ``prune --ratio 0.5`` (default method and refit,
without --profile, so it profiles too) in fresh processes (``scale_bench.run_watched``: CPU s of the command,
imports inside it included, and peak RSS). Checkouts alternate within a repeat, so a before/after pair shares the
machine's load; the ratio is taken within each (repeat, checkout) pair and reported as the median over repeats.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_ratio.py --cases E128,E256 --repeats 3 \\
        --code before=/tmp/before --code after=. --out reports/scale_bench.ops13l

(``git worktree add /tmp/before <commit>`` for the code before.) Writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import CASES, OPS, _commit, _make_checkpoint, run_watched  # noqa: E402


def measure(args: argparse.Namespace) -> dict:
    codes = {}
    for spec in args.code:
        name, _, path = spec.partition("=")
        codes[name] = Path(path or name).resolve()
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", "cpu"]
    rep: dict = {
        "setup": {"samples": args.samples, "seq_len": args.seq_len, "threads": 1, "repeats": args.repeats},
        "codes": {n: _commit(c) for n, c in codes.items()},
        "runs": [],
    }
    work = Path(tempfile.mkdtemp(prefix="prune-ratio-"))
    try:
        for case in args.cases.split(","):
            model = work / case
            size = _make_checkpoint(model, CASES[case])
            for r in range(args.repeats):
                for name, code in codes.items():
                    row = {"case": case, "repeat": r, "code": name, "checkpoint_bytes": size}
                    for op in ("profile", "prune"):
                        argv = OPS[op][0]
                        out = work / "out"
                        res = run_watched([argv[0], str(model), *argv[1:], "-o", str(out), *calib],
                                          args.cpu_cap, int(args.rss_cap_gib * 2**30), code_dir=code)  # fmt: skip
                        shutil.rmtree(out, ignore_errors=True)
                        if "cpu_s" not in res or res.get("failed"):
                            raise RuntimeError(f"{case} {op} under {code}: {res}")
                        if not res["module"].startswith(str(code)):
                            raise RuntimeError(f"the child imported {res['module']}, not the code under {code}")
                        row[op] = {k: res[k] for k in ("cpu_s", "peak_rss_bytes", "wall_s")}
                    row["ratio"] = round(row["prune"]["cpu_s"] / row["profile"]["cpu_s"], 3)
                    row["at"] = time.strftime("%H:%M", time.gmtime())
                    print(json.dumps(row), flush=True)
                    rep["runs"].append(row)
                    Path(args.out + ".json").write_text(json.dumps(rep, indent=2) + "\n")
            shutil.rmtree(model, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rep


def summary(rep: dict) -> dict:
    """Per (case, code): median profile / prune CPU s and median ratio over the repeats."""
    out: dict = {}
    for row in rep["runs"]:
        out.setdefault(row["case"], {}).setdefault(row["code"], []).append(row)
    return {
        case: {
            code: {
                "profile_cpu_s": statistics.median(r["profile"]["cpu_s"] for r in rows),
                "prune_cpu_s": statistics.median(r["prune"]["cpu_s"] for r in rows),
                "ratio_median": statistics.median(r["ratio"] for r in rows),
                "ratios": [r["ratio"] for r in rows],
                "prune_peak_rss_mib": max(r["prune"]["peak_rss_bytes"] for r in rows) // 2**20,
            }
            for code, rows in by.items()
        }
        for case, by in out.items()
    }


def render_md(rep: dict) -> str:
    s = rep["setup"]
    lines = [
        "# Default prune vs profile CPU time (issue 13: <= 2x at E = 128 and 256)",
        "",
        f"`bench/prune_ratio.py`: synthetic bf16 2-layer Qwen3-MoE (hidden 512, width 256, top-8), {s['samples']} x "
        f"{s['seq_len']} calibration tokens, `prune --ratio 0.5` (output error + down refit, profile included) and "
        "`profile`, each a fresh one-thread process (CPU s of the command). Checkouts alternate within each repeat "
        f"({s['repeats']} repeats); the ratio is taken within each pair, median over repeats. Code: "
        + ", ".join(f"{n} = {c}" for n, c in rep["codes"].items())
        + ".",
        "",
        "| case | code | profile CPU s (median) | prune CPU s (median) | prune / profile (median) | per repeat | "
        "prune peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, by in summary(rep).items():
        for code, m in by.items():
            lines.append(
                f"| {case} | {code} | {m['profile_cpu_s']:.2f} | {m['prune_cpu_s']:.2f} | {m['ratio_median']:.2f}x | "
                + ", ".join(f"{r:.2f}" for r in m["ratios"])
                + f" | {m['prune_peak_rss_mib']:,} MiB |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="E128,E256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code", action="append", default=[], help="NAME=DIR, a checkout (repeatable; default this one)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cpu-cap", type=float, default=600.0)
    ap.add_argument("--rss-cap-gib", type=float, default=4.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "reports" / "scale_bench.ops13l"))
    ap.add_argument("--render-only", action="store_true", help="rewrite PREFIX.md from PREFIX.json")
    a = ap.parse_args()
    if not a.code:
        a.code = [f"this={Path(__file__).resolve().parent.parent}"]
    r = json.loads(Path(a.out + ".json").read_text()) if a.render_only else measure(a)
    Path(a.out + ".md").write_text(render_md(r))
    print(render_md(r))
