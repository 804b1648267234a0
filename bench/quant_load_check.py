"""What holds when stock transformers loads a uniform quantized output, compared with ``moecompress.load``.

Quantizes the built-in model (or ``--model``) uniformly with RTN at ``--bits`` into a temporary folder, then loads
it with ``AutoModelForCausalLM.from_pretrained`` in bf16 and fp32, with the default experts kernel and with
``experts_implementation="eager"``, and compares next-token log-probabilities with ``moecompress.load`` in the
same dtype. Prints a table and writes ``reports/quant_load_check.json``.

With ``--fused`` it instead asks, for every supported model type whose routed experts are fused on disk (gpt-oss,
Granite, Qwen3-VL-MoE, Gemma-4, HY-V4, Aria, Muse Spark), whether stock transformers loads any compressed-tensors
layout of quantized experts: per-expert keys (what moecompress writes for the other families) and the fused tensors
packed under their disk names / parameter names / parameter suffixes, each with and without ``"dequantize": true`` in
the quantization_config (tests/quant/fused_layouts.py); it records the missing / unexpected keys or the error, and
for each failing layout the path one packed key takes through transformers' loader, in
``reports/quant_load_check.fused.json`` + ``.md``: the evidence behind the quantize refusal for those types.

With ``--mxfp4`` it quantizes tiny gpt-oss models (hidden 64, expert widths ``--widths``, multiples of 32) to MXFP4
with RTN and with GPTQ on the FP4 grid (same calibration windows), loads each output in stock transformers (missing /
unexpected keys, max |logit - moecompress.load's logit|) and measures KL(source || output) and top-1 agreement with
``moecompress eval`` on held-out windows: ``reports/quant_load_check.mxfp4.json`` + ``.md``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py --fused
    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py --mxfp4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("MOECOMPRESS_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)  # [B, S, V]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fused", action="store_true", help="probe the quantized layouts of fused-on-disk families")
    ap.add_argument("--types", nargs="*", default=None, help="with --fused: only these model types")
    ap.add_argument("--mxfp4", action="store_true", help="gpt-oss MXFP4 output: loads, RTN vs GPTQ KL")
    ap.add_argument("--widths", type=int, nargs="*", default=[64, 128], help="with --mxfp4: expert widths")
    ap.add_argument("--samples", type=int, default=32, help="with --mxfp4: calibration windows")
    args = ap.parse_args()
    if args.mxfp4:
        mxfp4_check(args.out or ROOT / "reports" / "quant_load_check.mxfp4.json", args.widths, args.samples)
        return
    if args.fused:
        fused_layouts(args.out or ROOT / "reports" / "quant_load_check.fused.json", args.types)
        return
    args.out = args.out or ROOT / "reports" / "quant_load_check.json"

    import transformers
    from transformers import AutoModelForCausalLM

    import moecompress

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        cmd = [
            sys.executable,
            "-m",
            "moecompress.cli.main",
            "quantize",
            args.model,
            "--bits",
            str(args.bits),
            "--plan",
            "uniform",
            "--method",
            "rtn",
            "--samples",
            "4",
            "--seq-len",
            "64",
            "--device",
            "cpu",
            "-o",
            str(out),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        vocab = moecompress.load(out, "cpu", torch.float32).config.vocab_size
        ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
        for dtype in (torch.bfloat16, torch.float32):
            ref = _log_probs(moecompress.load(out, "cpu", dtype), ids)
            for impl in ("default", "eager"):
                kw = {} if impl == "default" else {"experts_implementation": impl}
                row = {"dtype": str(dtype).removeprefix("torch."), "experts_implementation": impl}
                try:
                    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kw).eval()
                    row["max_abs_dlogp"] = float((_log_probs(model, ids) - ref).abs().max())
                except Exception as e:  # the failure itself is the measurement
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)

    print(f"{'dtype':9} {'kernel':8} result (max |d log p| vs moecompress.load)")
    for r in rows:
        res = f"{r['max_abs_dlogp']:.4g}" if "max_abs_dlogp" in r else "fails: " + r["error"]
        print(f"{r['dtype']:9} {r['experts_implementation']:8} {res}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "bits": args.bits,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


def fused_layouts(out_json: Path, types: list[str] | None = None) -> None:
    """For every supported fused-on-disk model type: does stock transformers load any quantized expert layout?"""
    import logging

    import compressed_tensors
    import transformers

    sys.path.insert(0, str(ROOT / "tests" / "families"))
    sys.path.insert(0, str(ROOT / "tests" / "quant"))
    from family_checks import family_or_refusal
    from family_models import build, installed_moe_types
    from fused_layouts import layouts, trace, try_layout

    from moecompress.core.errors import UserError
    from moecompress.core.families import family_for

    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in types or installed_moe_types():
            cfg, _ = family_or_refusal(t)
            if cfg is None or not family_for(cfg).fused_disk:
                continue
            src = build(t, Path(tmp) / t)
            try:
                found = layouts(src)
            except UserError as err:  # a type this checkout cannot open: recorded, not probed
                rows.append({"model_type": t, "layout": "-", "dequantize": None, "loads": False, "error": str(err)})
                print(t, "cannot open:", err)
                continue
            for name, (tensors, targets) in found.items():
                for dequant in (False, True):
                    r = try_layout(src, Path(tmp) / f"{t}-q", tensors, targets, dequant)
                    if not r["loads"]:  # the loader's path for one packed gate/up key: which transform drops it
                        key = min((k for k in tensors if k.endswith("packed")), key=lambda k: ("gate" not in k, k))
                        r["trace"] = trace(Path(tmp) / f"{t}-q", key, dequant)
                    rows.append({"model_type": t, "layout": name, "dequantize": dequant, **r})
                    print(t, name, "dequantize" if dequant else "", r)
    record = {
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__,
        "rows": rows,
        "any_loads": any(r["loads"] for r in rows),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=2) + "\n")
    chosen = " --types " + " ".join(types) if types else ""
    lines = [
        f"# Quantized experts of fused-on-disk families in stock transformers {transformers.__version__} "
        f"(compressed-tensors {compressed_tensors.__version__})",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py --fused{chosen}` (tiny models, RTN 4 bit, "
        "group 8)",
        "",
        "| model type | layout | dequantize | loads | missing | unexpected (example or error) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ex = (r.get("unexpected_example") or [r.get("error", "")])[0]
        lines.append(
            f"| {r['model_type']} | {r['layout']} | {r['dequantize']} | {r['loads']} | {r.get('missing', '-')} | "
            f"{r.get('unexpected', '-')} (`{ex}`) |"
        )
    lines += [
        "",
        "## Where transformers' loader drops each layout (one packed gate/up key per row)",
        "",
        "`core_model_loading.rename_source_key` applies the model's renamings, then at most one converter (the "
        "model's conversion mapping as `HfQuantizer.update_weight_conversions` leaves it, then the quantizer's "
        "general `weight` converter); a key that ends at no model parameter is unexpected and the fused parameter "
        "stays missing.",
        "",
        "| model type | layout | dequantize | path of the key |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['model_type']} | {r['layout']} | {r['dequantize']} | `{r['trace']}` |" for r in rows if r.get("trace")
    ]
    lines += ["", *WHY]
    out_json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")


WHY = """## Why no layout loads (transformers 5.23 loading path, read for these types)

- **`dequantize: false`** (compressed modules): `CompressedTensorsHfQuantizer._process_model_before_weight_loading`
  calls compressed-tensors' `apply_quantization_config`, whose `initialize_module_for_quantization` gives
  `weight_packed` / `weight_scale` parameters to `nn.Linear` / `nn.Embedding` modules only (any other targeted
  module type raises ValueError). These types' routed experts are one module holding 3-D `gate_up_proj` / `down_proj`
  parameters, and `HfQuantizer`'s module swap before loading (`MODULES_TO_PATCH_FOR_QUANTIZATION`) lists only
  `Llama4TextExperts` (-> `SequentialLlama4TextExperts`, which moecompress writes for Llama-4). So no module holds a
  packed tensor: every packed key is unexpected and the fused parameters stay missing.
- **`dequantize: true`** (in the saved quantization_config or passed at load: the same `quantization_config.dequantize`
  flag): `CompressedTensorsDequantize` runs (a) inside one of the model's converters only where
  `HfQuantizer.update_weight_conversions` extends it: a `WeightConverter` whose source patterns all end in `.weight`
  (the per-expert `MergeModulelist` converters of Mixtral-like types), or (b) as the quantizer's general converter
  (`get_weight_conversions`: `weight_packed|weight_scale|weight_shape|... -> weight`), which can only produce a
  name ending in `.weight`; the fused parameters are `experts.gate_up_proj` / `experts.down_proj`. Per type:
  - granitemoe, granitemoe_swa, granitemoehybrid, granitemoeshared, aria: the fused tensors are mapped by
    `WeightRenaming` (`block_sparse_moe.input_linear.weight` / `mlp.experts.fc1.weight` -> `experts.gate_up_proj`;
    granitemoe_swa saves them as `experts.gate_up_proj`): `update_weight_conversions` skips renamings, and a
    pattern ends on a name boundary (`WeightTransform`: `(?!\\w)`), so it never renames `input_linear.weight_packed`;
    `<name>.weight.weight_packed` would be renamed to `experts.gate_up_proj.weight_packed`, then by (b) to
    `experts.gate_up_proj.weight`: no parameter.
  - qwen3_vl_moe: its `WeightConverter('mlp.experts.gate_up_proj', Transpose)` has no `.weight` source
    (`gate_up_proj` is not in the quantizer's `serialized_names`, so no dequantize step is added), and
    `core_model_loading.apply_converters` lets one converter match a key: it claims
    `gate_up_proj.weight_packed` (name unchanged) before (b) can.
  - gemma4, hy_v4, muse_spark, gpt_oss: no conversion on the experts; only (b) applies.
- What would unblock it upstream: a dequantize step on the converters / renamings of fused parameter names (e.g.
  `update_weight_conversions` accepting a fused target with `weight_packed` companions), or a
  `MODULES_TO_PATCH_FOR_QUANTIZATION` entry (one Linear module per expert) for these experts classes as Llama-4 has.
""".splitlines()


def mxfp4_check(
    out_json: Path, widths: list[int], samples: int, seq_len: int = 64, seeds: tuple[int, ...] = (0, 1)
) -> None:
    """gpt-oss MXFP4 output of tiny models: loads in transformers, equals moecompress.load, RTN vs GPTQ KL."""
    import logging

    import transformers
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    sys.path.insert(0, str(ROOT / "tests" / "families"))
    from family_models import build, make_tokenizer

    from moecompress import load
    from moecompress.cli.main import app

    logging.getLogger("transformers").setLevel(logging.ERROR)

    def cli(*argv: object) -> None:
        res = CliRunner().invoke(app, [str(a) for a in argv])
        assert res.exit_code == 0, res.output

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(Path(tmp) / "tok")
        for width in widths:
            for seed in seeds:
                src = build("gpt_oss", Path(tmp) / f"src{width}-{seed}", tok, seed=seed, width=width)
                for method in ("rtn", "gptq"):
                    out = Path(tmp) / f"{method}{width}-{seed}"
                    cal = ["--samples", samples, "--seq-len", seq_len, "--device", "cpu"]
                    cli("quantize", src, "--bits", 4, "--method", method, *cal, "-o", out)
                    model, info = AutoModelForCausalLM.from_pretrained(
                        out, output_loading_info=True, experts_implementation="eager"
                    )
                    ids = torch.arange(64)[None] % 300
                    with torch.no_grad():
                        diff = float(
                            (model(input_ids=ids).logits.float() - load(out)(input_ids=ids).logits).abs().max()
                        )
                    ev = out / "eval.json"
                    cli("eval", out, "--base", src, "--seq-len", seq_len, "--max-windows", 8, "--device", "cpu",
                        "--json", ev)  # fmt: skip
                    e = json.loads(ev.read_text())
                    row = {
                        "width": width, "seed": seed, "method": method, "missing": len(info["missing_keys"]),
                        "unexpected": len(info["unexpected_keys"]), "max_logit_diff": diff,
                        "kl": e["kl_to_base"], "top1": e["top1_agreement"],
                    }  # fmt: skip
                    rows.append(row)
                    print(row)
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "samples": samples,
              "seq_len": seq_len, "rows": rows}  # fmt: skip
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# gpt-oss MXFP4 output in stock transformers {transformers.__version__}: loads, RTN vs GPTQ",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py --mxfp4 --widths {' '.join(map(str, widths))} "
        f"--samples {samples}` (tiny random gpt_oss, hidden 64; calibration {samples} x {seq_len} mixed; KL on 8 "
        f"held-out windows of {seq_len} per domain)",
        "",
        "| expert width | seed | method | missing | unexpected | max logit diff vs moecompress.load | KL | top-1 |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['seed']} | {r['method']} | {r['missing']} | {r['unexpected']} | "
            f"{r['max_logit_diff']:.2e} | {r['kl']:.4g} | {r['top1']:.4f} |"
        )
    out_json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
