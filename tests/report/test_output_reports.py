"""Every command that writes an output folder also writes report.html there, rendered from its sidecars."""

from __future__ import annotations

import json

from conftest import build_tiny
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.report.render import human_bytes

COMMON = ["--samples", "2", "--seq-len", "16", "--device", "cpu"]


def test_prune_merge_atom_quantize_write_reports(tmp_path, tokenizer_dir):
    model = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir, moe_intermediate_size=32)
    runs = {
        "prune": ["prune", str(model), "--ratio", "0.34", *COMMON],
        "merge": ["merge", str(model), "--ratio", "0.34", *COMMON],
        "atom": ["prune", str(model), "--granularity", "atom", "--ratio", "0.5", *COMMON],
        "quant": ["quantize", str(model), "--bits", "4", "--plan", "uniform", "--method", "rtn", *COMMON],
    }
    for name, args in runs.items():
        out = tmp_path / name
        res = CliRunner().invoke(app, [*args, "-o", str(out)])
        assert res.exit_code == 0, (name, res.output)
        man = json.loads((out / "moecompress.json").read_text())
        page = (out / "report.html").read_text()
        assert human_bytes(man["bytes_after"]) in page and human_bytes(man["bytes_before"]) in page, name
        assert man["bytes_after"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
        assert not list(tmp_path.glob(f".{name}.tmp-*"))
