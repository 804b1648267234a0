"""Quality claims at realistic expert counts: the built-in model re-cut into 64 or 128 finer experts.

The built-in model (Qwen3-MoE, 16 experts of width 128, top-2, bf16) becomes a model with E' = 16 s experts of width
128 / s (s = 4 -> 64 experts, s = 8 -> 128): expert e's neurons are split into s disjoint consecutive sets, each
set a sub-expert with e's router row (repeated s times), top-k becomes 2 s, and each sub-expert's down projection
is multiplied by s. Why it is the same function: the s copies of e have equal logits, so top-2s picks every copy
of the top-2 experts; each copy's softmax weight is p_e / s (renormalized: w_e / s), and the s sub-experts' outputs
sum to e's output, hence s x (w_e / s) x sum = w_e f_e. The builder checks that the re-cut model's logits equal the
original's (fp32 forward, max |difference| printed and recorded). With ``--perturb EPS`` every copied router row
gets Gaussian noise of EPS x that row's standard deviation, so the sub-experts of one expert are no longer always
routed together (their routing diverges as real fine-grained experts' does); the KL of the perturbed model to the
original is recorded, and every compressed model is then compared with the perturbed model it came from.

Then, on each re-cut model: prune 25% / 50% (default output-error without and with each ``--refits``), and with
``--extra`` merge 0.25 and quantize 3 bits; KL(re-cut || compressed) and top-1 agreement on held-out windows,
CPU seconds of each command (fresh process, one thread).

    OMP_NUM_THREADS=1 .venv/bin/python bench/many_experts.py --splits 4,8 --perturb 0.05 [--extra]
    OMP_NUM_THREADS=1 .venv/bin/python bench/many_experts.py --build 4 --perturb 0.05 --out-model DIR   # only build

Writes reports/many_experts.json and reports/many_experts.md (or --out PREFIX).
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

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "moecompress" / "builtin" / "model"
COUNT_KEYS = ("num_experts", "num_local_experts")


def build(src: Path, dest: Path, s: int, perturb: float = 0.0, seed: int = 0) -> dict:
    """Write ``src`` (a per-expert Qwen3-MoE folder) re-cut into s x E experts of width I / s to ``dest``."""
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "qwen3_moe":
        raise SystemExit(f"{src}: the builder knows the qwen3_moe layout only (found {cfg.get('model_type')!r})")
    E = next(int(cfg[k]) for k in COUNT_KEYS if k in cfg)
    width = int(cfg["moe_intermediate_size"])
    if width % s:
        raise SystemExit(f"expert width {width} does not split into {s} equal parts")
    w = width // s
    gen = torch.Generator().manual_seed(seed)
    files = sorted(src.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{src}: expected one safetensors file, found {len(files)}")
    tensors = load_file(str(files[0]))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj = rest.split(".", 1)
            for i in range(s):
                part = slice(i * w, (i + 1) * w)
                key = f"{prefix}.mlp.experts.{int(e) * s + i}.{proj}"
                if proj.startswith("down_proj"):
                    out[key] = (t[:, part].float() * s).to(t.dtype).contiguous()  # s is a power of two: exact
                else:
                    out[key] = t[part].contiguous()
        elif name.endswith(".mlp.gate.weight"):
            rows = t.float().repeat_interleave(s, dim=0)  # [E s, H]: each expert's row s times
            if perturb > 0:
                scale = rows.std(dim=1, keepdim=True) * perturb
                rows = rows + torch.randn(rows.shape, generator=gen) * scale
            out[name] = rows.to(t.dtype).contiguous()
        else:
            out[name] = t
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, dest / f.name)
    for k in COUNT_KEYS:
        if k in cfg:
            cfg[k] = E * s
    cfg["num_experts_per_tok"] = int(cfg["num_experts_per_tok"]) * s
    cfg["moe_intermediate_size"] = w
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(out, str(dest / files[0].name), metadata={"format": "pt"})
    return {"experts": E * s, "width": w, "top_k": cfg["num_experts_per_tok"], "perturb": perturb, "seed": seed}


@torch.no_grad()
def logits_gap(a: Path, b: Path, windows: int = 4, seq_len: int = 128) -> float:
    """max |logits_a - logits_b| (fp32 forward with transformers) on random token windows."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(1, 8000, (windows, seq_len), generator=torch.Generator().manual_seed(0))
    la = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()(ids).logits
    lb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).eval()(ids).logits
    return float((la - lb).abs().max())


def cli(argv: list[str]) -> float:
    """Run ``moecompress ARGV`` in a fresh one-thread process; its CPU seconds (user + system of the child)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOECOMPRESS_QUIET": "1"}
    before = os.times()
    out = subprocess.run([sys.executable, "-m", "moecompress.cli.main", *argv], env=env, capture_output=True, text=True)
    after = os.times()
    if out.returncode:
        raise RuntimeError(f"moecompress {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return round((after.children_user - before.children_user) + (after.children_system - before.children_system), 2)


def kl(model: Path, base: Path, work: Path, max_windows: int) -> dict:
    dest = work / f"eval-{model.name}.json"
    cli(["eval", str(model), "--base", str(base), "--json", str(dest), "--max-windows", str(max_windows),
         "--device", "cpu"])  # fmt: skip
    e = json.loads(dest.read_text())
    dest.unlink()
    return {"kl": e["kl_to_base"], "top1": e["top1_agreement"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="4,8", help="s per re-cut model: 4 -> 64 experts, 8 -> 128")
    ap.add_argument("--perturb", type=float, default=0.05, help="router-row noise, x each row's std (0: exact)")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--refits", default="none,down", help="prune --refit values to compare")
    ap.add_argument("--extra", action="store_true", help="also merge --ratio 0.25 and quantize --bits 3")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--build", type=int, default=None, help="only build the model of this split (with --out-model)")
    ap.add_argument("--out-model", type=Path, default=None)
    ap.add_argument("--out", default=str(ROOT / "reports" / "many_experts"))
    args = ap.parse_args()
    if args.build is not None:
        if args.out_model is None:
            raise SystemExit("--build needs --out-model DIR")
        info = build(BUILTIN, args.out_model, args.build, args.perturb)
        print(json.dumps({**info, "max_logit_gap_vs_builtin": logits_gap(BUILTIN, args.out_model)}))
        return
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="many-experts-"))
    rep: dict = {"source": str(BUILTIN), "perturb": args.perturb, "samples": args.samples,
                 "max_windows": args.max_windows, "models": {}}  # fmt: skip
    try:
        for s in (int(v) for v in args.splits.split(",")):
            exact, model = work / f"x{s}-exact", work / f"x{s}"
            info = build(BUILTIN, exact, s)
            row: dict = {**info, "exact_max_logit_gap": logits_gap(BUILTIN, exact)}
            if args.perturb > 0:
                build(BUILTIN, model, s, args.perturb)
                row["perturbed_vs_builtin"] = kl(model, BUILTIN, work, args.max_windows)
            else:
                model = exact
            print(f"E={info['experts']}: exact re-cut max |dlogit| {row['exact_max_logit_gap']:.2e}; "
                  f"perturbed vs built-in {row.get('perturbed_vs_builtin')}", flush=True)  # fmt: skip
            shutil.rmtree(exact) if model != exact else None
            prof = work / f"prof{s}"
            row["profile_cpu_s"] = cli(["profile", str(model), "-o", str(prof), "--samples", str(args.samples),
                                        "--device", "cpu"])  # fmt: skip
            runs: dict = {}
            plan = [(f"prune {r:g} refit {rf}", ["prune", "--ratio", f"{r:g}", "--refit", rf, "--profile", str(prof)])
                    for r in (float(v) for v in args.ratios.split(",")) for rf in args.refits.split(",")]  # fmt: skip
            if args.extra:
                plan += [("merge 0.25", ["merge", "--ratio", "0.25", "--profile", str(prof)]),
                         ("quantize 3 bits", ["quantize", "--bits", "3"])]  # fmt: skip
            for name, argv in plan:
                out = work / f"out{s}"
                cpu = cli([argv[0], str(model), *argv[1:], "-o", str(out), "--samples", str(args.samples),
                           "--device", "cpu"])  # fmt: skip
                runs[name] = {"cpu_s": cpu, **kl(out, model, work, args.max_windows)}
                print(f"E={info['experts']} {name:28s} KL {runs[name]['kl']:.4f} top1 {runs[name]['top1']:.4f} "
                      f"({cpu:.1f} CPU s)", flush=True)  # fmt: skip
                shutil.rmtree(out)
            row["runs"] = runs
            rep["models"][str(info["experts"])] = row
            shutil.rmtree(model, ignore_errors=True)
            rep["elapsed_s"] = round(time.time() - t0, 1)
            write(rep, args)  # after each model: a long run stopped early keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render_md(rep, args))


def write(rep: dict, args: argparse.Namespace) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(rep, indent=2) + "\n")
    Path(args.out + ".md").write_text(render_md(rep, args))


def render_md(rep: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Realistic expert counts: the built-in model re-cut into finer experts",
        "",
        f"Each of the 16 experts (width 128, top-2) split into s disjoint neuron sets (router row repeated, top-k x s, "
        f"down x s; `bench/many_experts.py::build`). Router rows perturbed by {rep['perturb']} x their std so the "
        f"sub-experts' routing diverges. Calibration {rep['samples']} windows x 256 tokens (profile shared by the "
        f"prune runs); KL(re-cut || compressed) on {rep['max_windows']} held-out windows per domain; CPU s of a "
        f"fresh one-thread process. Total {rep['elapsed_s']:.0f} s (wall, shared machine).",
        "",
        f"Reproduce: `OMP_NUM_THREADS=1 .venv/bin/python bench/many_experts.py --splits {args.splits} --perturb "
        f"{args.perturb} --refits {args.refits} --samples {args.samples} --max-windows {args.max_windows}"
        + (" --extra" if args.extra else "") + "`",
        "",
        "| experts (width, top-k) | exact re-cut max abs dlogit | perturbed vs built-in KL | run | KL | top-1 | CPU s "
        "| x profile |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for E, m in rep["models"].items():
        head = (f"{E} ({m['width']}, top-{m['top_k']})", f"{m['exact_max_logit_gap']:.1e}",
                f"{m['perturbed_vs_builtin']['kl']:.4f}" if "perturbed_vs_builtin" in m else "-")  # fmt: skip
        lines.append(f"| {head[0]} | {head[1]} | {head[2]} | profile | - | - | {m['profile_cpu_s']:.1f} | 1 |")
        for name, r in m["runs"].items():
            lines.append(f"| | | | {name} | {r['kl']:.4f} | {r['top1']:.4f} | {r['cpu_s']:.1f} | "
                         f"{r['cpu_s'] / m['profile_cpu_s']:.2f} |")  # fmt: skip
    lines.append("")
    for E, m in rep["models"].items():
        runs = m["runs"]
        for r in (float(v) for v in args.ratios.split(",")):
            plain = runs.get(f"prune {r:g} refit none")
            for rf in args.refits.split(","):
                fit = runs.get(f"prune {r:g} refit {rf}")
                if rf != "none" and plain and fit:
                    lines.append(f"- E={E}, ratio {r:g}: refit {rf} changes KL by {fit['kl'] / plain['kl'] - 1:+.1%} "
                                 f"({plain['kl']:.4f} -> {fit['kl']:.4f}).")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
