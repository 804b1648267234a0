"""Quantization benchmark on the built-in model: uniform 4/3/2 bits vs LP bit plans at 4.0/3.0/2.5 average bits
(equal routed-expert bytes), RTN vs GPTQ, layer- and expert-granular plans. KL to the base model, top-1 agreement and
per-domain held-out perplexity through moecompress.evaluate; real bytes on disk; whether transformers loads the
uniform outputs with the same logits as moecompress.load.

One calibration pass per method measures every expert at every width; all plans reuse it
(run_quantize(measurement=...)), so each row is the real `moecompress quantize` output of that plan.
Attention stays at 16 bits (--other-bits 16) so the rows differ only in the routed experts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_bench.py            # writes reports/quant_bench.json + .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MOECOMPRESS_QUIET", "1")

from moecompress import loading  # noqa: E402
from moecompress.checkpoint import Checkpoint  # noqa: E402
from moecompress.evaluate import evaluate  # noqa: E402
from moecompress.quantize import measure_model, run_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANS = (
    ("uniform 4", "uniform", 4, "layer"),
    ("uniform 3", "uniform", 3, "layer"),
    ("uniform 2", "uniform", 2, "layer"),
    ("lp-layer 4.0", "lp", 4.0, "layer"),
    ("lp-layer 3.0", "lp", 3.0, "layer"),
    ("lp-layer 2.5", "lp", 2.5, "layer"),
    ("lp-expert 4.0", "lp", 4.0, "expert"),
    ("lp-expert 3.0", "lp", 3.0, "expert"),
    ("lp-expert 2.5", "lp", 2.5, "expert"),
)


_RSS = """
import resource, sys, torch
from moecompress import loading
loading.register_loader("quantized", "moecompress.quant.load:load_quantized")
m = loading.load(sys.argv[1])
with torch.no_grad():
    m(input_ids=torch.zeros(8, 256, dtype=torch.long))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]  # this process only (ru_maxrss
print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""  # survives exec and would include the parent's size)


def peak_rss(path: str | Path) -> int:
    """Peak RSS (bytes) of a fresh process that loads a folder with moecompress.load and runs one 8x256 forward."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _RSS, str(path)], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def hf_matches(out: Path, ids: torch.Tensor) -> bool | str:
    """transformers' from_pretrained (compressed-tensors) gives the same logits as moecompress's loader."""
    from transformers import AutoModelForCausalLM

    from moecompress.quant.load import load_quantized

    a = load_quantized(out, dtype=torch.bfloat16)
    try:
        b = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager", dtype=torch.bfloat16)
        with torch.no_grad():
            return bool(torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits))
    except Exception as err:  # noqa: BLE001 - record what transformers does with this layout
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows per domain")
    ap.add_argument("--plans", default="all", help="comma-separated plan names, or all")
    ap.add_argument("--md-only", action="store_true", help="re-render reports/quant_bench.md from the JSON")
    ap.add_argument("--report-dir", default=str(ROOT / "reports"), help="where quant_bench.json/.md go")
    args = ap.parse_args()
    if args.md_only:
        res = json.loads((Path(args.report_dir) / "quant_bench.json").read_text())
        (Path(args.report_dir) / "quant_bench.md").write_text(markdown(res))
        return
    torch.manual_seed(0)
    loading.register_loader("quantized", "moecompress.quant.load:load_quantized")  # until loading.py wires it
    ckpt = Checkpoint(args.model)
    model = str(ckpt.path)
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    plans = PLANS if args.plans == "all" else tuple(p for p in PLANS if p[0] in args.plans.split(","))
    t0 = time.time()
    base_ev = evaluate(model, None, "mixed", args.seq_len, 8, torch.device("cpu"), args.eval_windows)
    rows = [
        {
            "config": "base (bf16)",
            "method": "-",
            "bytes": base_ev["bytes"],
            "routed_bytes": sum(
                v["shape"][0] * v["shape"][1] * 2 for k, v in ckpt.tensor_info().items() if ".experts." in k
            ),
            "perplexity": base_ev["perplexity"],
            "kl_to_base": 0.0,
            "top1_agreement": 1.0,
            "process_peak_rss_bytes": base_ev["peak_memory_bytes"],
            "load_forward_peak_rss_bytes": peak_rss(model),
        }
    ]
    measure_s = {}
    ids = torch.randint(0, ckpt.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    try:
        for method in args.methods.split(","):
            m = measure_model(model, method, samples=args.samples, seq_len=args.seq_len)
            measure_s[method] = round(m["elapsed_s"], 1)
            print(f"{method}: measured {len(m['meas']['codes'])} (layer, width) code sets in {m['elapsed_s']:.1f}s")
            for name, plan, bits, gran in plans:
                out = work / f"{method}-{name.replace(' ', '-')}"
                t1 = time.time()
                bp = run_quantize(
                    model, out, bits=bits, plan=plan, method=method, granularity=gran, other_bits=16,
                    overwrite=True, measurement=m,
                )  # fmt: skip
                q_s = time.time() - t1
                ev = evaluate(out, model, "mixed", args.seq_len, 8, torch.device("cpu"), args.eval_windows)
                row = {
                    "config": name,
                    "method": method,
                    "plan": plan,
                    "granularity": gran,
                    "target_bits": bits,
                    "average_bits": round(bp["average_bits_routed"], 4),
                    "width_counts": bp["width_counts"],
                    "layer_bits": {l: d["bits"] for l, d in bp["layers"].items()},
                    "routed_bytes": bp["routed_bytes"],
                    "budget_bytes_routed": bp["budget_bytes_routed"],
                    "bytes": ev["bytes"],
                    "predicted_cost": bp["predicted_cost"],
                    "lp_solve_s": (bp["solver"] or {}).get("solve_s"),
                    "quantize_write_s": round(q_s, 2),
                    "perplexity": ev["perplexity"],
                    "kl_to_base": ev["kl_to_base"],
                    "top1_agreement": ev["top1_agreement"],
                    "process_peak_rss_bytes": ev["peak_memory_bytes"],  # max over the whole bench process so far
                    "few_token_experts": len(bp["few_token_experts"]),
                }
                row["transformers_loads_same_logits"] = hf_matches(out, ids)
                if method == args.methods.split(",")[-1] and name in ("uniform 4", "uniform 2", "lp-expert 2.5"):
                    row["load_forward_peak_rss_bytes"] = peak_rss(out)
                rows.append(row)
                print(
                    f"{method:5s} {name:14s} avg {row['average_bits']:.3f} bits  routed {row['routed_bytes']:>9,} B  "
                    f"KL {row['kl_to_base']:.4f}  top1 {row['top1_agreement']:.3f}  ppl {row['perplexity']['all']:.2f}"
                )
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmd = command_line(vars(args))
    result = {
        "command": cmd,
        "args": vars(args),
        "model": model,
        "model_fingerprint": ckpt.fingerprint,
        "train_step": _train_step(ckpt.path),
        "calibration": {"set": "mixed", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "eval": {"set": "mixed (held-out split)", "windows_per_domain": args.eval_windows, "seq_len": args.seq_len},
        "other_bits": 16,
        "measure_s": measure_s,
        "elapsed_s": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "rows": rows,
    }
    rep = Path(args.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "quant_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (rep / "quant_bench.md").write_text(markdown(result))
    print(markdown(result))


def command_line(args: dict) -> str:
    """The command that reproduces a run, from its recorded arguments."""
    defaults = {"model": None, "methods": "rtn,gptq", "samples": 16, "seq_len": 256, "eval_windows": 8, "plans": "all"}
    # --report-dir is where the files go, not part of the measurement
    extra = "".join(
        f" --{k.replace('_', '-')} {json.dumps(v) if ' ' in str(v) else v}"
        for k, v in args.items()
        if k in defaults and v != defaults[k]
    )
    return "OMP_NUM_THREADS=1 .venv/bin/python bench/quant_bench.py" + extra


def _train_step(path: Path) -> int | None:
    """Training step of an intermediate checkpoint (training/work/ckpt writes train_log.json), else None."""
    f = Path(path) / "train_log.json"
    return json.loads(f.read_text()).get("step") if f.exists() else None


def markdown(res: dict) -> str:
    doms = [d for d in res["rows"][0]["perplexity"] if d != "all"]
    head = ["config", "method", "avg bits", "routed bytes", "file bytes", "KL to base", "top-1", "ppl all"] + [
        f"ppl {d}" for d in doms
    ]
    lines = [
        "# Quantization benchmark",
        "",
        f"Model: `{res['model']}` (fingerprint {res['model_fingerprint'][:12]}"
        + (f", training step {res['train_step']}" if res.get("train_step") else "")
        + ").",
        f"Command: `{command_line(res['args'])}` ({res['elapsed_s']} s on {res['machine']['platform']}, "
        f"{res['machine']['threads']} thread(s)).",
        f"Calibration: {res['calibration']['samples']} windows x {res['calibration']['seq_len']} tokens (mixed); "
        f"evaluation: {res['eval']['windows_per_domain']} held-out windows per domain. Attention, norms, router, "
        "embeddings at 16 bits; only routed experts are quantized. LP plans have the same routed-expert byte budget "
        "as the uniform plan of that many bits (2.5: payload 2.5 bits/weight plus the same scale overhead).",
        f"One calibration pass per method (seconds): {res['measure_s']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in res["rows"]:
        cells = [
            r["config"],
            r["method"],
            f"{r.get('average_bits', 16):.3g}",
            f"{r.get('routed_bytes', 0):,}",
            f"{r['bytes']:,}",
            f"{r['kl_to_base']:.2e}",
            f"{r['top1_agreement']:.3f}",
            f"{r['perplexity']['all']:.2f}",
        ] + [f"{r['perplexity'][d]:.2f}" for d in doms]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    mem = [r for r in res["rows"] if r.get("load_forward_peak_rss_bytes")]
    if mem:
        lines += [
            "Peak RSS of a fresh process that loads the folder with `moecompress.load` (float32, CPU) and runs one "
            "8 x 256 forward: "
            + ", ".join(f"{r['config']} ({r['method']}): {r['load_forward_peak_rss_bytes'] / 1e6:.0f} MB" for r in mem)
            + ". On CPU the loader dequantizes to dense weights, so the saving is on disk, not in RAM.",
            "",
        ]
    hf = [r for r in res["rows"] if "transformers_loads_same_logits" in r]
    if hf:
        lines += [
            "Does `AutoModelForCausalLM.from_pretrained` (transformers, compressed-tensors) give the same logits as "
            "`moecompress.load` (exact by construction)?",
            "",
            "| config | method | widths used | same logits |",
            "|---|---|---|---|",
        ]
        for r in hf:
            used = ", ".join(f"{n}x{b}b" for b, n in r["width_counts"].items() if n)
            lines.append(f"| {r['config']} | {r['method']} | {used} | {r['transformers_loads_same_logits']} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
