"""Quantized Llama-4 (issue 12): its experts are fused on disk (``feed_forward.experts.gate_up_proj [E, H, 2I]``), but
transformers loads a compressed-tensors Llama-4 with ``SequentialLlama4TextExperts`` (one ``Llama4TextMLP`` per
expert), so quantize writes ``experts.<e>.gate_proj / up_proj / down_proj`` (quant/keys.py). The RTN 4-bit output
loads in plain transformers with no missing or unexpected keys and gives moecompress.load's logits; an LP plan
(mixed widths) loads with moecompress.load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import _cli, from_pretrained, reload_clean  # noqa: E402
from family_models import build  # noqa: E402

from moecompress import load  # noqa: E402

CALIB = ("--samples", "4", "--seq-len", "16", "--device", "cpu")
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, tokenizer_dir):
    work = tmp_path_factory.mktemp("llama4")
    return build("llama4_text", work / "src", tokenizer_dir), work


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")


def test_rtn_output_loads_as_sequential_experts_with_moecompress_loads_logits(llama4):
    src, work = llama4
    out = work / "q4"
    _cli("quantize", src, "--bits", "4", "--plan", "uniform", "--method", "rtn", *CALIB, "-o", out)
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.feed_forward.experts.7.up_proj.weight_packed" in keys
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    theirs = reload_clean(out)  # no missing / unexpected keys, no warning
    assert type(theirs.model.layers[0].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    ours = load(out)
    assert ours.model.layers[0].feed_forward.experts.gate_up_proj.shape[1] == ours.config.hidden_size  # [E, H, 2I]
    a, b = _logits(ours), _logits(theirs)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())  # per-expert Linear vs fused bmm
    assert 0 < _kl(a, _logits(from_pretrained(src))) < 0.05  # quantized, not garbage


@pytest.mark.slow
def test_lp_plan_loads_with_moecompress_load(llama4):
    src, work = llama4
    out = work / "lp"
    _cli("quantize", src, "--bits", "3.5", "--plan", "lp", "--method", "gptq", *CALIB, "-o", out)
    plan = json.loads((out / "bit_plan.json").read_text())
    assert len({r["bits"] for d in plan["layers"].values() for r in d["experts"]}) > 1  # a mixed plan
    assert 0 < _kl(_logits(load(out)), _logits(from_pretrained(src))) < 0.1
