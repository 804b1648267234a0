"""One pass vs chained commands: `compress --prune R --bits B` against `prune` then `quantize` on its output.

Each run is its own process under /usr/bin/time (wall seconds, peak RSS); every run uses the same calibration
windows (--calib mixed --samples N --seq-len S --seed 0). Quality: KL(base || output) and top-1 agreement on
held-out windows (moecompress.core.evaluate, fp32), bytes of the safetensors files. Also, for reference, each
single step alone (prune only, quantize only).

    OMP_NUM_THREADS=1 .venv/bin/python bench/compress_bench.py                         # built-in model
    OMP_NUM_THREADS=1 .venv/bin/python bench/compress_bench.py --model /path/to/stories260k-moe --out reports/x

Writes reports/compress_bench.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> dict:
    """Run one moecompress command in a fresh process; wall time and peak RSS from /usr/bin/time."""
    fmt = "%e %M"
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cmd = ["/usr/bin/time", "-o", tf.name, "-f", fmt, sys.executable, "-m", "moecompress.cli", *argv]
        env = {**os.environ, "MOECOMPRESS_QUIET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
        wall, rss_kb = Path(tf.name).read_text().split()[-2:]
    return {"argv": argv, "wall_s": float(wall), "peak_rss_mib": round(int(rss_kb) / 1024, 1)}


def bytes_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--prune", type=float, default=0.25)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "reports" / "compress_bench"))
    args = ap.parse_args()

    from moecompress.core.checkpoint import resolve_model
    from moecompress.core.evaluate import evaluate

    model = resolve_model(args.model)
    cal = ["--calib", "mixed", "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", "0"]
    work = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    rows: dict[str, dict] = {}
    try:
        m = [str(model)]
        out = {k: work / k for k in ("one_pass", "pruned", "chained", "quant_only")}
        rows["one_pass"] = {
            "steps": [timed(["compress", *m, "--prune", str(args.prune), "--bits", str(args.bits), *cal,
                             "-o", str(out["one_pass"])])],
        }  # fmt: skip
        p = timed(["prune", *m, "--ratio", str(args.prune), *cal, "-o", str(out["pruned"])])
        q = timed(["quantize", str(out["pruned"]), "--bits", str(args.bits), "--plan", "uniform", *cal,
                   "-o", str(out["chained"])])  # fmt: skip
        rows["chained"] = {"steps": [p, q]}
        rows["prune_only"] = {"steps": [p], "folder": out["pruned"]}
        rows["quant_only"] = {
            "steps": [timed(["quantize", *m, "--bits", str(args.bits), "--plan", "uniform", *cal,
                             "-o", str(out["quant_only"])])],
        }  # fmt: skip
        for name, row in rows.items():
            folder = row.pop("folder", None) or out[name]
            ev = evaluate(folder, data="mixed", seq_len=args.seq_len, max_windows=args.eval_windows, base=model)
            row.update(
                bytes=bytes_of(folder),
                kl=ev["kl_to_base"],
                top1=ev["top1_agreement"],
                wall_s=round(sum(s["wall_s"] for s in row["steps"]), 2),
                peak_rss_mib=max(s["peak_rss_mib"] for s in row["steps"]),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "model": str(model),
        "prune": args.prune,
        "bits": args.bits,
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "name": "mixed", "seed": 0},
        "eval_windows_per_domain": args.eval_windows,
        "base_bytes": bytes_of(model),
        "rows": rows,
        "command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python bench/compress_bench.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# compress (one pass) vs prune then quantize: {Path(str(model)).name}, prune {args.prune}, {args.bits} bits",
        "",
        f"`{res['command']}`; calibration {args.samples} x {args.seq_len} tokens (mixed, seed 0) for every run; "
        f"KL(base || output) on {args.eval_windows} held-out windows per domain; wall time and peak RSS per "
        "process (/usr/bin/time; chained = the sum of the two runs' wall times, the larger peak).",
        "",
        "| run | bytes | KL | top-1 | wall s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        cells = [name, f"{r['bytes']:,}", f"{r['kl']:.4g}", f"{r['top1']:.4f}", f"{r['wall_s']:.1f}"]
        lines.append("| " + " | ".join([*cells, f"{r['peak_rss_mib']:.0f}"]) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
