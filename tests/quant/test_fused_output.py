"""Quantized output of the model types whose routed experts are fused on disk (gpt-oss, Granite; issue 12).

transformers 5.23 + compressed-tensors load quantized experts only through a per-expert WeightConverter of the
model type's conversion mapping (the quantizer adds its dequantize step to those converters only); gpt_oss has no
conversion mapping and the Granite types only rename input_linear / output_linear. So no compressed-tensors layout
of their quantized experts loads: per-expert keys and the fused tensors packed under their disk names both come back
as unexpected keys with gate_up_proj / down_proj missing, with or without ``"dequantize": true``. quantize refuses
Granite in one line; gpt-oss is written as MXFP4 instead, the format of its release that transformers loads natively
(quant/mxfp4.py, tests/quant/test_mxfp4.py). The second test checks the reason still holds, so a transformers release
that loads one of those layouts fails it (then write that layout and lift the refusal). Every type:
bench/quant_load_check.py --fused (and --mxfp4 for gpt-oss's MXFP4 output).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_models import build  # noqa: E402
from fused_layouts import layouts, try_layout  # noqa: E402

from moecompress.cli.main import app  # noqa: E402

CAL = ["--samples", "2", "--seq-len", "16", "--device", "cpu"]


@pytest.fixture(scope="module", params=["gpt_oss", "granitemoe"])
def fused_model(request, tmp_path_factory, tokenizer_dir):
    return build(request.param, tmp_path_factory.mktemp("m") / request.param, tokenizer_dir)


def test_quantize_refuses_granite_in_one_line_saying_why(tmp_path, tokenizer_dir):
    """(gpt-oss is written as MXFP4 instead: tests/quant/test_mxfp4.py.)"""
    granite = build("granitemoe", tmp_path / "granitemoe", tokenizer_dir)
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(granite), "--bits", "4", *CAL, "-o", str(out)])
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "keeps its routed experts fused on disk" in text and "WeightConverter" in text, text
    assert len(text.splitlines()) <= 3 and "Traceback" not in text, text
    assert not out.exists()


def test_no_quantized_layout_of_fused_experts_loads_in_transformers(fused_model, tmp_path):
    """The refusal's reason, checked against the installed transformers: both layouts leave the fused experts
    missing and their packed tensors unexpected."""
    for name, (tensors, targets) in layouts(fused_model).items():
        r = try_layout(fused_model, tmp_path / "q", tensors, targets, dequant=False)
        assert not r["loads"], (name, r)
        assert r.get("missing", 0) > 0 and r.get("unexpected", 0) > 0, (name, r)
        assert all(k.endswith(("gate_up_proj", "down_proj")) for k in r["missing_example"]), (name, r)
