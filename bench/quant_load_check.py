"""What holds when stock transformers loads a uniform quantized output, compared with ``moecompress.load``.

Quantizes the built-in model (or ``--model``) uniformly with RTN at ``--bits`` into a temporary folder, then loads
it with ``AutoModelForCausalLM.from_pretrained`` in bf16 and fp32, with the default experts kernel and with
``experts_implementation="eager"``, and compares next-token log-probabilities with ``moecompress.load`` in the
same dtype. Prints a table and writes ``reports/quant_load_check.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant_load_check.py
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
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "quant_load_check.json")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
