"""Per-projection options of per-expert LP plans: gate/up at one width, down_proj at another."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny, write_with_transform
from transformers import AutoModelForCausalLM

from moecompress.core.manifest import Manifest
from moecompress.quant.layer import GPTQOptions, LayerCapture, quantize_layer
from moecompress.quant.load import load_quantized
from moecompress.quant.plan import OPTIONS, average_bits, option_sensitivity, width_label
from moecompress.quant.run import run_quantize

KW = dict(samples=4, seq_len=32, batch_size=4, min_tokens=4)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    E, H, I, T = 3, 32, 16, 96
    gu, dn = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1
    cap = LayerCapture(E, H, I, with_down=False)
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], -1)
    cap.add_batch(torch.randn(T, H, generator=g), idx, torch.rand(T, 2, generator=g))
    cap.counts += torch.bincount(idx.flatten(), minlength=E)
    return gu, dn, cap


def test_options_reuse_gate_up_codes_and_equal_single_widths():
    gu, dn, cap = _layer()
    kw = dict(method="gptq", cap=cap, min_tokens=4, scale_dtype=torch.bfloat16, opts=GPTQOptions())
    single, _, err1 = quantize_layer(gu, dn, torch.nn.functional.silu, (2, 4), **kw)
    pairs, _, err2 = quantize_layer(gu, dn, torch.nn.functional.silu, ((2, 2), (2, 4), (4, 4)), **kw)
    for b in (2, 4):  # (b, b) is the width b, code for code and error for error
        a, p = single[b], pairs[(b, b)]
        for x, y in zip(
            (a.gate_up_q, a.gate_up_s, a.down_q, a.down_s), (p.gate_up_q, p.gate_up_s, p.down_q, p.down_s), strict=True
        ):
            assert torch.equal(x, y)
    assert torch.equal(err1[:, 0], err2[:, 0]) and torch.equal(err1[:, 1], err2[:, 2])
    mixed = pairs[(2, 4)]
    assert mixed.bits == 2 and mixed.dbits == 4
    assert mixed.gate_up_q is pairs[(2, 2)].gate_up_q  # gate/up quantized once per width
    assert int(mixed.down_q.abs().max()) > 2  # down uses 4-bit codes (2-bit codes stay in -2..1)
    # a better down_proj lowers the measured block-output error of every expert
    assert (err2[:, 1] < err2[:, 0]).all() and (err2[:, 2] <= err2[:, 1] * 1.5).all()


def test_option_bytes_labels_and_one_sensitivity_factor_per_layer():
    assert (2, 4) in OPTIONS and (3, 3) in OPTIONS and len(OPTIONS) == 16
    assert width_label((2, 4)) == "2/4" and width_label((3, 3)) == "3" and width_label(3) == "3"
    assert average_bits((2, 4)) == pytest.approx(8 / 3, abs=1e-4) and average_bits((3, 3)) == 3
    err = np.array([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 1.0], [2.0, 1.0]]])  # [L=2, E=2, options (2,2), (2,4)]
    s = option_sensitivity([0, 1], ((2, 2), (2, 4)), err, {(0, 2): 8.0, (1, 2): 2.0, (1, 3): 99.0})
    assert s.tolist() == [2.0, 0.5]  # the lowest probed width: 8 / (1 + 3), 2 / (2 + 2)
    s = option_sensitivity([0, 1], ((2, 2), (2, 4)), err, {(0, 2): 8.0})
    assert s.tolist() == [2.0, 2.0]  # a layer without a probe takes the others' median
    assert option_sensitivity([0, 1], ((2, 2),), err, None).tolist() == [1.0, 1.0]


def test_expert_plan_mixes_projection_widths_within_budget_and_loads_exactly(qwen, tmp_path):
    out = tmp_path / "lp"
    plan = run_quantize(qwen, out, bits=3.0, plan="lp", method="rtn", granularity="expert", other_bits=16, **KW)
    assert plan["routed_bytes"] <= plan["budget_bytes_routed"]
    rows = [r for d in plan["layers"].values() for r in d["experts"]]
    assert any(r["gate_up_bits"] != r["down_bits"] for r in rows)  # per-projection options are chosen
    # the LP's choice is never predicted worse than uniform 3-bit at the same bytes
    uni = sum(r["err"]["3"] * plan["sensitivity"][str(l)] for l, d in plan["layers"].items() for r in d["experts"])
    assert plan["predicted_cost"] <= uni + 1e-12
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == plan["total_bytes"]  # predicted bytes are the real tensor bytes
    assert Manifest.read(out).load_with == "moecompress.load"
    H, I = 32, 24
    from safetensors import safe_open

    m = load_quantized(out)
    packed = load_quantized(out, packed=True)  # the CUDA default: layers with per-projection widths stay dense
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, packed(input_ids=ids).logits)
    names, size = ("gate_proj", "up_proj", "down_proj"), {"I32": 4, "I64": 8, "F32": 4, "BF16": 2, "F16": 2}
    for l, d in plan["layers"].items():
        for r in d["experts"]:
            base = f"model.layers.{l}.mlp.experts.{r['expert']}"
            with safe_open(str(out / idx["weight_map"][f"{base}.down_proj.weight_packed"]), "pt") as h:
                # down_proj packed at its own width, gate/up at theirs; the plan's bytes are the stored bytes
                assert h.get_slice(f"{base}.down_proj.weight_packed").get_shape()[-1] == -(-I * r["down_bits"] // 32)
                assert h.get_slice(f"{base}.gate_proj.weight_packed").get_shape()[-1] == -(-H * r["gate_up_bits"] // 32)
                parts = [h.get_slice(f"{base}.{p}.weight_{k}") for p in names for k in ("packed", "scale", "shape")]
                assert r["bytes"] == sum(int(np.prod(x.get_shape())) * size[x.get_dtype()] for x in parts)
            dn = m.model.layers[int(l)].mlp.experts.down_proj[r["expert"]]  # [H, I], groups of 8
            assert max(len(torch.unique(row)) for row in dn.reshape(-1, 8)) <= 2 ** r["down_bits"]
    assert qc["format"] == "pack-quantized"


def test_one_option_everywhere_is_not_claimed_loadable_by_transformers(qwen, tmp_path):
    """transformers reads one width for a fused experts module (measured: gate/up at 3 bits with down at 4 gives
    other logits there), so such an output lists every module and loads with moecompress.load."""
    from moecompress.core.checkpoint import Checkpoint
    from moecompress.quant.rtn import fake_quantize
    from moecompress.quant.transform import QuantTransform, scale_dtype_for

    ck = Checkpoint(qwen)
    t = QuantTransform({l: [(3, 4)] * ck.num_experts for l in ck.moe_layers}, "rtn", other_bits=16, propagate=False)
    out = tmp_path / "q34"
    write_with_transform(qwen, t, out)
    assert not t.uniform
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted({g["weights"]["num_bits"] for g in qc["config_groups"].values()}) == [3, 4]
    m, base = load_quantized(out), AutoModelForCausalLM.from_pretrained(qwen)
    sd = scale_dtype_for(ck.config)
    for l in ck.moe_layers:  # loaded weights are the RTN codes of each projection at its own width
        ex, bx = m.model.layers[l].mlp.experts, base.model.layers[l].mlp.experts
        assert torch.equal(ex.down_proj, fake_quantize(bx.down_proj.detach(), 4, 8, sd).float())
        assert torch.equal(ex.gate_up_proj, fake_quantize(bx.gate_up_proj.detach(), 3, 8, sd).float())
