"""Benchmark expert merging against REAP expert pruning at the same expert count.

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_bench.py            # built-in model, ratios 0.25 and 0.5
    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_bench.py --model DIR --quick   # the default and its parts

The default merge (``choose``) measures, per cluster, keep-the-dominant-expert (= pruning), subspace merge and
frequency-weighted average, each with and without a least-squares down refit to the layer output, over the
k-means clustering and the pruning-anchored one, and keeps the lowest routed-output error; each layer is
calibrated on the already-merged earlier layers. Its parts: "choose, original inputs" (not sequential) and
"choose, keep only" (no merge candidates: pruning + down refit). "before" variants are the previous default
(k-means + aligned subspace merge + member-target refit, every layer on the original model's activations).

For each ratio: subspace merge (k-means on output similarity, neuron alignment, Sub-MoE SVD merge at several
rank fractions), the same without alignment, with the plain averaged router instead of the fitted one, and with
the least-squares down-projection refit (the CLI default); HC-SMoE-style average merge (hierarchical clustering
on mean outputs + frequency-weighted average, no alignment) with and without the refit; and expert pruning
through the project's `prune` API on the same profile: REAP (drop the lowest-saliency experts) and output-error.
Every variant has the same expert count per layer. Metrics vs the base model: KL(base || model) and top-1
agreement on held-out windows, per-domain perplexity, and greedy-generation match (token-wise and common prefix).
Writes reports/merge_bench.json and reports/merge_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("MOECOMPRESS_QUIET", "1")

from moecompress.calibration.sets import (
    eval_set,  # noqa: E402
    load_tokenizer,  # noqa: E402
)

from moecompress.core.checkpoint import Checkpoint, resolve_model  # noqa: E402
from moecompress.core.evaluate import evaluate  # noqa: E402
from moecompress.core.loading import load  # noqa: E402
from moecompress.core.writer import dir_bytes  # noqa: E402
from moecompress.merge.run import MergeOptions, merge_model  # noqa: E402
from moecompress.profile.run import run_profile  # noqa: E402
from moecompress.prune.run import prune_model  # noqa: E402
from moecompress.prune.transform import PruneOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation [N, new_tokens] of equal-length prompts [N, P] (no EOS stop, full re-forward)."""
    ids = prompts
    for _ in range(new_tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)  # [N, 1]
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompts.shape[1] :]


def generation_match(base_gen: torch.Tensor, gen: torch.Tensor) -> tuple[float, float]:
    """(token-wise match rate, mean common-prefix fraction) of greedy continuations [N, G]."""
    same = (base_gen == gen).float()  # [N, G]
    prefix = same.cumprod(dim=1).sum(dim=1) / gen.shape[1]  # [N]
    return float(same.mean()), float(prefix.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--rank-fractions", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (profile and merge)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=8, help="eval windows per domain")
    ap.add_argument("--gen-prompts", type=int, default=4, help="greedy prompts per domain")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/moecompress-merge-bench")
    ap.add_argument("--report", default=str(ROOT / "reports" / "merge_bench"))
    ap.add_argument("--render-only", action="store_true", help="rewrite REPORT.md from REPORT.json and exit")
    ap.add_argument("--quick", action="store_true", help="only the default, its parts, the previous default, pruning")
    ap.add_argument("--only", nargs="+", default=None, help="run only the variants with these names")
    ap.add_argument(
        "--align-block",
        type=int,
        nargs="+",
        default=[],
        help="also the default merge with neuron "
        "alignment in blocks of at most N neurons (merge/align.py's bounded matching; exact: the width)",
    )
    ap.add_argument("--combine", nargs="+", default=None, help="JSON reports of single runs -> REPORT.{json,md}")
    args = ap.parse_args()
    if args.combine:
        runs = [json.loads(Path(p).read_text()) for p in args.combine]
        Path(args.report + ".json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
        args.render_only = True
    if args.render_only:
        report = json.loads(Path(args.report + ".json").read_text())
        text = "\n".join(render(r) for r in report.get("runs", [report]))
        Path(args.report + ".md").write_text(text)
        print(text)
        return
    torch.manual_seed(0)
    t_start = time.time()
    base = resolve_model(args.model)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t0 = time.time()
    prof = run_profile(base, work / "profile", "mixed", args.samples, args.seq_len, 0, 8, torch.device("cpu"), 256)
    profile_s = time.time() - t0
    print(f"profile: {profile_s:.1f}s, super experts {prof.super_experts}", flush=True)

    # Greedy prompts: the first tokens of held-out windows, gen_prompts per domain.
    tok = load_tokenizer(base)
    ev = eval_set(tok, "mixed", args.prompt_len, None)
    rows = [i for d in ev.domain_names for i in [j for j, x in enumerate(ev.domains) if x == d][: args.gen_prompts]]
    prompts = ev.input_ids[rows]  # [N, P]
    base_model = load(base, "cpu")
    base_gen = greedy(base_model, prompts, args.gen_tokens)
    del base_model

    def measure(name: str, path: Path, ratio: float | None, extra: dict[str, Any]) -> dict[str, Any]:
        t = time.time()
        res = evaluate(path, base, "mixed", args.seq_len, 8, torch.device("cpu"), args.max_windows)
        m = load(path, "cpu")
        tok_match, prefix = generation_match(base_gen, greedy(m, prompts, args.gen_tokens))
        row = {
            "variant": name,
            "ratio": ratio,
            "experts": Checkpoint(path).num_experts,
            "kl_to_base": res["kl_to_base"],
            "top1_agreement": res["top1_agreement"],
            "perplexity": res["perplexity"],
            "gen_token_match": tok_match,
            "gen_prefix_match": prefix,
            "bytes": dir_bytes(path),
            "params": res["params"],
            "eval_s": round(time.time() - t, 1),
            **extra,
        }
        print(
            f"{name:28s} E={row['experts']:3d} KL={row['kl_to_base']:.4f} top1={row['top1_agreement']:.4f} "
            f"ppl={row['perplexity']['all']:.2f} gen={tok_match:.3f}/{prefix:.3f} bytes={row['bytes']:,}",
            flush=True,
        )
        return row

    results = [measure("base", base, None, {"build_s": 0.0})]
    for ratio in args.ratios:
        old = dict(choose=False, sequential=False)  # the previous pipeline: one merge kind, original activations
        variants: list[tuple[str, MergeOptions]] = [
            ("choose (default)", MergeOptions(ratio=ratio)),
            ("choose, original inputs", MergeOptions(ratio=ratio, sequential=False)),
            ("choose, keep only", MergeOptions(ratio=ratio, candidates=("keep", "keep+refit"))),
            ("subspace r=1 +refit (before)", MergeOptions(ratio=ratio, **old)),
        ]
        variants += [(f"choose, align block {b}", MergeOptions(ratio=ratio, align_block=b)) for b in args.align_block]
        if not args.quick:
            for rf in args.rank_fractions:  # subspace: k-means on output similarity + aligned Sub-MoE SVD merge
                rank_fraction = None if rf == 1 else rf
                opts = MergeOptions(ratio=ratio, rank_fraction=rank_fraction, refit=False, **old)
                variants.append((f"subspace r={rf:g}", opts))
            variants += [
                ("subspace r=1 no-align", MergeOptions(ratio=ratio, align=False, refit=False, **old)),
                ("subspace r=1 router=avg", MergeOptions(ratio=ratio, router="average", refit=False, **old)),
                ("average (HC-SMoE)", MergeOptions(ratio=ratio, method="average", **old)),
                ("average +refit", MergeOptions(ratio=ratio, method="average", refit=True, **old)),
            ]
        for name, opts in variants:
            if args.only and name not in args.only:
                continue
            out = work / f"{''.join(c if c.isalnum() or c in '.-' else '_' for c in name)}-{ratio}"
            t = time.time()
            man = merge_model(base, out, opts, work / "profile", "mixed", args.samples, args.seq_len, 8,
                              torch.device("cpu"), overwrite=True).stage("merge")  # fmt: skip
            sims = [v["mean_within_cluster_similarity"] for v in man["layers"].values()]
            extra = {
                "build_s": round(time.time() - t, 1),
                "choices": {l: v.get("choices") for l, v in man["layers"].items()} if opts.choose else None,
                "clustering": {l: v.get("clustering") for l, v in man["layers"].items()} if opts.choose else None,
                "mean_within_cluster_similarity": round(sum(s for s in sims if s is not None) / len(sims), 4),
                "max_cluster_size": max(max(v["cluster_sizes"]) for v in man["layers"].values()),
            }
            results.append(measure(name, out, ratio, extra))
        prunes = (
            ("reap", None, "REAP prune"),
            ("output-error", None, "output-error prune (default)"),  # its default refit: down
            ("output-error", "none", "output-error prune, no refit (before)"),
        )
        for method, refit, label in prunes:
            if args.only and label not in args.only:
                continue
            out = work / f"prune-{method}-{refit}-{ratio}"
            t = time.time()
            popts = PruneOptions(ratio=ratio, method=method, refit=refit)
            prune_model(base, out, popts, work / "profile", "mixed", args.samples, args.seq_len, 8,
                        torch.device("cpu"), overwrite=True)  # fmt: skip
            results.append(measure(label, out, ratio, {"build_s": round(time.time() - t, 1)}))

    report = {
        "command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python bench/merge_bench.py", *sys.argv[1:]]),
        "model": str(base),
        "model_fingerprint": Checkpoint(base).fingerprint,
        "settings": vars(args),
        "greedy_prompts": len(prompts),
        "profile_s": round(profile_s, 1),
        "total_s": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report + ".json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    Path(args.report + ".md").write_text(text)
    print(text)


def render(report: dict[str, Any]) -> str:
    """The markdown table and the measured effects, from the JSON report only."""
    results = report["results"]
    st = report["settings"]
    doms = [d for d in results[0]["perplexity"] if d != "all"]
    base_bytes = results[0]["bytes"]
    lines = [
        f"# Expert merging vs expert pruning: {model_name(report['model'])}",
        "",
        f"Model: `{report['model']}` ({results[0]['experts']} experts/layer, {base_bytes:,} bytes). "
        f"Command: `{report['command']}` ({report['total_s']:.0f} s on CPU, {report['threads']} thread(s)).",
        "",
        f"Eval: {st['max_windows']} held-out windows x {st['seq_len']} tokens per domain; greedy generation: "
        f"{report.get('greedy_prompts', '?')} prompts of {st['prompt_len']} tokens, {st['gen_tokens']} new tokens; "
        "gen tok / gen prefix = token-wise match / common-prefix fraction vs the base model's continuation. "
        f"Calibration and profile: {st['samples']} windows x {st['seq_len']} tokens of `mixed` (calib split).",
        "",
        "| ratio | variant | experts | KL | top-1 | ppl all | " + " | ".join(f"ppl {d}" for d in doms)
        + " | gen tok | gen prefix | bytes | size vs base |",
        "|---|---|---|---|---|---|" + "---|" * len(doms) + "---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        ppl = " | ".join(f"{r['perplexity'][d]:.2f}" for d in doms)
        lines.append(
            f"| {r['ratio'] if r['ratio'] is not None else '-'} | {r['variant']} | {r['experts']} | "
            f"{r['kl_to_base']:.4f} | {r['top1_agreement']:.4f} | {r['perplexity']['all']:.2f} | {ppl} | "
            f"{r['gen_token_match']:.3f} | {r['gen_prefix_match']:.3f} | {r['bytes']:,} | "
            f"{r['bytes'] / base_bytes:.1%} |"
        )
    lines += ["", "Measured effects (KL to base; lower is better):", ""]
    for ratio in sorted({r["ratio"] for r in results if r["ratio"] is not None}):
        by = {r["variant"]: r for r in results if r["ratio"] == ratio}

        def kl(name: str, by: dict[str, Any] = by) -> float | None:
            return by[name]["kl_to_base"] if name in by else None

        pairs = [
            ("truncation (subspace r=1 -> r=0.5)", "subspace r=1", "subspace r=0.5"),
            ("neuron alignment (off -> on)", "subspace r=1 no-align", "subspace r=1"),
            ("router fit (average rows -> fit)", "subspace r=1 router=avg", "subspace r=1"),
            ("down refit, subspace (off -> on)", "subspace r=1", "subspace r=1 +refit (before)"),
            ("down refit, HC-SMoE average (off -> on)", "average (HC-SMoE)", "average +refit"),
            ("clustering, no alignment (HC-SMoE -> k-means)", "average (HC-SMoE)", "subspace r=1 no-align"),
            ("merge vs REAP prune (REAP -> previous merge)", "REAP prune", "subspace r=1 +refit (before)"),
            ("previous merge -> choose (default)", "subspace r=1 +refit (before)", "choose (default)"),
            (
                "sequential calibration (original inputs -> merged earlier layers)",
                "choose, original inputs",
                "choose (default)",
            ),
            ("merge candidates (keep/keep+refit only -> all)", "choose, keep only", "choose (default)"),
            *[
                (f"exact neuron matching -> blocks of {b}", "choose (default)", f"choose, align block {b}")
                for b in st.get("align_block", [])
            ],
            ("merge vs pruning (output-error prune -> choose)", "output-error prune (default)", "choose (default)"),
            (
                "pruning refit (no refit -> default down refit)",
                "output-error prune, no refit (before)",
                "output-error prune (default)",
            ),
        ]
        if by.get("choose (default)", {}).get("choices"):
            d = by["choose (default)"]
            picks = "; ".join(f"{l}: {d['clustering'][l]} {','.join(c)}" for l, c in d["choices"].items())
            lines.append(f"- ratio {ratio}, choose (default) per layer (clustering, choice per cluster): {picks}")
        best = min((r for r in results if r["ratio"] == ratio), key=lambda r: r["kl_to_base"])
        lines.append(f"- ratio {ratio}: lowest KL {best['variant']} ({best['kl_to_base']:.4f}).")
        for label, a, b in pairs:
            ka, kb = kl(a), kl(b)
            if ka is not None and kb is not None:
                lines.append(f"  - {label}: {ka:.4f} -> {kb:.4f}")
    return "\n".join(lines) + "\n"


def model_name(path: str) -> str:
    return "built-in model" if Path(path).parent.name == "builtin" else Path(path).name


if __name__ == "__main__":
    main()
