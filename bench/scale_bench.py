"""Scaling of `profile` and the default `prune` (output-error) with the expert count, before/after a change.

Synthetic bf16 Qwen3-MoE checkpoints are generated into a temporary folder (2 layers, hidden 512, expert width
256, top-8, E = 16, 64, 128, 256 by default) and deleted afterwards. Each command runs in a fresh subprocess
(one thread) that reports its own CPU seconds (user + system) and peak RSS (VmHWM): `profile` and
`prune --ratio R` (default method, without --profile, so it profiles too) on 4,096 calibration tokens.

With ``--before DIR`` (a checkout of an older commit, e.g. ``git worktree add /tmp/before <commit>``) every
command also runs against that code (PYTHONPATH=DIR), capped at ``--before-timeout`` seconds. The default
pruning of the built-in model is also compared before/after: kept experts per layer and KL(base || pruned).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py --before /tmp/before

Writes reports/scale_bench.json and reports/scale_bench.md (or --out PREFIX).
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

ROOT = Path(__file__).resolve().parent.parent


def child(argv: list[str]) -> None:
    """Run one moecompress command in this process; print CPU seconds, peak RSS and where the code came from."""
    import moecompress
    from moecompress.cli.main import app

    t0 = os.times()
    code = 0
    try:
        app(argv, standalone_mode=False)
    except SystemExit as e:  # typer may still exit
        code = int(e.code or 0)
    t1 = os.times()
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    print(json.dumps({"cpu_s": round(cpu, 2), "peak_rss_bytes": hwm, "code": code, "module": moecompress.__file__}))


def run_cmd(code_dir: Path, argv: list[str], cpu_cap: float) -> dict:
    """Run one command in a fresh process with the code under ``code_dir``, stopped after ``cpu_cap`` CPU seconds
    (RLIMIT_CPU, so a busy machine does not stop it early)."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1", "MOECOMPRESS_QUIET": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--", *argv]
    cap = max(1, int(cpu_cap))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cap, cap + 5))

    t = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), preexec_fn=limit)
    if out.returncode in (-24, -9):  # SIGXCPU / SIGKILL at the CPU limit
        return {"timed_out": True, "cpu_cap_s": cap, "wall_s": round(time.time() - t, 1)}
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed under {code_dir}:\n{out.stderr[-3000:]}")
    res = json.loads(lines[-1])
    if not res["module"].startswith(str(code_dir)):
        raise RuntimeError(f"the child imported {res['module']}, not the code under {code_dir}")
    res["wall_s"] = round(time.time() - t, 1)
    return res


def builtin_check(versions: dict[str, Path], work: Path, ratios: list[float], timeout: float) -> dict:
    """Default pruning of the built-in model with each version: kept experts and KL(base || pruned)."""
    out: dict = {}
    for ratio in ratios:
        row: dict = {}
        for name, code in versions.items():
            dest = work / f"builtin-{name}-{ratio}"
            res = run_cmd(code, ["prune", "--ratio", str(ratio), "-o", str(dest), "--device", "cpu"], timeout)
            if res.get("timed_out"):
                row[name] = res
                continue
            man = json.loads((dest / "moecompress.json").read_text())
            ev = work / f"eval-{name}-{ratio}.json"
            run_cmd(
                ROOT,
                ["eval", str(dest), "--base", "builtin", "--json", str(ev), "--max-windows", "8", "--device", "cpu"],
                timeout,
            )
            e = json.loads(ev.read_text())
            row[name] = {
                "cpu_s": res["cpu_s"],
                "kept": {l: v["kept"] for l, v in man["layers"].items()},
                "kl_to_base": e.get("kl_to_base"),
            }
            shutil.rmtree(dest, ignore_errors=True)
        if "before" in row and "after" in row and "kept" in row["before"]:
            row["same_kept_experts"] = row["before"]["kept"] == row["after"]["kept"]
        out[str(ratio)] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="16,64,128,256")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (x seq-len = calibration tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--before", type=Path, default=None, help="checkout of the older code to compare against")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout of the new code (default: this one)")
    ap.add_argument("--before-timeout", type=float, default=300.0, help="CPU seconds per command for the old code")
    ap.add_argument("--builtin-ratios", default="0.25,0.5", help="built-in model before/after check ('' = skip)")
    ap.add_argument("--refits", default="", help="also prune with each --refit (comma list), e.g. none,router+down")
    ap.add_argument("--out", default=str(ROOT / "reports" / "scale_bench"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_bench import synthetic_checkpoint

    versions = {"after": args.after.resolve()}
    if args.before is not None:
        versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    t0 = time.time()
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", "cpu"]
    rows = []
    try:
        for E in (int(e) for e in args.experts.split(",")):
            model = work / f"E{E}"
            size = synthetic_checkpoint(model, args.layers, args.hidden, E, args.width, args.top_k)
            row: dict = {"experts": E, "checkpoint_bytes": size}
            for name, code in versions.items():
                cap = args.before_timeout if name == "before" else 3600.0
                prof = run_cmd(code, ["profile", str(model), "-o", str(work / f"prof-{name}"), *calib], cap)
                prune = run_cmd(
                    code, ["prune", str(model), "--ratio", str(args.ratio), "-o", str(work / f"pr-{name}"), *calib], cap
                )
                row[name] = {"profile": prof, "prune": prune}
                for refit in (r for r in args.refits.split(",") if r):
                    argv = ["prune", str(model), "--ratio", str(args.ratio), "--refit", refit, "-o", str(work / "rf")]
                    row[name][f"prune --refit {refit}"] = run_cmd(code, [*argv, *calib], cap)
                    shutil.rmtree(work / "rf", ignore_errors=True)
                for d in ("prof", "pr"):
                    shutil.rmtree(work / f"{d}-{name}", ignore_errors=True)
                print(E, name, json.dumps(row[name]), flush=True)
            shutil.rmtree(model, ignore_errors=True)
            rows.append(row)
        ratios = [float(r) for r in args.builtin_ratios.split(",") if r]
        builtin = builtin_check(versions, work, ratios, max(args.before_timeout, 600.0)) if ratios else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "setup": {
            "layers": args.layers, "hidden": args.hidden, "width": args.width, "top_k": args.top_k,
            "calibration_tokens": args.samples * args.seq_len, "ratio": args.ratio, "dtype": "bfloat16",
            "threads": 1, "before": str(args.before) if args.before else None, "after": str(args.after),
            "before_timeout_s": args.before_timeout, "refits": args.refits,
        },
        "rows": rows,
        "builtin": builtin,
        "elapsed_s": round(time.time() - t0, 1),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_md(report)
    Path(args.out + ".md").write_text(md)
    print(md)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("timed_out"):
        return f"> {r['cpu_cap_s']:.0f} s (stopped)"
    return f"{r['cpu_s']:.1f} s, {r['peak_rss_bytes'] / 2**30:.2f} GiB"


def render_md(rep: dict) -> str:
    s = rep["setup"]
    lines = [
        "# Scaling of profile and default prune with the expert count",
        "",
        f"Synthetic bf16 Qwen3-MoE: {s['layers']} layers, hidden {s['hidden']}, width {s['width']}, top-{s['top_k']}; "
        f"{s['calibration_tokens']:,} calibration tokens; `prune --ratio {s['ratio']}` (default method, "
        f"output-error, profiling included); one thread; CPU seconds (user+sys) and peak RSS (VmHWM) of a fresh "
        f"process. Before = `{s['before']}` {s.get('before_commit', '')} (stopped after {s['before_timeout_s']:.0f} "
        f"CPU s), after = `{s.get('after')}` {s.get('after_commit', '')}. Total "
        f"{rep['elapsed_s']:.0f} s.",
        "",
        "Reproduce: `mkdir /tmp/before && git archive <old commit> | tar -x -C /tmp/before` (same for /tmp/after "
        "with the new commit, or omit --after), then `OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py "
        f"--before /tmp/before --after /tmp/after --before-timeout {s['before_timeout_s']:g} --builtin-ratios "
        f"{','.join(rep['builtin']) or chr(39) * 2} --experts {','.join(str(r['experts']) for r in rep['rows'])} "
        f"--ratio {s['ratio']:g}" + (f" --refits {s['refits']}`" if s.get("refits") else "`"),
        "",
        "| E | checkpoint | profile before | prune before | profile after | prune after | prune / profile (after) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        b, a = r.get("before", {}), r["after"]
        ratio = a["prune"]["cpu_s"] / a["profile"]["cpu_s"]
        lines.append(
            f"| {r['experts']} | {r['checkpoint_bytes'] / 2**20:.0f} MiB | {_cell(b.get('profile'))} | "
            f"{_cell(b.get('prune'))} | {_cell(a['profile'])} | {_cell(a['prune'])} | {ratio:.2f}x |"
        )
    refits = [k for k in rep["rows"][0]["after"] if k.startswith("prune --refit")] if rep["rows"] else []
    if refits:
        lines += ["", f"`prune --ratio {s['ratio']}` with each refit (CPU s, peak RSS; x profile):", ""]
        lines += ["| E | version | " + " | ".join(refits) + " |", "|---|---|" + "---|" * len(refits)]
        for r in rep["rows"]:
            for name in ("before", "after"):
                if name in r:
                    v = r[name]
                    cells = [
                        f"{_cell(v[k])} ({v[k]['cpu_s'] / v['profile']['cpu_s']:.2f}x)"
                        if "cpu_s" in v[k]
                        else _cell(v[k])
                        for k in refits
                    ]
                    lines.append(f"| {r['experts']} | {name} | " + " | ".join(cells) + " |")
    if rep["builtin"]:
        lines += ["", "Built-in model, default `prune` before/after:", ""]
        lines += [
            "| ratio | KL before | KL after | same kept experts | CPU s before | CPU s after |",
            "|---|---|---|---|---|---|",
        ]
        for ratio, row in rep["builtin"].items():
            b, a = row.get("before", {}), row.get("after", {})
            kl = lambda r: f"{r['kl_to_base']:.4f}" if r.get("kl_to_base") is not None else "-"  # noqa: E731
            cpu = lambda r: f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"  # noqa: E731
            lines.append(f"| {ratio} | {kl(b)} | {kl(a)} | {row.get('same_kept_experts', '-')} | {cpu(b)} | {cpu(a)} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    elif len(sys.argv) > 2 and sys.argv[1] == "--render-only":  # --render-only PREFIX: rewrite PREFIX.md
        Path(sys.argv[2] + ".md").write_text(render_md(json.loads(Path(sys.argv[2] + ".json").read_text())))
    else:
        main()
