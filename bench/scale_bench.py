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


# ---- per-operation sweep: measured CPU s and peak RSS per (case, op), the fitted cost model, the flagship table ----

CASES = {  # name -> (layers, hidden, experts, width, top-k)
    "E16": (2, 512, 16, 256, 8),
    "E64": (2, 512, 64, 256, 8),
    "E128": (2, 512, 128, 256, 8),
    "E256": (2, 512, 256, 256, 8),
    "qwen3-30b-layer": (1, 2048, 128, 768, 8),
    "qwen3-30b-2layer": (2, 2048, 128, 768, 8),  # two layers: what the shard writer holds between layers
    "q30-e64-2layer": (2, 2048, 64, 768, 8),  # the same with half the experts (under the 3 GiB of a shared machine)
    "dsv3-slice": (1, 7168, 16, 2048, 8),
}
OPS = {  # op name -> (argv after MODEL, the estimate's op and settings)
    "profile": (["profile"], ("profile", {})),
    "prune": (["prune", "--ratio", "0.5"], ("prune", {"method": "output-error"})),
    "prune-reap": (["prune", "--ratio", "0.5", "--method", "reap"], ("prune", {"method": "reap"})),
    "prune-refit": (
        ["prune", "--ratio", "0.5", "--refit", "router+down"],
        ("prune", {"method": "output-error", "refit": "router+down"}),
    ),
    "merge": (["merge", "--ratio", "0.5"], ("merge", {})),
    "quantize-rtn": (
        ["quantize", "--bits", "4", "--plan", "uniform", "--method", "rtn"],
        ("quantize", {"plan": "uniform", "method": "rtn"}),
    ),
    "quantize-gptq": (
        ["quantize", "--bits", "4", "--plan", "uniform"],
        ("quantize", {"plan": "uniform", "method": "gptq"}),
    ),
    "quantize-lp": (["quantize", "--bits", "3"], ("quantize", {"plan": "lp", "method": "gptq"})),
    "atom": (["prune", "--granularity", "atom", "--ratio", "0.25"], ("atom", {"hessian": "full"})),
    "compress": (["compress", "--prune", "0.25", "--bits", "4"], ("compress", {"stages": ["prune", "quantize"]})),
}


def run_watched(argv: list[str], cpu_cap: float, rss_cap: int, code_dir: Path = ROOT) -> dict:
    """One command in a fresh process with the code under ``code_dir`` (default this checkout), stopped after
    ``cpu_cap`` CPU s or past ``rss_cap`` bytes of resident memory (polled 5x a second; the machine is shared, so a
    case that would not fit is stopped)."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1", "MOECOMPRESS_QUIET": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--", *argv]
    cap = max(1, int(cpu_cap))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cap, cap + 5))

    t = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
        preexec_fn=limit,
    )  # fmt: skip
    killed_rss = 0
    peak_seen = 0
    while proc.poll() is None:
        try:
            rss = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS"))
        except (OSError, StopIteration):
            rss = 0
        peak_seen = max(peak_seen, rss)
        if rss > rss_cap:
            killed_rss = rss
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = round(time.time() - t, 1)
    if killed_rss:
        return {
            "stopped": f"resident memory passed {rss_cap / 2**30:.1f} GiB",
            "rss_at_stop": killed_rss,
            "wall_s": wall,
        }
    if proc.returncode in (-24, -9):
        return {"stopped": f"CPU time passed {cap} s", "cpu_cap_s": cap, "rss_seen": peak_seen, "wall_s": wall}
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return {"failed": (stderr or stdout)[-600:], "wall_s": wall}
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    if res.get("code"):
        res["failed"] = (stderr or stdout)[-600:]
    return res


def _commit(code: Path = ROOT) -> str:
    out = subprocess.run(
        ["git", "-C", str(code), "log", "-1", "--format=%h %cd", "--date=format:%H:%M"], capture_output=True, text=True
    )
    return out.stdout.strip()


def ops_sweep(args: argparse.Namespace) -> None:
    """Measure each --ops on each --cases; results merge into PREFIX.json (a rerun replaces its cells)."""
    from moecompress.estimate import predict, shape_of_config

    store = Path(args.out + ".json")
    rep = json.loads(store.read_text()) if store.exists() else {"runs": {}}
    rep["setup"] = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 8, "device": "cpu", "threads": 1}
    rss_cap = int(args.rss_cap_gib * 2**30)
    code = Path(args.code).resolve()
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", "cpu"]
    work = Path(tempfile.mkdtemp(prefix="scale-ops-", dir=args.work))
    try:
        for case in args.cases.split(","):
            L, H, E, I, k = CASES[case]
            model = work / case
            size = _make_checkpoint(model, (L, H, E, I, k))
            shape = shape_of_config(json.loads((model / "config.json").read_text()))
            for op in args.ops.split(","):
                argv, (est_op, settings) = OPS[op]
                tokens = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 8, "device": "cpu"}
                try:
                    pred = predict(shape, est_op, **settings, **tokens)
                except (KeyError, OSError):  # no fitted coefficients yet for this op
                    pred = None
                key = f"{case}/{op}/{args.samples}x{args.seq_len}"
                commit, started = _commit(code), time.strftime("%H:%M", time.gmtime())  # the code the run starts on
                if pred is not None and pred.host_bytes > rss_cap * args.skip_factor:
                    res = {"skipped": f"predicted {pred.host_bytes / 2**30:.1f} GiB > {rss_cap / 2**30:.1f} GiB cap"}
                else:
                    out = work / "out"
                    cmd = [argv[0], str(model), *argv[1:], "-o", str(out), *calib]
                    res = run_watched(cmd, args.cpu_cap, rss_cap, code_dir=code)
                    shutil.rmtree(out, ignore_errors=True)
                res.update(
                    case=case,
                    op=op,
                    checkpoint_bytes=size,
                    commit=commit,
                    started=started,
                    at=time.strftime("%H:%M", time.gmtime()),
                )
                res.update(samples=args.samples, seq_len=args.seq_len)
                if pred is not None:
                    res["predicted_before_run"] = {"host_bytes": pred.host_bytes, "seconds": round(pred.seconds, 1)}
                rep["runs"][key] = res
                print(key, json.dumps({k: v for k, v in res.items() if k != "module"}), flush=True)
                store.write_text(json.dumps(rep, indent=2) + "\n")
            shutil.rmtree(model, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _make_checkpoint(model: Path, dims: tuple[int, int, int, int, int]) -> int:
    """``profile_bench.synthetic_checkpoint`` in a child process (this process stays small while the runs go on:
    generating a 30B-shaped layer in it left ~2.7 GB resident for the whole sweep); returns its tensor bytes."""
    code = (
        "import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from profile_bench import synthetic_checkpoint; "
        "print(synthetic_checkpoint(Path(sys.argv[2]), *map(int, sys.argv[3:])))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", code, str(ROOT / "bench"), str(model), *map(str, dims)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def case_config(case: str) -> dict:
    """The config.json ``profile_bench.synthetic_checkpoint`` writes for a case (the fit's shapes)."""
    L, H, E, I, k = CASES[case]
    return {
        "model_type": "qwen3_moe", "vocab_size": 8192, "hidden_size": H, "intermediate_size": 4 * H,
        "moe_intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": H // 64,
        "num_key_value_heads": max(1, H // 256), "head_dim": 64, "num_experts": E, "num_experts_per_tok": k,
        "norm_topk_prob": True, "max_position_embeddings": 2048, "dtype": "bfloat16", "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }  # fmt: skip


FLAGSHIPS = {  # published config.json sizes (bf16 weights; DeepSeek-V3 and Kimi-K2 ship fp8 and are planned in bf16)
    "Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048, "num_experts": 128,
        "moe_intermediate_size": 768, "intermediate_size": 6144, "num_experts_per_tok": 8, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "dtype": "bfloat16",
    },
    "Qwen3-235B-A22B": {
        "model_type": "qwen3_moe", "num_hidden_layers": 94, "hidden_size": 4096, "num_experts": 128,
        "moe_intermediate_size": 1536, "intermediate_size": 12288, "num_experts_per_tok": 8,
        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
        "dtype": "bfloat16",
    },
    "DeepSeek-V3": {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 3, "hidden_size": 7168,
        "n_routed_experts": 256, "n_shared_experts": 1, "moe_intermediate_size": 2048, "intermediate_size": 18432,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280, "dtype": "bfloat16",
    },
    "Kimi-K2": {
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 1, "hidden_size": 7168,
        "n_routed_experts": 384, "n_shared_experts": 1, "moe_intermediate_size": 2048, "intermediate_size": 18432,
        "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "num_attention_heads": 64,
        "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 163840, "dtype": "bfloat16",
    },
    "Mixtral-8x22B": {
        "model_type": "mixtral", "num_hidden_layers": 56, "hidden_size": 6144, "num_local_experts": 8,
        "intermediate_size": 16384, "num_experts_per_tok": 2, "num_attention_heads": 48, "num_key_value_heads": 8,
        "vocab_size": 32768, "dtype": "bfloat16",
    },
}  # fmt: skip
FLAGSHIP_OPS = ["profile", "prune", "merge", "quantize-gptq", "quantize-lp", "atom"]
FLAGSHIP_TOKENS = [(128, 2048), (512, 2048)]


# the commit from which prune (and compress's prune stage) refit the kept down projections by default (merge, which
# starts from that pruning since then, has one run on it: its variant is not split, see README Scale)
DOWN_REFIT_DEFAULT = "a9e8da4"


# the commits from which the profile pass a command runs for itself measures no output similarity: prune's (every
# method), then compress's without a merge stage; runs before them are fitted with the profile's 256 similarity tokens
PRUNE_NO_SIMILARITY = "1026905"
# the commit from which the LP plan's codes past quant.run.code_memory_bound go to files as they are made (before
# it, every layer's codes were held in memory up to half of the limit): estimate.model.Settings.codes_spill
LP_CODES_SPILL = "924ac33"
COMPRESS_NO_SIMILARITY = "babd786"
# the commits from which a variant the cost model prices narrow (estimate.model.NARROW) holds the routed experts in
# the checkpoint's dtype (its transform reads narrow, core/stream.py): runs before them held float32 layers
# (estimate.model.Settings.narrow). merge reads narrow since b8b6ce7 but is priced in float32 (see NARROW)
NARROW_SINCE = {"atom": "007f81c"}


def _at_or_after(commit: str | None, since: str) -> bool:
    """Whether ``commit`` ("sha HH:MM" as the stores record it) contains ``since`` (False without a commit)."""
    sha = (commit or "").split(" ")[0]
    if not sha:
        return False
    git = ["git", "-C", str(ROOT), "merge-base", "--is-ancestor", since, sha]
    return subprocess.run(git, capture_output=True).returncode == 0


def _default_refit_at(commit: str | None) -> str:
    """The refit a run of the default prune did at ``commit``: "down" from DOWN_REFIT_DEFAULT on, "none" before it
    (or without a commit)."""
    return "down" if _at_or_after(commit, DOWN_REFIT_DEFAULT) else "none"


def _own_sim_tokens_at(est_op: str, settings: dict, commit: str | None) -> int | None:
    """The similarity tokens of the profile pass a prune or compress run made for itself at ``commit``: the
    profile's 256 before PRUNE_NO_SIMILARITY / COMPRESS_NO_SIMILARITY, else None (the model's default: none)."""
    from moecompress.estimate.model import PROFILE_SIM_TOKENS

    if est_op == "prune" and not _at_or_after(commit, PRUNE_NO_SIMILARITY):
        return PROFILE_SIM_TOKENS
    if est_op == "compress" and "merge" not in settings.get("stages", ()):
        return None if _at_or_after(commit, COMPRESS_NO_SIMILARITY) else PROFILE_SIM_TOKENS
    return None


def measured_runs(stores: list[Path]) -> list[dict]:
    """The completed runs of the sweep stores, as fit rows (variant, shape, settings, host bytes, CPU s)."""
    from moecompress.estimate import shape_of_config
    from moecompress.estimate.model import Settings, variant

    runs = []
    latest: dict[str, int] = {}  # a run measured again in a later store replaces the earlier one
    loaded = [json.loads(store.read_text())["runs"] for store in stores]
    for i, store_runs in enumerate(loaded):
        for key in store_runs:
            latest[key] = i
    for i, store_runs in enumerate(loaded):
        for key, r in store_runs.items():
            if latest[key] != i or "cpu_s" not in r or r.get("failed"):
                continue
            est_op, settings = OPS[r["op"]][1]
            # the commit whose code ran; a run made on uncommitted diffs names the commit they became
            commit = r.get("code_equivalent") or r.get("commit")
            default_prune = settings.get("method", "output-error") == "output-error" and "refit" not in settings
            if est_op in ("prune", "compress") and default_prune:  # see DOWN_REFIT_DEFAULT
                settings = {**settings, "refit": _default_refit_at(commit)}
            if r["op"] == "quantize-lp":  # see LP_CODES_SPILL
                settings = {**settings, "codes_spill": _at_or_after(commit, LP_CODES_SPILL)}
            if r["op"] in NARROW_SINCE and not _at_or_after(commit, NARROW_SINCE[r["op"]]):  # see NARROW_SINCE
                settings = {**settings, "narrow": False}
            sim = _own_sim_tokens_at(est_op, settings, commit)  # see PRUNE_NO_SIMILARITY
            if sim is not None:
                settings = {**settings, "sim_tokens": sim}
            s = Settings(samples=r["samples"], seq_len=r["seq_len"], batch_size=8, device="cpu", **settings)
            runs.append({
                "name": key, "op": r["op"], "variant": variant(est_op, s) if est_op != "compress" else "compress",
                "shape": shape_of_config(case_config(r["case"])), "settings": s, "est_op": est_op,
                "host_bytes": r["peak_rss_bytes"], "seconds": r["cpu_s"], "commit": commit,
            })  # fmt: skip
    return runs


def store_paths(arg: str) -> list[Path]:
    """``--stores``: a comma list of sweep stores, oldest first, or ``@FILE`` naming a file that lists them (one per
    line or comma-separated; paths relative to the repository root)."""
    text = (ROOT / arg[1:]).read_text() if arg.startswith("@") else arg
    names = [n.strip() for n in text.replace("\n", ",").split(",") if n.strip()]
    return [p if p.is_absolute() else ROOT / p for p in map(Path, names)]


BOUND_LAYERS = 2.5  # issue 13: peak host memory <= 2.5 MoE layers in the checkpoint dtype + the activation cache
STATUS_CASES = ("qwen3-30b-layer", "qwen3-30b-2layer", "dsv3-slice")  # 2 layers: what passes between layers


def bound_bytes(case: str, samples: int, seq_len: int) -> int:
    """The memory bound of a flagship case: 2.5 x its bf16 routed experts per layer + the fp32 activation cache."""
    _, H, E, I, _ = CASES[case]
    return int(BOUND_LAYERS * E * 3 * H * I * 2 + samples * seq_len * H * 4)


def status_rows(stores: list[Path], cases: tuple[str, ...] = STATUS_CASES) -> list[dict]:
    """The latest run of each (case, op, tokens) of ``cases`` across ``stores`` (later stores win), with its bound."""
    latest: dict[str, dict] = {}
    for store in stores:
        for key, r in json.loads(store.read_text())["runs"].items():
            if r.get("case") in cases:
                latest[key] = {**r, "store": store.name}
    rows = []
    for key, r in latest.items():
        bound = bound_bytes(r["case"], r["samples"], r["seq_len"])
        peak = r.get("peak_rss_bytes")
        done = "cpu_s" in r and not r.get("failed")
        rows.append({
            "key": key, "case": r["case"], "op": r["op"], "tokens": f"{r['samples']}x{r['seq_len']}",
            "peak_bytes": peak, "bound_bytes": bound, "cpu_s": r.get("cpu_s"), "complete": done,
            "under": bool(done and peak is not None and peak <= bound),
            "commit": r.get("code_equivalent") or r.get("commit"),
            "store": r["store"], "note": r.get("failed") or r.get("skipped") or r.get("killed") or "",
        })  # fmt: skip
    order = {op: i for i, op in enumerate(OPS)}
    return sorted(rows, key=lambda x: (cases.index(x["case"]), order.get(x["op"], 99), x["tokens"]))


def render_status_md(rows: list[dict]) -> str:
    lines = [
        "# Issue 13: flagship-shaped cases against the memory bound",
        "",
        f"Bound: {BOUND_LAYERS} x the layer's routed experts in bf16 + the fp32 activation cache (calibration tokens"
        " x H x 4 bytes). One CPU thread, `--device cpu`; the latest run of each cell across the stores (later"
        " stores win).",
        "",
        "| case | op | tokens | peak RSS | bound | under | CPU s | commit | store |",
        "|---|---|---|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "-"
        under = ("yes" if r["under"] else "**no**") if r["complete"] else f"not complete: {r['note']}"[:60]
        cpu = f"{r['cpu_s']:.1f}" if r["cpu_s"] is not None else "-"
        lines.append(
            f"| {r['case']} | {r['op']} | {r['tokens']} | {peak} | {r['bound_bytes'] / 2**30:.2f} GiB | {under} | {cpu}"
            f" | {(r['commit'] or '-').split()[0][:8]} | {r['store']} |"
        )
    return "\n".join(lines) + "\n"


def status(args: argparse.Namespace) -> None:
    rows = status_rows(store_paths(args.stores))
    md = render_status_md(rows)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(md, end="")


def mac_rate() -> float:
    """One CPU thread's fp32 multiply-add rate (1024^2 matmuls, CPU time): the prior of every time term."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(2):
        a @ b
    t0 = os.times()
    for _ in range(10):
        a @ b
    t1 = os.times()
    return 10 * 1024**3 / max((t1.user - t0.user) + (t1.system - t0.system), 1e-3)


def clip_rate() -> float:
    """One CPU thread's rate of weights through RTN's clip search and codes (``quant.rtn.rtn_quantize`` at 4 bits,
    group 128, the default seven shrink factors, on a [1024, 1024] float32 matrix; CPU time): the prior of the
    quantize variants' clip term, elementwise work that a multiply-add rate prices ~1,000x too cheap."""
    import torch

    from moecompress.quant.rtn import rtn_quantize

    torch.set_num_threads(1)
    w = torch.randn(1024, 1024)
    rtn_quantize(w, 4, 128)
    t0 = time.process_time()
    for _ in range(20):
        rtn_quantize(w, 4, 128)
    return 20 * w.numel() / max(time.process_time() - t0, 1e-3)


def fit_and_report(args: argparse.Namespace) -> None:
    """Fit coefficients.json on the stores' runs; write PREFIX.md: measured, predicted vs measured, flagships."""
    from moecompress.estimate import predict, shape_of_config
    from moecompress.estimate.fit import fit
    from moecompress.estimate.model import COEFFICIENTS

    stores = store_paths(args.stores)
    runs = measured_runs(stores)
    mac = args.mac_per_s or mac_rate()
    clip = args.clip_per_s or clip_rate()
    fitted = fit([r for r in runs if r["variant"] != "compress"], mac, clip)
    coefs = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py --fit --stores "
        + ",".join(os.path.relpath(p, ROOT) for p in stores)
        + f" --mac-per-s {round(mac)} --clip-per-s {round(clip)}",  # the rates used, so that it refits the same
        "fitted_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(),
        "mac_per_s": round(mac), "clip_per_s": round(clip),
        "units": "host: copies of each term's bytes at the peak RSS; seconds: CPU s (one thread) per term unit",
        "ops": fitted,
    }  # fmt: skip
    COEFFICIENTS.write_text(json.dumps(coefs, indent=1) + "\n")
    from moecompress.estimate import model as est_model

    est_model._load.cache_clear()
    check = []
    for r in runs:
        st = r["settings"]
        keys = ("samples", "seq_len", "batch_size", "device", "method", "refit", "plan", "sim_tokens")
        kw = {k: getattr(st, k) for k in keys}
        if r["op"] == "compress":
            kw["stages"] = OPS["compress"][1][1]["stages"]
        p = predict(r["shape"], r["est_op"], **kw)
        # leave-one-out: the same run predicted by a fit on the other runs (an out-of-sample check)
        others = [o for o in runs if o is not r and o["variant"] != "compress"]
        loo = None
        if r["variant"] == "compress" or any(o["variant"] == r["variant"] for o in others):
            loo_coefs = {"ops": {**fitted, **fit(others, mac, clip)}}
            loo = predict(r["shape"], r["est_op"], coefs=loo_coefs, **kw)
        check.append({
            "run": r["name"], "commit": r["commit"], "measured_host": r["host_bytes"], "predicted_host": p.host_bytes,
            "measured_s": r["seconds"], "predicted_s": round(p.seconds, 2),
            "host_err": p.host_bytes / r["host_bytes"] - 1, "time_err": p.seconds / r["seconds"] - 1,
            "loo_host_err": loo.host_bytes / r["host_bytes"] - 1 if loo else None,
            "loo_time_err": loo.seconds / r["seconds"] - 1 if loo else None,
        })  # fmt: skip
    flag = []
    for name, cfg in FLAGSHIPS.items():
        shape = shape_of_config(cfg)
        for n, sl in FLAGSHIP_TOKENS:
            for op in FLAGSHIP_OPS:
                est_op, settings = OPS[op][1]
                if OPS[op][1][0] != "compress" and op not in fitted:
                    continue
                p = predict(
                    shape, est_op, samples=n, seq_len=sl, batch_size=8, device="cuda", memory=80 * 10**9, **settings
                )
                flag.append({
                    "model": name, "tokens": f"{n} x {sl}", "op": op, "host_bytes": p.host_bytes,
                    "gpu_bytes": p.gpu_bytes, "disk_bytes": p.disk_bytes, "cpu_thread_s": round(p.seconds),
                    "time_class": p.time_class, "params": shape.params,
                    "fits_80GB_gpu_256GB_host": p.gpu_bytes <= 80e9 and p.host_bytes <= 256e9,
                })  # fmt: skip
    saved = [json.loads(s.read_text()) for s in stores]
    rep = {"coefficients": coefs, "check": check, "flagships": flag, "stores": saved}
    Path(args.out + ".fit.json").write_text(json.dumps(rep, indent=1) + "\n")
    md = render_fit_md(rep)
    Path(args.out + ".md").write_text(md)
    print(md)


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b < 2**40 else f"{b / 2**40:.2f} TiB"


def _dur(s: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


def render_fit_md(rep: dict) -> str:
    c = rep["coefficients"]
    lines = [
        "# Scale: measured cost per operation, the fitted cost model, flagship predictions",
        "",
        "Synthetic bf16 Qwen3-MoE checkpoints (`bench/profile_bench.py::synthetic_checkpoint`): E16/E64/E128/E256 = 2 "
        "layers, hidden 512, width 256, top-8; qwen3-30b-layer = 1 layer of Qwen3-30B-A3B's MoE shape (hidden 2048, "
        "128 experts of width 768, top-8); dsv3-slice = 1 layer with DeepSeek-V3's dims (hidden 7168, width 2048) and "
        "16 experts. Each command in a fresh process, one thread, `--device cpu`, 8 windows per batch; CPU seconds "
        "(user + system) and peak RSS (VmHWM); a run is stopped past 8 GiB resident (the machine is shared; none was) "
        "or skipped when predicted above a multiple of that (none was). Commit and UTC time of each run in the JSON.",
        "",
        "Rerun: `OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py --ops-sweep --cases E16,E64,E256` "
        "(and `--cases qwen3-30b-layer,dsv3-slice`), then `" + c["command"] + "` (writes "
        "`moecompress/estimate/coefficients.json`, this file and `reports/scale_bench.ops.fit.json`).",
        "",
        *[st["note"] + "\n" for st in rep["stores"] if st.get("note")],
        "## Measured (CPU s, peak RSS)",
        "",
    ]
    runs: dict = {}
    for store in rep["stores"]:
        runs.update(store["runs"])
    label = lambda r: r["case"] + (f" ({r['samples']}x{r['seq_len']})" if r["samples"] != 16 else "")  # noqa: E731
    cases = list(dict.fromkeys(label(r) for r in runs.values()))
    ops = [o for o in OPS if any(r["op"] == o for r in runs.values())]
    lines += ["| case | " + " | ".join(ops) + " |", "|---|" + "---|" * len(ops)]
    for case in cases:
        cells = []
        for op in ops:
            r = next((r for r in runs.values() if r["op"] == op and label(r) == case), None)
            if r is None:
                cells.append("-")
            elif "cpu_s" in r and not r.get("failed"):
                cells.append(f"{r['cpu_s']:.1f} s, {r['peak_rss_bytes'] / 2**30:.2f} GiB")
            else:
                cells.append(r.get("stopped") or r.get("skipped") or "failed")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    ok_h = sum(abs(x["host_err"]) <= 0.3 for x in rep["check"])
    ok_t = sum(abs(x["time_err"]) <= 0.3 for x in rep["check"])
    loo = [x for x in rep["check"] if x.get("loo_host_err") is not None]
    lo_h = sum(abs(x["loo_host_err"]) <= 0.3 for x in loo)
    lo_t = sum(abs(x["loo_time_err"]) <= 0.3 for x in loo)
    n = len(rep["check"])
    pct = lambda v: "-" if v is None else f"{v:+.0%}"  # noqa: E731
    lines += [
        "",
        "## Predicted vs measured (target: within 30%)",
        "",
        f"Fit on all runs: host {ok_h}/{n}, time {ok_t}/{n} within 30%. Leave-one-out (each run predicted by a fit "
        f"on the others, where its variant has other runs): host {lo_h}/{len(loo)}, time {lo_t}/{len(loo)}.",
        "",
        "| run | peak RSS measured | predicted | error | leave-one-out | CPU s measured | predicted | error | "
        "leave-one-out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rep["check"]:
        lines.append(
            f"| {x['run']} | {_gib(x['measured_host'])} | {_gib(x['predicted_host'])} | {x['host_err']:+.0%} | "
            f"{pct(x.get('loo_host_err'))} | {x['measured_s']:.1f} | {x['predicted_s']:.1f} | {x['time_err']:+.0%} | "
            f"{pct(x.get('loo_time_err'))} |"
        )
    lines += [
        "",
        "## Predicted for flagship models (`--device cuda`, one 80 GB GPU + 256 GB host)",
        "",
        "Peak host and GPU memory, activation-cache disk, and time on ONE CPU thread (GPU time is not measured: no "
        "GPU in these runs; the CPU figure is an upper bound). The GPU column assumes the layer, its per-expert "
        "state and the unspilled activation cache live on the GPU. `moecompress plan MODEL --samples 128 --seq-len "
        "2048 --device cuda --gpu-memory 80GB --host-memory 256GB` prints the same for any config.json.",
        "",
        "| model | tokens | op | host | GPU | cache disk | time (1 CPU thread) | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in rep["flagships"]:
        lines.append(
            f"| {f['model']} | {f['tokens']} | {f['op']} | {_gib(f['host_bytes'])} | {_gib(f['gpu_bytes'])} | "
            f"{_gib(f['disk_bytes']) if f['disk_bytes'] else '-'} | {_dur(f['cpu_thread_s'])} ({f['time_class']}) | "
            f"{'yes' if f['fits_80GB_gpu_256GB_host'] else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fit":
        ap = argparse.ArgumentParser(description="fit the cost model")
        ap.add_argument("--fit", action="store_true")
        ap.add_argument("--stores", default=str(ROOT / "reports" / "scale_bench.ops.json"))
        ap.add_argument("--out", default=str(ROOT / "reports" / "scale_bench.ops"))
        ap.add_argument(
            "--mac-per-s", type=float, default=None,
            help="one thread's multiply-add rate the time priors use (default: measured now; pass the last fit's "
            "mac_per_s from coefficients.json to compare two fits without the machine's load moving it)",
        )  # fmt: skip
        ap.add_argument(
            "--clip-per-s", type=float, default=None,
            help="one thread's rate of weights through RTN's clip search, the clip term's prior (default: measured "
            "now; pass the last fit's clip_per_s to compare fits)",
        )  # fmt: skip
        fit_and_report(ap.parse_args())
    elif len(sys.argv) > 1 and sys.argv[1] == "--status":
        ap = argparse.ArgumentParser(description="flagship cases against issue 13's memory bound")
        ap.add_argument("--status", action="store_true")
        ap.add_argument("--stores", required=True, help="comma list of sweep stores, oldest first")
        ap.add_argument("--out", default=str(ROOT / "reports" / "scale_status"))
        status(ap.parse_args())
    elif len(sys.argv) > 1 and sys.argv[1] == "--ops-sweep":
        ap = argparse.ArgumentParser(description="per-operation sweep")
        ap.add_argument("--ops-sweep", action="store_true")
        ap.add_argument("--cases", default="E16,E64,E128,E256")
        ap.add_argument("--ops", default=",".join(OPS))
        ap.add_argument("--samples", type=int, default=16)
        ap.add_argument("--seq-len", type=int, default=256)
        ap.add_argument("--cpu-cap", type=float, default=900.0)
        ap.add_argument("--rss-cap-gib", type=float, default=8.0)
        ap.add_argument("--skip-factor", type=float, default=1.5, help="skip an op predicted above cap x this")
        ap.add_argument("--work", default=None, help="folder for the synthetic checkpoints (default: $TMPDIR)")
        ap.add_argument("--code", default=str(ROOT), help="checkout whose moecompress runs (e.g. the code before)")
        ap.add_argument("--out", default=str(ROOT / "reports" / "scale_bench.ops"))
        ops_sweep(ap.parse_args())
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    elif len(sys.argv) > 2 and sys.argv[1] == "--render-only":  # --render-only PREFIX: rewrite PREFIX.md
        Path(sys.argv[2] + ".md").write_text(render_md(json.loads(Path(sys.argv[2] + ".json").read_text())))
    else:
        main()
