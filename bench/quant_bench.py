"""Quantization benchmark: moecompress GPTQ (act-order, sequential, clipping search) and its LP bit plans against
uniform widths, an ablation of each GPTQ choice, and llm-compressor's GPTQ run on the same calibration windows,
evaluated by the same script on the same held-out windows (KL to the base model, top-1 agreement, perplexity).

Per model (``--model``, repeatable; default the built-in model):
- one calibration pass of the default pipeline measures every expert at every width and the per-layer sensitivity
  probes; all plans reuse it (``run_quantize(measurement=...)``), so every row is the real output of that plan;
- LP plans at equal routed-expert bytes with the KL-predicting cost (default) and with the old cost (block-output
  error); the rank correlation (Spearman) between each plan's predicted KL and its measured KL, over all plans;
- ``--ablations``: GPTQ without act-order / sequential / with other scale searches, at 4 and 3 bits;
- ``--with-llmcompressor``: llm-compressor's GPTQModifier on the routed experts only, group size as ours, at its
  best setting (``moe_calibrate_all_experts=False``: each expert's Hessian from its routed tokens; its default
  ``actorder="static"``) and at its defaults; installed into a separate venv (``--llmc-venv``) created on first
  use (llm-compressor pins transformers <= 5.17). Its output files have exactly our byte count.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_bench.py --ablations --with-llmcompressor \\
        --model builtin --model ../shared/validation/stories260k-moe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MOECOMPRESS_QUIET", "1")

from moecompress.calibration.sets import (
    calibration_set,  # noqa: E402
    load_tokenizer,  # noqa: E402
)

from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.evaluate import evaluate  # noqa: E402
from moecompress.quant.layer import GPTQOptions, expert_group_sizes  # noqa: E402
from moecompress.quant.run import (  # noqa: E402
    OPTIONS,
    PROBE_WIDTHS,
    Layout,
    measure_model,
    option_sensitivity,
    run_quantize,
)

ROOT = Path(__file__).resolve().parents[1]
# (name, plan, bits, granularity, cost model)
PLANS = (
    ("uniform 4", "uniform", 4, "layer", "kl"),
    ("uniform 3", "uniform", 3, "layer", "kl"),
    ("uniform 2", "uniform", 2, "layer", "kl"),
    ("lp-layer 3.0", "lp", 3.0, "layer", "kl"),
    ("lp-layer 2.5", "lp", 2.5, "layer", "kl"),
    ("lp-expert 3.5", "lp", 3.5, "expert", "kl"),
    ("lp-expert 3.0", "lp", 3.0, "expert", "kl"),
    ("lp-expert 2.5", "lp", 2.5, "expert", "kl"),
    ("lp-expert 3.0, block-error cost", "lp", 3.0, "expert", "err"),
)
ABLATIONS = (  # each row adds one choice (damping 0.03 throughout; refine=False until its row)
    (
        "before: natural order, original-weight Hessians",
        GPTQOptions(False, False, "mse", propagate=False, weighted=False, refine=False),
    ),
    ("+ act-order", GPTQOptions(True, False, "mse", propagate=False, weighted=False, refine=False)),
    ("+ act-order + sequential", GPTQOptions(True, True, "mse", propagate=False, weighted=False, refine=False)),
    (
        "+ act-order + sequential + H-weighted scales",
        GPTQOptions(True, True, "hmse", propagate=False, weighted=False, refine=False),
    ),
    ("+ ... + router-weighted Hessians", GPTQOptions(True, True, "hmse", propagate=False, weighted=True, refine=False)),
    (
        "+ ... + least-squares scale refinement (= default)",
        GPTQOptions(True, True, "hmse", propagate=False, weighted=True, refine=True),
    ),
    ("default + propagation through the quantized layers", GPTQOptions(propagate=True)),
)
LLMC_SETTINGS = (
    ("llm-compressor best (routed-only calibration, actorder static)", False),
    ("llm-compressor defaults (all experts calibrated)", True),
)
LLMC_PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1", "transformers<=5.17")

LLMC_RUNNER = r"""
import json, sys, time
from pathlib import Path
import torch
cfg = json.loads(Path(sys.argv[1]).read_text())
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
torch.manual_seed(0)
dtype = getattr(torch, cfg["dtype"])
ids = torch.load(cfg["ids"])  # [N, S]: moecompress's calibration windows
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)  # fp32 forward, as ours
tok = AutoTokenizer.from_pretrained(cfg["model"])
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
def args(g):
    return QuantizationArgs(num_bits=cfg["bits"], type="int", symmetric=True, strategy="group", group_size=g,
                            scale_dtype=dtype)
groups = {  # routed experts only (attention, routers, lm_head stay as they are), our group sizes
    "gate_up": QuantizationScheme(targets=[r"re:.*experts\.\d+\.(gate_proj|up_proj|w1|w3)$"], weights=args(cfg["g_h"])),
    "down": QuantizationScheme(targets=[r"re:.*experts\.\d+\.(down_proj|w2)$"], weights=args(cfg["g_i"])),
}
recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])  # its default actorder ("static"), dampening 0.01
t0 = time.time()
oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], moe_calibrate_all_experts=cfg["all_experts"], output_dir=None)
elapsed = time.time() - t0
model = model.to(dtype)  # scales are already rounded to dtype (scale_dtype): stored as ours
model.save_pretrained(cfg["out"], save_compressed=True)
tok.save_pretrained(cfg["out"])
print("RESULT " + json.dumps({"elapsed_s": elapsed, "version": llmcompressor.__version__}))
"""


def ensure_llmc_venv(venv: Path) -> Path:
    """The llm-compressor venv's python, creating and installing it on first use."""
    py, marker = venv / "bin" / "python", venv / "moecompress-pins.txt"
    if not (py.exists() and marker.exists() and marker.read_text() == "\n".join(LLMC_PINS)):
        print(f"installing llm-compressor into {venv} (a few minutes) ...", flush=True)
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *LLMC_PINS], check=True)
        marker.write_text("\n".join(LLMC_PINS))
    return py


def run_llmc(py: Path, model: str, ids: torch.Tensor, bits: int, all_experts: bool, out: Path, lay: Layout, dtype):
    work = out.parent
    torch.save(ids.clone(), work / "llmc_ids.pt")
    g_h, g_i = expert_group_sizes(lay.H, lay.I)
    cfg = {
        "model": model, "ids": str(work / "llmc_ids.pt"), "bits": bits, "g_h": g_h, "g_i": g_i,
        "dtype": str(dtype).replace("torch.", ""), "all_experts": all_experts, "out": str(out),
    }  # fmt: skip
    (work / "llmc_cfg.json").write_text(json.dumps(cfg))
    (work / "llmc_run.py").write_text(LLMC_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run(
        [str(py), str(work / "llmc_run.py"), str(work / "llmc_cfg.json")], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"llm-compressor run failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


_LLMC_KEY = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(gate_proj|w1|up_proj|w3|down_proj|w2)\.(weight_\w+)$")
_PROJ = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


def adopt_llmc(llmc_out: Path, template: Path, lay: Layout) -> int:
    """Put llm-compressor's routed-expert codes into our uniform output of the same width (``template``, whose
    other tensors are the base model's, as in llm-compressor's output): same keys, shapes, dtypes and bytes, so
    both are loaded and evaluated by the same code. Returns the number of tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    theirs = {}
    for f in sorted(llmc_out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                m = _LLMC_KEY.search(k)
                if m:
                    l, e, proj, suffix = int(m[1]), int(m[2]), _PROJ[m[3]], m[4]
                    theirs[lay.fam.expert_key(l, e, proj)[: -len("weight")] + suffix] = h.get_tensor(k)
    n = 0
    for f in sorted(template.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        for k in tensors:
            if k in theirs:
                t = theirs.pop(k)
                if t.shape != tensors[k].shape or t.dtype != tensors[k].dtype:
                    raise RuntimeError(
                        f"llm-compressor's {k} is {t.dtype} {tuple(t.shape)}, ours {tensors[k].dtype} "
                        f"{tuple(tensors[k].shape)}"
                    )
                tensors[k] = t
                n += 1
        save_file(tensors, str(f), metadata=meta)
    if theirs or n != len(lay.routed) * 3:
        raise RuntimeError(
            f"llm-compressor output does not cover our routed experts ({n} replaced, {len(theirs)} left)"
        )
    return n


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    return float(spearmanr(a, b).statistic)


def predicted(meas: dict, moe: list[int], widths: tuple, bp: dict) -> dict[str, float]:
    """A plan's predicted KL under the KL cost model and its old proxy (summed block-output error), from the same
    calibration measurements, whatever cost model chose the plan."""
    err = meas["err"]
    sens = option_sensitivity(moe, widths, err, meas["probe_kl"])
    pairs = [w if isinstance(w, tuple) else (w, w) for w in widths]
    kl = old = 0.0
    for li, l in enumerate(moe):
        for r in bp["layers"][str(l)]["experts"]:
            j = pairs.index((r["gate_up_bits"], r["down_bits"]))
            kl += sens[li] * err[li, r["expert"], j]
            old += err[li, r["expert"], j]
    return {"predicted_kl": float(kl), "old_proxy": float(old)}


def bench_model(model_arg: str | None, args: argparse.Namespace, work: Path, llmc_py: Path | None) -> dict:
    ckpt = Checkpoint(None if model_arg in (None, "builtin") else model_arg)
    model = str(ckpt.path)
    lay = Layout(ckpt)
    from moecompress.quant.run import scale_dtype_of

    ev_kw = dict(data="mixed", seq_len=args.seq_len, batch_size=8, device=torch.device("cpu"))
    t0 = time.time()
    base_ev = evaluate(model, None, max_windows=args.eval_windows, **ev_kw)
    rows = [
        {
            "config": "base",
            "method": "-",
            "bytes": base_ev["bytes"],
            "routed_bytes": sum(
                v["shape"][0] * v["shape"][1] * {"BF16": 2, "F16": 2, "F32": 4}.get(v["dtype"], 4)
                for k, v in ckpt.tensor_info().items()
                if k in lay.routed
            ),
            "perplexity": base_ev["perplexity"],
            "kl_to_base": 0.0,
            "top1_agreement": 1.0,
        }
    ]

    def add(name, method, out, extra):
        ev = evaluate(out, model, max_windows=args.eval_windows, **ev_kw)
        row = {
            "config": name,
            "method": method,
            "bytes": ev["bytes"],
            "perplexity": ev["perplexity"],
            "kl_to_base": ev["kl_to_base"],
            "top1_agreement": ev["top1_agreement"],
            **extra,
        }
        rows.append(row)
        print(
            f"  {method:22s} {name:45s} routed {row.get('routed_bytes', 0):>10,} B  KL {row['kl_to_base']:.3e}  "
            f"top1 {row['top1_agreement']:.3f}  ppl {row['perplexity']['all']:.2f}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        return row

    def quant_row(m, name, plan, bits, gran, cost, method):
        out = work / "q"
        t1 = time.time()
        bp = run_quantize(
            model, out, bits=bits, plan=plan, method=m["method"], granularity=gran, other_bits=16, overwrite=True,
            measurement=m, cost_model=cost,
        )  # fmt: skip
        extra = {
            "plan": plan, "granularity": gran, "target_bits": bits, "cost_model": cost,
            "average_bits": round(bp["average_bits_routed"], 4), "width_counts": bp["width_counts"],
            "layer_bits": {l: d["bits"] for l, d in bp["layers"].items()}, "routed_bytes": bp["routed_bytes"],
            "budget_bytes_routed": bp["budget_bytes_routed"], "protected": len(bp["protected"]),
            "few_token_experts": len(bp["few_token_experts"]), "quantize_write_s": round(time.time() - t1, 2),
        }  # fmt: skip
        if m["meas"]["probe_kl"]:
            extra.update(predicted(m["meas"], lay.moe, m["widths"], bp))
        return add(name, method, out, extra)

    measure_s = {}
    kw = dict(samples=args.samples, seq_len=args.seq_len)
    llmc_info, probe_kl = None, {}
    if not args.skip_default:
        m = measure_model(model, "gptq", opts=GPTQOptions(), widths=OPTIONS, **kw)
        measure_s["gptq (default)"] = round(m["elapsed_s"], 1)
        print(f"{model}: default GPTQ measured in {m['elapsed_s']:.1f}s", flush=True)
        plans = [p for p in PLANS if args.plans == "all" or p[0] in args.plans.split(",")]
        for name, plan, bits, gran, cost in plans:
            quant_row(m, name, plan, bits, gran, cost, "gptq (default)")
        if llmc_py is not None:
            ids = calibration_set(load_tokenizer(ckpt.path), "mixed", args.samples, args.seq_len, 0).input_ids
            assert torch.equal(ids, m["tokens"].input_ids)  # the windows our calibration pass used
            for label, all_experts in LLMC_SETTINGS:
                for b in (4, 3):
                    out, tmpl = work / "llmc", work / "llmc-ours"
                    shutil.rmtree(out, ignore_errors=True)
                    info = run_llmc(llmc_py, model, ids, b, all_experts, out, lay, scale_dtype_of(ckpt))
                    llmc_info = info["version"]
                    bp = run_quantize(  # a template with our layout: its routed codes are replaced by llm-compressor's
                        model, tmpl, bits=b, plan="uniform", method="gptq", other_bits=16, overwrite=True,
                        measurement={**m, "opts": GPTQOptions(propagate=False)},
                    )  # fmt: skip
                    adopt_llmc(out, tmpl, lay)
                    shutil.rmtree(out, ignore_errors=True)
                    extra = {
                        "plan": "uniform", "target_bits": b, "average_bits": b, "routed_bytes": bp["routed_bytes"],
                        "llmc_elapsed_s": round(info["elapsed_s"], 1),
                    }  # fmt: skip
                    add(f"uniform {b}", label, tmpl, extra)
        probe_kl = {f"{l}:{b}": v for (l, b), v in (m["meas"]["probe_kl"] or {}).items()}
        del m
    if args.ablations:
        for label, opts in ABLATIONS:
            ma = measure_model(model, "gptq", opts=opts, probe_widths=(), widths=(3, 4), **kw)
            measure_s[label] = round(ma["elapsed_s"], 1)
            for b in (4, 3):
                quant_row(ma, f"uniform {b}", "uniform", b, "layer", "kl", label)
            del ma
    if "rtn" in args.methods.split(","):
        mr = measure_model(model, "rtn", probe_widths=(), widths=(3, 4), **kw)
        for b in (4, 3):
            quant_row(mr, f"uniform {b}", "uniform", b, "layer", "kl", "rtn")
        del mr
    corr = rank_correlation(rows)
    return {
        "model": model,
        "model_fingerprint": ckpt.fingerprint,
        "experts": {"layers": len(lay.moe), "experts": lay.E, "hidden": lay.H, "width": lay.I},
        "group_sizes": list(expert_group_sizes(lay.H, lay.I)),
        "measure_s": measure_s,
        "probe_kl": probe_kl,
        "proxy_rank_correlation": corr,
        "targets": targets(rows),
        "llmcompressor_version": llmc_info,
        "elapsed_s": round(time.time() - t0, 1),
        "rows": rows,
    }


def rank_correlation(rows: list[dict]) -> dict:
    """Spearman between predicted and measured KL over the default method's plans (KL cost and old proxy)."""
    ours = [r for r in rows if r["method"] == "gptq (default)" and "predicted_kl" in r]
    return {
        "plans": len(ours),
        "spearman_predicted_kl": spearman([r["predicted_kl"] for r in ours], [r["kl_to_base"] for r in ours]),
        "spearman_old_proxy": spearman([r["old_proxy"] for r in ours], [r["kl_to_base"] for r in ours]),
    }


def targets(rows: list[dict]) -> dict:
    """The issue's targets, as ratios of measured KLs (None when a row is missing)."""

    def kl(method, config):
        r = [x for x in rows if x["method"] == method and x["config"] == config]
        return r[0]["kl_to_base"] if r else None

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else round(a / b, 4)

    best = LLMC_SETTINGS[0][0]
    ours = "gptq (default)"
    return {
        "uniform4_vs_llmc_best (<= 0.90)": ratio(kl(ours, "uniform 4"), kl(best, "uniform 4")),
        "uniform3_vs_llmc_best (<= 0.90)": ratio(kl(ours, "uniform 3"), kl(best, "uniform 3")),
        "lp-expert3.0_vs_uniform3 (<= 0.75)": ratio(kl(ours, "lp-expert 3.0"), kl(ours, "uniform 3")),
        "lp-layer3.0_vs_uniform3": ratio(kl(ours, "lp-layer 3.0"), kl(ours, "uniform 3")),
        "lp-expert2.5_vs_uniform3 (<= 1.5)": ratio(kl(ours, "lp-expert 2.5"), kl(ours, "uniform 3")),
        "lp-layer2.5_vs_uniform3": ratio(kl(ours, "lp-layer 2.5"), kl(ours, "uniform 3")),
        "lp-expert3.5_vs_uniform4": ratio(kl(ours, "lp-expert 3.5"), kl(ours, "uniform 4")),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None, help="model folder or 'builtin' (repeatable)")
    ap.add_argument("--methods", default="gptq", help="gptq, or gptq,rtn to add RTN rows")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows per domain")
    ap.add_argument("--plans", default="all", help="comma-separated plan names, or all")
    ap.add_argument("--ablations", action="store_true", help="GPTQ without each of its choices (4 and 3 bits)")
    ap.add_argument("--skip-default", action="store_true", help="no default-pipeline or llm-compressor rows")
    ap.add_argument("--with-llmcompressor", action="store_true", help="llm-compressor GPTQ rows (separate venv)")
    ap.add_argument("--llmc-venv", default=str(ROOT / "runs" / "llmc-venv"), help="venv for llm-compressor")
    ap.add_argument("--md-only", action="store_true", help="re-render reports/quant_bench.md from the JSON")
    ap.add_argument("--merge", nargs="+", default=None, help="combine the models of several result JSONs into one")
    ap.add_argument("--report-dir", default=str(ROOT / "reports"), help="where quant_bench.json/.md go")
    args = ap.parse_args()
    rep = Path(args.report_dir)
    if args.merge:  # runs of different models made in parallel processes: one report
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        by_model: dict[str, dict] = {}
        for p in parts:
            for mres in p["models"]:
                if mres["model"] not in by_model:
                    by_model[mres["model"]] = mres
                    continue
                acc = by_model[mres["model"]]
                acc["rows"] += [r for r in mres["rows"] if r["config"] != "base"]
                acc["measure_s"].update(mres["measure_s"])
                acc["probe_kl"] = acc["probe_kl"] or mres["probe_kl"]
                acc["llmcompressor_version"] = acc["llmcompressor_version"] or mres["llmcompressor_version"]
                acc["elapsed_s"] = max(acc["elapsed_s"], mres["elapsed_s"])
        for mres in by_model.values():
            mres["targets"] = targets(mres["rows"])
            mres["proxy_rank_correlation"] = rank_correlation(mres["rows"])
        res = {**parts[0], "models": list(by_model.values())}
        res["commands"] = [p["command"] for p in parts]
        res["command"] = " ; ".join(res["commands"])
        res["elapsed_s"] = max(p["elapsed_s"] for p in parts)
        rep.mkdir(parents=True, exist_ok=True)
        (rep / "quant_bench.json").write_text(json.dumps(res, indent=1) + "\n")
        (rep / "quant_bench.md").write_text(markdown(res))
        print(markdown(res))
        return
    if args.md_only:
        res = json.loads((rep / "quant_bench.json").read_text())
        (rep / "quant_bench.md").write_text(markdown(res))
        return
    torch.manual_seed(0)
    llmc_py = ensure_llmc_venv(Path(args.llmc_venv)) if args.with_llmcompressor else None
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    try:
        models = [bench_model(m, args, work, llmc_py) for m in (args.model or ["builtin"])]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": command_line(vars(args)),
        "args": {k: v for k, v in vars(args).items() if k not in ("report_dir", "llmc_venv", "md_only")},
        "calibration": {"set": "mixed", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "eval": {"set": "mixed (held-out split)", "windows_per_domain": args.eval_windows, "seq_len": args.seq_len},
        "other_bits": 16,
        "probe_widths": list(PROBE_WIDTHS),
        "elapsed_s": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "models": models,
    }
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "quant_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (rep / "quant_bench.md").write_text(markdown(result))
    print(markdown(result))


def command_line(args: dict) -> str:
    """The command that reproduces a run, from its recorded arguments."""
    defaults = {"methods": "gptq", "samples": 16, "seq_len": 256, "eval_windows": 8, "plans": "all"}
    parts = ["OMP_NUM_THREADS=1 .venv/bin/python bench/quant_bench.py"]
    for m in args.get("model") or []:
        parts.append(f"--model {m}")
    for k, v in args.items():
        if k in defaults and v != defaults[k]:
            parts.append(f"--{k.replace('_', '-')} {v}")
    if args.get("ablations"):
        parts.append("--ablations")
    if args.get("skip_default"):
        parts.append("--skip-default")
    if args.get("with_llmcompressor"):
        parts.append("--with-llmcompressor")
    return " ".join(parts)


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    lines = [
        "# Quantization benchmark",
        "",
        f"Command: `{res['command']}` ({res['elapsed_s']} s on {res['machine']['platform']}, "
        f"{res['machine']['threads']} thread(s)).",
        f"Calibration: {res['calibration']['samples']} windows x {res['calibration']['seq_len']} tokens (mixed, seed "
        f"0), the same windows for every method; evaluation: {res['eval']['windows_per_domain']} held-out windows per "
        "domain via `moecompress.core.evaluate` for every row (KL(base || quantized) per token, fp32 forward). Only "
        "routed experts are quantized (attention, routers, norms, embeddings as in the base). LP plans have the "
        "routed-expert byte budget of the uniform plan of that many bits (2.5: payload 2.5 bits/weight plus the same "
        "scale overhead). Sensitivity probes: KL with one layer's routed experts at "
        f"{res['probe_widths']} bits on the first calibration batch.",
        "",
    ]
    for mres in res["models"]:
        rows = mres["rows"]
        doms = [d for d in rows[0]["perplexity"] if d != "all"]
        lines += [
            f"## `{mres['model']}`",
            "",
            f"{mres['experts']['layers']} MoE layers x {mres['experts']['experts']} experts, hidden "
            f"{mres['experts']['hidden']}, width {mres['experts']['width']}; group sizes (gate/up, down) "
            f"{mres['group_sizes']}. Calibration passes (s): {mres['measure_s']}."
            + (f" llm-compressor {mres['llmcompressor_version']}." if mres.get("llmcompressor_version") else ""),
            "",
        ]
        head = ["method", "config", "avg bits", "routed bytes", "file bytes", "KL to base", "predicted KL", "top-1"]
        head += ["ppl all"] + [f"ppl {d}" for d in doms]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in rows:
            cells = [
                r["method"],
                r["config"],
                _f(r.get("average_bits", r.get("target_bits")), ".3g") if r["config"] != "base" else "16",
                _f(r.get("routed_bytes"), ","),
                f"{r['bytes']:,}",
                f"{r['kl_to_base']:.3e}",
                _f(r.get("predicted_kl"), ".3e"),
                f"{r['top1_agreement']:.3f}",
                f"{r['perplexity']['all']:.2f}",
            ] + [f"{r['perplexity'][d]:.2f}" for d in doms]
            lines.append("| " + " | ".join(cells) + " |")
        c = mres["proxy_rank_correlation"]
        lines += [
            "",
            f"Rank correlation over the {c['plans']} plans of the default method (Spearman, predicted vs measured "
            f"KL): KL-predicting cost {_f(c['spearman_predicted_kl'], '.3f')}; old proxy (summed block-output "
            f"error) {_f(c['spearman_old_proxy'], '.3f')}.",
            "",
            "Targets (ratios of measured KL): "
            + "; ".join(f"{k}: {_f(v, '.3f')}" for k, v in mres["targets"].items())
            + ".",
            "",
            "Protected experts (>= 8 bits: super experts, experts with too few calibration tokens) per LP row: "
            + ", ".join(f"{r['config']}: {r['protected']}" for r in rows if r.get("plan") == "lp" and "protected" in r)
            + ".",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
