"""Expert-pruning benchmark: which score removes the least quality at 25% and 50%, and what refitting adds?

For each ratio and method (frequency, routing-mass, REAP, random [several seeds], output-error), prune with one
shared profile, then measure against the unpruned model on held-out text: KL(base || pruned), top-1 agreement,
per-domain perplexity (moecompress.core.evaluate.evaluate), parameters and bytes on disk. Output-error also runs with
each ``--refits`` compensation (router rows; router rows + down projections refitted on calibration tokens after
the removal). Also explains the REAP vs frequency outcome: how similar their rankings are and what REAP keeps
that frequency drops.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_bench.py                # built-in model
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_bench.py --model M --max-windows 4 --methods reap,output-error

Writes reports/prune_bench.json and reports/prune_bench.md (or --out PREFIX).

``--cost-experts 128,256`` measures instead what pruning costs next to a profile (issue 13's bar: the default
pruning <= 2x a profile): synthetic bf16 Qwen3-MoE checkpoints as in bench/scale_bench.py (2 layers, hidden 512,
width 256, top-8; ``profile_bench.synthetic_checkpoint``), 4,096 calibration tokens, each command in a fresh
one-thread process (``scale_bench.run_cmd``: CPU seconds user + system, imports included); ``profile`` and
``prune --ratio R --refit X`` (profiling included, as a user runs it) repeated ``--cost-reps`` times interleaved,
the least CPU time of each kept.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_bench.py --cost-experts 128,256 --refits none,down,router+down \
        --out reports/prune_bench.cost
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moecompress.core import loading
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.evaluate import evaluate
from moecompress.profile.run import Profile, run_profile
from moecompress.prune.run import prune_model
from moecompress.prune.transform import DEFAULT_REFIT, REFITS, PruneOptions

METHODS = ("frequency", "routing-mass", "reap", "random", "output-error")
PER_LAYER = ("reap", "output-error")  # also run with --layout per-layer (global ranking, loads via moecompress.load)
loading.register_loader("per-layer", "moecompress.prune.load:load_per_layer")  # until loading.py registers it


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def ranking_diagnostics(prof: Profile, runs: dict[str, dict]) -> dict:
    """How REAP and frequency differ on this model's profile."""
    rho, cv, overlap = [], [], {}
    for l in prof.moe_layers:
        f, r = prof.layer(l, "frequency").double(), prof.layer(l, "reap").double()
        rho.append(spearman(f, r))
        cv.append(float(f.std() / f.mean()))
    for key, run in runs.items():
        if not key.startswith("reap@") or run["layout"] != "uniform":
            continue
        other = runs.get(key.replace("reap@", "frequency@"))
        if other:
            a = [set(v["removed"]) for v in run["manifest_layers"].values()]
            b = [set(v["removed"]) for v in other["manifest_layers"].values()]
            same = sum(len(x & y) for x, y in zip(a, b, strict=True))
            overlap[key.split("@")[1]] = same / max(sum(len(x) for x in a), 1)
    # REAP = mean over routed tokens of p * ||f||: it ignores how often an expert is routed to
    f_all = torch.cat([prof.layer(l, "frequency") for l in prof.moe_layers]).double()
    r_all = torch.cat([prof.layer(l, "reap") for l in prof.moe_layers]).double()
    mass = torch.cat([prof.layer(l, "routing_mass") for l in prof.moe_layers]).double()
    # domain specialization: share of an expert's routed tokens that come from its most frequent domain
    spec = {l: None for l in prof.moe_layers}
    for l in prof.moe_layers:
        dc = prof.layer(l, "domain_counts").double()  # [D, E]
        spec[l] = dc.max(0).values / dc.sum(0).clamp_min(1)  # [E]
    specialization = {"all experts": float(torch.cat(list(spec.values())).mean())}
    for key, run in runs.items():
        if (
            run["layout"] == "uniform"
            and run.get("refit", "none") == "none"
            and run["method"] in ("frequency", "reap", "output-error")
        ):
            vals = [float(spec[int(l)][e]) for l, v in run["manifest_layers"].items() for e in v["removed"]]
            specialization[f"removed by {key}"] = sum(vals) / len(vals)
    return {
        "top_domain_share": {k: round(v, 3) for k, v in specialization.items()},
        "spearman_reap_vs_frequency_per_layer": [round(x, 3) for x in rho],
        "frequency_coefficient_of_variation_per_layer": [round(x, 3) for x in cv],
        "removed_set_overlap_reap_vs_frequency": {k: round(v, 3) for k, v in overlap.items()},
        "spearman_reap_vs_frequency_all": round(spearman(f_all, r_all), 3),
        "spearman_routing_mass_vs_frequency_all": round(spearman(f_all, mass), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows for the shared profile")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=4, help="eval windows per domain")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--error-tokens", type=int, default=4096)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of methods to run")
    ap.add_argument("--refits", default=",".join(REFITS), help="refits to run with output-error (none = plain)")
    ap.add_argument("--per-layer", default=",".join(PER_LAYER), help="methods also run with --layout per-layer")
    ap.add_argument("--out", default="reports/prune_bench")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json of an earlier run")
    ap.add_argument("--cost-experts", default="", help="measure prune vs profile CPU time at these expert counts")
    ap.add_argument("--cost-reps", type=int, default=2, help="interleaved repetitions per command (least kept)")
    ap.add_argument("--cost-ratio", type=float, default=0.25, help="--ratio of the cost runs")
    args = ap.parse_args()
    if args.cost_experts:
        rep = json.loads(Path(args.out + ".json").read_text()) if args.render_only else cost_runs(args)
        if not args.render_only:
            Path(args.out + ".json").write_text(json.dumps(rep, indent=2) + "\n")
        Path(args.out + ".md").write_text(render_cost_md(rep))
        print(render_cost_md(rep))
        return
    if args.render_only:
        Path(args.out + ".md").write_text(render_md(json.loads(Path(args.out + ".json").read_text()), args))
        return
    t0 = time.time()
    ckpt = Checkpoint(args.model)
    base = ckpt.path
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    try:
        prof_dir = work / "profile"
        prof = run_profile(base, prof_dir, "mixed", args.samples, args.seq_len, 0, 8)
        ev = dict(seq_len=args.seq_len, max_windows=args.max_windows)
        base_eval = evaluate(base, base, **ev)
        runs: dict[str, dict] = {}
        for ratio in (float(r) for r in args.ratios.split(",")):
            methods = [m for m in args.methods.split(",") if m]
            refits = [r for r in args.refits.split(",") if r]
            plan = [
                (m, "uniform", s, r)
                for m in methods
                for s in (range(args.random_seeds) if m == "random" else [0])
                for r in (refits if m == "output-error" else ["none"])
            ]
            plan += [(m, "per-layer", 0, "none") for m in args.per_layer.split(",") if m in methods]
            for method, layout, seed, refit in plan:
                key = f"{method}@{ratio}" + (f"#seed{seed}" if method == "random" else "")
                key += "/per-layer" if layout == "per-layer" else ""
                key += f"+refit={refit}" if refit != "none" else ""
                out = work / key.replace("@", "_").replace("#", "_").replace("/", "_").replace("+", "_")
                opts = PruneOptions(ratio, method, layout, seed=seed, error_tokens=args.error_tokens, refit=refit)
                t1 = time.time()
                man = prune_model(base, out, opts, prof_dir).stage("prune")
                prune_s = time.time() - t1
                res = evaluate(out, base, **ev)
                runs[key] = {
                    "method": method, "layout": layout, "ratio": ratio, "seed": seed, "refit": refit,
                    "prune_s": round(prune_s, 2), "refit_layer_errors": man.get("refit_layer_errors"),
                    "kl_to_base": res["kl_to_base"], "top1_agreement": res["top1_agreement"],
                    "perplexity": res["perplexity"], "params": res["params"], "bytes": res["bytes"],
                    "experts_after": man["experts_after"], "protected": man["protected"],
                    "experts_per_layer": [v["num_experts"] for v in man["layers"].values()],
                    "manifest_layers": {l: {"removed": v["removed"]} for l, v in man["layers"].items()},
                }  # fmt: skip
                print(f"{key:40s} KL {res['kl_to_base']:.4f} top1 {res['top1_agreement']:.4f} "
                      f"ppl {res['perplexity']['all']:.2f} ({prune_s:.1f}s prune)", flush=True)  # fmt: skip
        diag = ranking_diagnostics(prof, runs)
        report = {
            "model": str(base),
            "model_fingerprint": ckpt.fingerprint,
            "calibration": prof.meta["calibration"],
            "super_experts": prof.meta["super_experts"],
            "eval": {"data": "mixed", **ev},
            "default_refit": DEFAULT_REFIT,
            "base": {"perplexity": base_eval["perplexity"], "params": base_eval["params"], "bytes": base_eval["bytes"]},
            "runs": runs,
            "diagnostics": diag,
            "elapsed_s": round(time.time() - t0, 1),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
        md = render_md(report, args)
        Path(args.out + ".md").write_text(md)
        print(md)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cost_runs(args: argparse.Namespace) -> dict:
    """CPU seconds of profile and of prune with each refit on synthetic checkpoints (see the module docstring)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_bench import synthetic_checkpoint
    from scale_bench import ROOT, run_cmd

    t0 = time.time()
    refits = [r for r in args.refits.split(",") if r]
    shape = {"layers": 2, "hidden": 512, "width": 256, "top_k": 8}
    rep: dict = {"shape": shape, "samples": 16, "seq_len": 256, "ratio": args.cost_ratio, "reps": args.cost_reps,
                 "default_refit": DEFAULT_REFIT, "experts": {}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="prune-cost-"))
    try:
        for E in (int(e) for e in args.cost_experts.split(",")):
            model = work / f"E{E}"
            synthetic_checkpoint(model, shape["layers"], shape["hidden"], E, shape["width"], shape["top_k"])
            common = ["--samples", "16", "--seq-len", "256", "--device", "cpu", "--overwrite"]
            plan = [("profile", ["profile", str(model), "-o", str(work / "p"), *common])]
            plan += [(f"prune --refit {rf}", ["prune", str(model), "--ratio", str(args.cost_ratio), "--refit", rf,
                                              "-o", str(work / "o"), *common]) for rf in refits]  # fmt: skip
            cpu: dict[str, list[float]] = {}
            for _ in range(args.cost_reps):
                for name, argv in plan:
                    res = run_cmd(ROOT, argv, 1800)
                    cpu.setdefault(name, []).append(res["cpu_s"])
                    print(f"E={E} {name:24s} {res['cpu_s']:.1f} CPU s, {res['peak_rss_bytes'] / 2**30:.2f} GiB",
                          flush=True)  # fmt: skip
            prof = min(cpu["profile"])
            rep["experts"][str(E)] = {
                name: {"cpu_s": min(v), "all_cpu_s": v, "x_profile": round(min(v) / prof, 3)} for name, v in cpu.items()
            }
            shutil.rmtree(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep["elapsed_s"] = round(time.time() - t0, 1)
    return rep


def render_cost_md(rep: dict) -> str:
    names = list(next(iter(rep["experts"].values())))
    sh = rep["shape"]
    lines = [
        "# What expert pruning costs next to a profile",
        "",
        f"Synthetic bf16 Qwen3-MoE ({sh['layers']} layers, hidden {sh['hidden']}, width {sh['width']}, "
        f"top-{sh['top_k']}), {rep['samples']} x {rep['seq_len']} calibration tokens, `prune --ratio {rep['ratio']}` "
        f"(profiling included). CPU seconds (user + system, one thread, fresh process, imports included), least of "
        f"{rep['reps']} interleaved runs; x profile in brackets. Default refit: `{rep['default_refit']}`. "
        f"Total {rep['elapsed_s']:.0f} s wall (shared machine: compare within a row).",
        "",
        "| E | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for E, row in rep["experts"].items():
        lines.append(f"| {E} | " + " | ".join(f"{row[n]['cpu_s']:.1f} ({row[n]['x_profile']:.2f}x)" for n in names)
                     + " |")  # fmt: skip
    lines += ["", "All runs (CPU s): " + "; ".join(
        f"E{E} {n}: {row[n]['all_cpu_s']}" for E, row in rep["experts"].items() for n in names), ""]  # fmt: skip
    return "\n".join(lines)


def _avg(rows: list[dict]) -> dict:
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("kl_to_base", "top1_agreement")}
    out["perplexity"] = {d: sum(r["perplexity"][d] for r in rows) / len(rows) for d in rows[0]["perplexity"]}
    out.update({k: rows[0][k] for k in ("params", "bytes", "experts_per_layer", "method", "ratio", "layout")})
    out["prune_s"] = sum(r["prune_s"] for r in rows) / len(rows)
    return out


def render_md(rep: dict, args: argparse.Namespace) -> str:
    doms = list(rep["base"]["perplexity"])
    lines = [
        f"# Expert pruning on {'the built-in model' if args.model is None else Path(args.model).name}",
        "",
        f"Model `{rep['model']}`; shared profile: {rep['calibration']['samples']} windows x "
        f"{rep['calibration']['seq_len']} tokens of `mixed`; eval: {rep['eval']['max_windows']} held-out windows "
        f"per domain x {rep['eval']['seq_len']} tokens. Super experts (protected): {rep['super_experts'] or 'none'}. "
        + (f"random = mean of {args.random_seeds} seeds. " if "random" in args.methods else "")
        + "Uniform layout unless marked per-layer. "
        f"Total {rep['elapsed_s']:.0f}s.",
        "",
        "Reproduce: `OMP_NUM_THREADS=1 .venv/bin/python bench/prune_bench.py"
        + (f" --model {args.model}" if args.model else "")
        + f" --max-windows {args.max_windows} --samples {args.samples}"
        + (f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "")
        + (f" --refits {args.refits}" if args.refits != ",".join(REFITS) else "")
        + (f" --per-layer '{args.per_layer}'" if args.per_layer != ",".join(PER_LAYER) else "")
        + (f" --random-seeds {args.random_seeds}" if args.random_seeds != 3 else "")
        + (f" --out {args.out}" if args.out != "reports/prune_bench" else "")
        + "`",
        "",
        "| ratio | method | experts/layer | KL(base‖pruned) | top-1 agree | " + " | ".join(f"ppl {d}" for d in doms)
        + " | params | bytes | prune s |",
        "|---|---|---|---|---|" + "---|" * len(doms) + "---|---|---|",
        "| 0 | base | - | 0 | 1 | " + " | ".join(f"{rep['base']['perplexity'][d]:.2f}" for d in doms)
        + f" | {rep['base']['params']:,} | {rep['base']['bytes']:,} | - |",
    ]  # fmt: skip
    groups: dict[tuple[float, str], list[dict]] = {}
    for r in rep["runs"].values():
        name = r["method"] + (" (per-layer)" if r["layout"] == "per-layer" else "")
        name += f" + refit {r['refit']}" if r.get("refit", "none") != "none" else ""
        groups.setdefault((r["ratio"], name), []).append(r)
    best: dict[float, tuple[str, float]] = {}
    for (ratio, method), rows in groups.items():
        a = _avg(rows)
        if ratio not in best or a["kl_to_base"] < best[ratio][1]:
            best[ratio] = (method, a["kl_to_base"])
        counts = a["experts_per_layer"]
        per = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
        lines.append(
            f"| {ratio:g} | {method} | {per} | {a['kl_to_base']:.4f} | {a['top1_agreement']:.4f} | "
            + " | ".join(f"{a['perplexity'][d]:.2f}" for d in doms)
            + f" | {a['params']:,} | {a['bytes']:,} | {a['prune_s']:.1f} |"
        )
    lines += ["", "Lowest KL: " + "; ".join(f"{r:g}: {m} ({kl:.4f})" for r, (m, kl) in sorted(best.items())), ""]
    d = rep["diagnostics"]
    for ratio in sorted(best):
        plain = groups.get((ratio, "output-error"))
        for rf in [r for r in REFITS if r != "none"]:
            fitted = groups.get((ratio, f"output-error + refit {rf}"))
            if plain and fitted:
                a, b = _avg(plain)["kl_to_base"], _avg(fitted)["kl_to_base"]
                lines.append(
                    f"- ratio {ratio:g}: refit {rf} changes output-error KL by {b / a - 1:+.1%} ({a:.4f} -> {b:.4f})."
                )
        if (ratio, "reap") not in groups or (ratio, "frequency") not in groups:
            continue
        reap = _avg(groups[(ratio, "reap")])["kl_to_base"]
        freq = _avg(groups[(ratio, "frequency")])["kl_to_base"]
        verdict = "beats" if reap < freq else "does not beat"
        lines.append(f"- ratio {ratio:g}: REAP {verdict} frequency (KL {reap:.4f} vs {freq:.4f}).")
    lines += [
        "",
        "Diagnostics (REAP = mean over an expert's routed tokens of p * ||f||; it does not weigh how often the "
        "expert is routed to, frequency does):",
        f"- Spearman(REAP, frequency) per layer: {d['spearman_reap_vs_frequency_per_layer']}",
        f"- coefficient of variation of frequency per layer: {d['frequency_coefficient_of_variation_per_layer']}",
        f"- share of removed experts that REAP and frequency agree on: {d['removed_set_overlap_reap_vs_frequency']}",
        f"- Spearman(routing mass, frequency) over all experts: {d['spearman_routing_mass_vs_frequency_all']}",
        f"- mean share of an expert's tokens from its top domain (specialization): {d['top_domain_share']}",
        "",
        "Bytes are the safetensors files; params count every tensor (tied embeddings once). prune s: wall-clock "
        "seconds of prune_model with the shared profile (machines are noisy: compare within one run).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
