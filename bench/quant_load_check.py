"""What holds when stock transformers loads a uniform quantized output, compared with ``moecompress.load``.

Quantizes the built-in model (or ``--model``) uniformly with RTN at ``--bits`` into a temporary folder, then loads
it with ``AutoModelForCausalLM.from_pretrained`` in bf16 and fp32, with the default experts kernel and with
``experts_implementation="eager"``, and compares next-token log-probabilities with ``moecompress.load`` in the
same dtype. Prints a table and writes ``reports/quant_load_check.json``.

With ``--fused`` it instead asks, for every supported model type whose routed experts are fused on disk (gpt-oss,
Granite), whether stock transformers loads any compressed-tensors layout of quantized experts: per-expert keys
(what moecompress writes for the other families) and the fused tensors packed under their disk names, each with and
without ``"dequantize": true`` in the quantization_config (tests/quant/fused_layouts.py); it records the missing /
unexpected keys or the error in ``reports/quant_load_check.fused.json`` + ``.md``: the evidence behind the quantize
refusal for those types.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py --fused
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
    args = ap.parse_args()
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
    from fused_layouts import layouts, try_layout

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
    out_json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
