"""Peak RSS of `prune --granularity atom` (HEAPr, layer-streamed gradient pass), before/after a change.

Each run is a fresh process (one thread) that reports its peak RSS (VmHWM) and CPU seconds (scale_bench.child).
Cases: the built-in model, and a synthetic bf16 Qwen3-MoE checkpoint (profile_bench.synthetic_checkpoint, deleted
afterwards). With ``--before DIR`` (e.g. ``mkdir /tmp/b && git archive <commit> moecompress | tar -x -C /tmp/b``)
each case also runs against that code and the kept channels (atomic_channels.json) and the written tensors
(sha256 of every *.safetensors) are compared.

    OMP_NUM_THREADS=1 .venv/bin/python bench/atomic_memory.py --before /tmp/b

Writes reports/atomic_memory.json and reports/atomic_memory.md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def digest(folder: Path) -> dict:
    """Kept channels and a hash of every written tensor file."""
    files = sorted(folder.glob("*.safetensors"))
    return {
        "channels": json.loads((folder / "atomic_channels.json").read_text()),
        "tensors_sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }


def main() -> None:
    from scale_bench import run_cmd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--after", type=Path, default=ROOT)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--synthetic", default="2,1024,32,512,8", help="layers,hidden,experts,width,top_k ('' = skip)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--extra", default="", help="extra prune options, space separated (e.g. '--hessian diag')")
    ap.add_argument("--out", default=str(ROOT / "reports" / "atomic_memory"))
    args = ap.parse_args()
    from profile_bench import synthetic_checkpoint

    versions = {"after": args.after.resolve()}
    if args.before is not None:
        versions = {"before": args.before.resolve(), **versions}
    work = Path(tempfile.mkdtemp(prefix="atomic-memory-"))
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", "cpu"]
    base = ["--granularity", "atom", "--ratio", str(args.ratio), *args.extra.split()]
    cases = {"builtin": []}
    try:
        if args.synthetic:
            L, H, E, I, k = (int(x) for x in args.synthetic.split(","))
            model = work / "synthetic"
            size = synthetic_checkpoint(model, L, H, E, I, k)
            cases[f"synthetic L{L} H{H} E{E} I{I} k{k} ({size / 2**20:.0f} MiB bf16)"] = [str(model)]
        rows = {}
        for case, model_arg in cases.items():
            row: dict = {}
            for name, code in versions.items():
                dest = work / f"out-{name}"
                res = run_cmd(code, ["prune", *model_arg, *base, *calib, "-o", str(dest)], 3600.0)
                res["digest"] = digest(dest)
                shutil.rmtree(dest, ignore_errors=True)
                row[name] = res
                print(case, name, res["peak_rss_bytes"] / 2**20, "MiB", res["cpu_s"], "s", flush=True)
            if "before" in row:
                b, a = row["before"]["digest"], row["after"]["digest"]
                row["channels_identical"] = b["channels"] == a["channels"]
                row["tensors_identical"] = b["tensors_sha256"] == a["tensors_sha256"]
            for r in row.values():
                if isinstance(r, dict):
                    r.pop("digest", None)
            rows[case] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep = {"command": " ".join(["bench/atomic_memory.py", *sys.argv[1:]]), "prune_args": base + calib, "cases": rows}
    Path(args.out + ".json").write_text(json.dumps(rep, indent=1))
    lines = [
        "# atomic prune (HEAPr) peak memory",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python {rep['command']}`; prune options `{' '.join(base + calib)}`.",
        "",
        "| case | version | peak RSS MiB | CPU s | kept channels identical | tensors identical |",
        "|---|---|---|---|---|---|",
    ]
    for case, row in rows.items():
        for name in versions:
            r = row[name]
            lines.append(
                f"| {case} | {name} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['cpu_s']} | "
                f"{row.get('channels_identical', '')} | {row.get('tensors_identical', '')} |"
            )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
