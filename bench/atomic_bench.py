"""Atomic (channel) pruning vs expert pruning (built-in model or --model), at the same parameter reduction.

At 25% of routed-expert parameters:
  - atomic HEAPr (full G), uniform width (every expert keeps its top 96 of 128 channels) and exact (global ranking);
  - atomic by activation magnitude only (m_{e,j}), uniform and exact;
  - atomic HEAPr with cheaper G (diag, low-rank) and with the score weighted by expert frequency, exact;
  - compensation, each part separately: + least-squares refit of the kept down_proj columns on the unpruned
    model's activations (every layer independently), and + refit layer by layer on the already-pruned earlier
    layers (sequential, the default of `prune --granularity atom`), for HEAPr and magnitude, both layouts;
  - expert-level REAP: drop round(25% E) experts per layer with the lowest REAP saliency (from the profile).
Reports KL(base || pruned) and top-1 agreement on held-out text, per-domain perplexity, and how closely the
rankings from diag / low-rank G agree with the full-G ranking. Writes reports/atomic_bench.{json,md}.

    OMP_NUM_THREADS=1 .venv/bin/python bench/atomic_bench.py [--model PATH] [--samples 64] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from moecompress.calibration.sets import calibration_set, eval_set, load_tokenizer

from moecompress.atomic.compensate import Compensation
from moecompress.atomic.gradstats import bytes_per_expert
from moecompress.atomic.heapr import heapr_scores, ranking_agreement
from moecompress.atomic.load import load_exact_atomic
from moecompress.atomic.run import gradient_pass, load_model, write_atomic
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.evaluate import logit_agreement
from moecompress.core.writer import dir_bytes, write_checkpoint
from moecompress.profile.run import build_profile, collect

RATIO = 0.25


def expert_prune(ckpt: Checkpoint, out: Path, drop: dict[int, list[int]], n_drop: int) -> dict:
    """Expert-level pruning written with the core writer (same count per layer; routers sliced)."""
    fam, E, H = ckpt.family, ckpt.num_experts, ckpt.config.hidden_size
    patterns = [fam.routed_key_pattern(l) for l in drop]

    def tensors():
        for key in ckpt.keys():
            if not any(p.match(key) for p in patterns):
                yield key, ckpt.get(key)
        for l, d in drop.items():
            w = ckpt.moe_weights(l).select([e for e in range(E) if e not in d])
            yield from fam.write_layer(w, l).items()

    config = ckpt.config.to_dict()
    config.update(fam.expert_count_updates(E - n_drop))
    I = ckpt.moe_weights(ckpt.moe_layers[0]).down.shape[-1]
    removed = sum(len(d) for d in drop.values()) * (3 * H * I + H)
    manifest = {"command": "bench expert prune", "layout": "uniform", "method": "reap", "params_removed": removed}
    write_checkpoint(out, tensors(), config, ckpt.side_files(), manifest)
    return {"params_removed": removed, "params_removed_fraction_of_all": removed / ckpt.num_params}


@torch.no_grad()
def evaluate_model(model, base, eval_tokens, batch_size: int = 8) -> dict:
    doms = eval_tokens.domain_names
    nll = {d: 0.0 for d in doms}
    cnt = {d: 0 for d in doms}
    kl_sum = agree_sum = 0.0
    n = 0
    ids_all = eval_tokens.input_ids
    for s in range(0, ids_all.shape[0], batch_size):
        ids = ids_all[s : s + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()  # [B, S-1, V]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, S-1]
        for r in range(ids.shape[0]):
            d = eval_tokens.domains[s + r]
            nll[d] += tok[r].sum().item()
            cnt[d] += tok.shape[1]
        if base is not None:
            kl, agree = logit_agreement(base(input_ids=ids).logits[:, :-1], logits)
            kl_sum += kl.sum().item()
            agree_sum += agree.sum().item()
            n += kl.numel()
    ppl = {d: float(torch.tensor(nll[d] / cnt[d]).exp()) for d in doms}
    ppl["all"] = float(torch.tensor(sum(nll.values()) / sum(cnt.values())).exp())
    return {"perplexity": ppl, "kl_to_base": kl_sum / n if n else 0.0, "top1_agreement": agree_sum / n if n else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (profile + gradient pass)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows per domain")
    ap.add_argument("--ranks", default="8,32", help="low-rank sketch ranks to compare with full G")
    ap.add_argument("--out", default="reports/atomic_bench", help="writes OUT.json and OUT.md")
    ap.add_argument("--quick", action="store_true", help="only the compensation variants and REAP (skip G sketches)")
    ap.add_argument("--combine", nargs="+", default=None, help="JSON reports of single runs -> OUT.{json,md}")
    args = ap.parse_args()
    if args.combine:
        runs = [json.loads(Path(p).read_text()) for p in args.combine]
        Path(args.out + ".json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
        Path(args.out + ".md").write_text("\n\n".join(render_md(r) for r in runs) + "\n")
        print(Path(args.out + ".md").read_text())
        return
    os.environ.setdefault("MOECOMPRESS_QUIET", "1")
    torch.manual_seed(0)
    t_start = time.time()
    ckpt = Checkpoint(args.model)
    fam, layers, E, H = ckpt.family, ckpt.moe_layers, ckpt.num_experts, ckpt.config.hidden_size
    tok = load_tokenizer(ckpt.path)
    calib = calibration_set(tok, "mixed", args.samples, args.seq_len, seed=0)
    evals = eval_set(tok, "mixed", args.seq_len, max_windows=args.eval_windows)
    timings: dict[str, float] = {}

    t = time.time()
    prof = build_profile(ckpt, calib, collect(ckpt, calib), 0.0)
    timings["profile_s"] = time.time() - t
    supers = [tuple(x) for x in prof.super_experts]
    m = {l: prof.layer(l, "channel_sq_mean").float() for l in layers}
    counts = {l: prof.layer(l, "tokens").double() for l in layers}

    net = load_model(ckpt.path)
    G: dict[str, dict] = {}
    t = time.time()
    full = gradient_pass(net, fam, layers, calib.input_ids, "full")
    timings["gradient_pass_full_s"] = time.time() - t
    G["full"] = {l: s.G for l, s in full.items()}
    G["diag"] = {l: torch.diagonal(s.G, dim1=1, dim2=2).clone() for l, s in full.items()}  # = the diag accumulator
    ranks = [int(r) for r in args.ranks.split(",") if r] if not args.quick else []
    for r in ranks:
        t = time.time()
        low = gradient_pass(net, fam, layers, calib.input_ids, "lowrank", rank=r)
        timings[f"gradient_pass_lowrank{r}_s"] = time.time() - t
        G[f"lowrank{r}"] = {l: s.G for l, s in low.items()}
    down = {l: ckpt.moe_weights(l).down.float() for l in layers}
    scores = {k: {l: heapr_scores(m[l], down[l], g[l]) for l in layers} for k, g in G.items()}
    scores["magnitude"] = {l: m[l].double() for l in layers}
    T = calib.num_tokens
    scores["full_freq"] = {l: scores["full"][l] * (counts[l] / T)[:, None] for l in layers}

    agreement = {
        k: ranking_agreement([scores["full"][l] for l in layers], [scores[k][l] for l in layers], RATIO)
        for k in ["diag", *[f"lowrank{r}" for r in ranks], "magnitude", "full_freq"]
        if k in scores
    }
    memory = {
        name: {kind: bytes_per_expert(kind, h, rank=32) for kind in ("full", "diag", "lowrank")}
        for name, h in (("builtin_H256", H), ("qwen3_30b_H2048", 2048))
    }

    base = load_model(ckpt.path)
    rows = []
    t = time.time()
    base_eval = evaluate_model(base, None, evals)
    rows.append({"variant": "base (no pruning)", "params_removed_fraction_of_all": 0.0, **base_eval})
    I = m[layers[0]].shape[1]
    uniform_ok = (I - round(RATIO * I)) // 16 * 16 not in (0, I)
    variants = []
    for key, label in (("full", "HEAPr full G"), ("magnitude", "magnitude m only")):
        for layout in ("uniform", "exact") if uniform_ok else ("exact",):
            variants += [
                (f"atomic {label}, {layout}", key, layout, None),
                (f"atomic {label}, {layout}, +refit (unpruned inputs)", key, layout, False),
                (f"atomic {label}, {layout}, +refit sequential (default)", key, layout, True),
            ]
    if not args.quick:
        variants += [
            ("atomic HEAPr diag G, exact", "diag", "exact", None),
            *[(f"atomic HEAPr low-rank r={r} G, exact", f"lowrank{r}", "exact", None) for r in ranks[-1:]],
            ("atomic HEAPr full G x expert frequency, exact", "full_freq", "exact", None),
        ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, key, layout, seq in variants:
            out = Path(tmp) / f"{key}_{layout}_{seq}"
            comp = None if seq is None else Compensation(calib.input_ids, sequential=seq)
            t = time.time()
            man = write_atomic(ckpt, out, scores[key], RATIO, layout, supers, {"method": key}, compensation=comp)
            build_s = time.time() - t
            if layout == "uniform":
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(
                    out, dtype=torch.float32, experts_implementation="eager"
                ).eval()
            else:
                model = load_exact_atomic(out)
            res = evaluate_model(model, base, evals)
            rows.append(
                {
                    "variant": name,
                    "routed_params_removed_fraction": man["routed_channels_removed_fraction"],
                    "params_removed_fraction_of_all": man["params_removed_fraction_of_all"],
                    "experts_emptied": sum(len(v) for v in man["experts_removed_from_routing"].values()),
                    "bytes": dir_bytes(out),
                    "compensation": None if seq is None else ("sequential" if seq else "unpruned inputs"),
                    "write_s": round(build_s, 1),
                    **res,
                }
            )
            print(f"{name}: KL {res['kl_to_base']:.4f} ppl {res['perplexity']['all']:.2f}", flush=True)
        safe = {l: [e for e in range(E) if (l, e) not in supers] for l in layers}
        n_drop = round(RATIO * E)
        drop = {
            l: sorted(sorted(safe[l], key=lambda e, _l=l: float(prof.layer(_l, "reap")[e]))[:n_drop]) for l in layers
        }
        out = Path(tmp) / "reap"
        info = expert_prune(ckpt, out, drop, n_drop)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
        res = evaluate_model(model, base, evals)
        rows.append(
            {
                "variant": f"expert-level REAP (drop {n_drop}/{E} per layer)",
                "routed_params_removed_fraction": n_drop / E,
                "params_removed_fraction_of_all": info["params_removed_fraction_of_all"],
                "experts_emptied": sum(len(d) for d in drop.values()),
                "bytes": dir_bytes(out),
                "dropped_experts": {str(l): d for l, d in drop.items()},
                **res,
            }
        )
        print(f"REAP: KL {res['kl_to_base']:.4f} ppl {res['perplexity']['all']:.2f}", flush=True)
    timings["eval_all_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start

    report = {
        "command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python bench/atomic_bench.py", *__import__("sys").argv[1:]]),
        "model": str(ckpt.path),
        "model_fingerprint": ckpt.fingerprint,
        "ratio_of_routed_expert_params": RATIO,
        "calibration": calib.describe(),
        "eval": {"windows": int(evals.input_ids.shape[0]), "seq_len": args.seq_len, "domains": evals.domain_names},
        "super_experts": [list(x) for x in supers],
        "rows": rows,
        "ranking_agreement_vs_full_G": agreement,
        "g_bytes_per_expert_fp32": memory,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text(render_md(report) + "\n")
    print(render_md(report))


def render_md(rep: dict) -> str:
    doms = rep["eval"]["domains"]
    lines = [
        f"# Atomic pruning benchmark: {model_name(rep['model'])}",
        "",
        f"Command: `{rep.get('command', 'OMP_NUM_THREADS=1 .venv/bin/python bench/atomic_bench.py')}`.",
        "",
        f"Model `{rep['model']}` (fingerprint {rep['model_fingerprint'][:12]}), "
        f"{rep['ratio_of_routed_expert_params']:.0%} of routed-expert parameters removed. "
        f"Calibration: {rep['calibration']['samples']} x {rep['calibration']['seq_len']} tokens (mixed); "
        f"eval: {rep['eval']['windows']} held-out windows of {rep['eval']['seq_len']}. "
        f"Super experts protected: {rep['super_experts'] or 'none found'}.",
        "",
        "| variant | routed removed | all params removed | KL to base | top-1 agree | ppl all | "
        + " | ".join(f"ppl {d}" for d in doms)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(doms),
    ]
    for r in rep["rows"]:
        rr = r.get("routed_params_removed_fraction")
        lines.append(
            f"| {r['variant']} | {'' if rr is None else f'{rr:.1%}'} | {r['params_removed_fraction_of_all']:.1%} | "
            f"{r['kl_to_base']:.4f} | {r['top1_agreement']:.3f} | {r['perplexity']['all']:.2f} | "
            + " | ".join(f"{r['perplexity'][d]:.2f}" for d in doms)
            + " |"
        )
    lines += ["", "Ranking agreement with full-G HEAPr scores (all routed channels of all layers):", ""]
    keys = list(next(iter(rep["ranking_agreement_vs_full_G"].values())))
    lines.append("| score | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for name, a in rep["ranking_agreement_vs_full_G"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a[k]:.3f}" for k in keys) + " |")
    lines += ["", "G memory per expert (fp32 bytes; low-rank r=32; accumulating / stored):", ""]
    lines.append("| model | full | diag | lowrank r=32 |")
    lines.append("|---|---|---|---|")
    for name, mem in rep["g_bytes_per_expert_fp32"].items():
        cells = [f"{mem[k]['accumulating']:,} / {mem[k]['stored']:,}" for k in ("full", "diag", "lowrank")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in rep["timings_s"].items())]
    return "\n".join(lines)


def model_name(path: str) -> str:
    return "built-in model" if Path(path).parent.name == "builtin" else Path(path).name


if __name__ == "__main__":
    main()
