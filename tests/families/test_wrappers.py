"""Multimodal wrappers whose language model is an MoE (issue 12): the view is the language model, every other
tensor and config entry is written back untouched, the output loads with the class transformers maps the model
type to (image-text-to-text) with logits equal to moecompress.load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_checks import _cli, check_load, reload_clean
from family_models import build, tiny_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.families import family_for

CALIB = ("--samples", "2", "--seq-len", "16", "--device", "cpu")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def vl(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen3-VL-MoE (vision tower + MoE language model), and its prune 25% output."""
    work = tmp_path_factory.mktemp("vl")
    src = build("qwen3_vl_moe", work / "src", tokenizer_dir)
    _cli("prune", src, "--ratio", "0.25", "--method", "frequency", *CALIB, "-o", work / "pruned")
    return src, work / "pruned"


def test_the_view_is_the_language_model_named_as_a_causal_lm(vl):
    src, _ = vl
    ck = Checkpoint(src)
    assert ck.family.nest == ("model.language_model", "lm_head")
    assert ck.config.model_type == "qwen3_vl_moe_text" and ck.wrapper_config.model_type == "qwen3_vl_moe"
    assert "model.embed_tokens.weight" in ck.weight_map and "lm_head.weight" in ck.weight_map
    assert any(k.startswith("model.visual.") for k in ck.weight_map)  # kept under its own name
    disk = load_file(str(src / "model.safetensors"))
    for k in ck.keys():  # every view key reads its checkpoint tensor
        assert ck.disk_key(k) in disk
    w = ck.moe_weights(ck.moe_layers[0])
    assert torch.equal(w.router, disk["model.language_model.layers.0.mlp.gate.weight"])
    assert family_for(tiny_config("qwen3_vl_moe")).nest == ck.family.nest


def test_prune_changes_only_the_routed_experts_and_the_text_expert_count(vl):
    src, out = vl
    before, after = _tensors(src), _tensors(out)
    routed = Checkpoint(src).family.routed_key_pattern
    moe = Checkpoint(src).moe_layers

    def owned(k: str) -> bool:  # the language model's routed experts and routers (checkpoint names)
        view = "model." + k[len("model.language_model.") :] if k.startswith("model.language_model.") else k
        return any(routed(l).match(view) for l in moe)

    kept = {k for k in before if not owned(k)}
    assert kept == {k for k in after if not owned(k)}
    assert any(k.startswith("model.visual.") for k in kept)
    for k in kept:  # vision tower, projector, attention, embeddings, norms, lm_head: byte-identical
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert b["text_config"].pop("num_local_experts") == 6 and a["text_config"].pop("num_local_experts") == 8
    assert a == b  # nothing else in config.json changed


def test_the_output_loads_as_image_text_to_text_with_the_logits_of_moecompress_load(vl):
    src, out = vl
    model = reload_clean(out)  # AutoModelForImageTextToText: no missing / unexpected keys, no warning
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    check_load(Checkpoint(src), out.parent)


@pytest.mark.slow
def test_the_published_layout_transposed_experts_is_read_and_kept(vl, tmp_path):
    """Qwen3-VL-MoE releases hold experts as [E, H, 2I] / [E, I, H] (transformers transposes them on load), while
    save_pretrained writes [E, 2I, H]: both read to the same view, and an output keeps its input's orientation."""
    src, _ = vl
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (hub / f.name).write_bytes(f.read_bytes())
    t = load_file(str(src / "model.safetensors"))
    t = {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
         for k, v in t.items()}  # fmt: skip
    save_file(t, str(hub / "model.safetensors"), metadata={"format": "pt"})
    a, b = Checkpoint(src), Checkpoint(hub)
    assert b.family.save_transposed and not a.family.save_transposed
    for l in a.moe_layers:
        wa, wb = a.moe_weights(l), b.moe_weights(l)
        assert torch.equal(wa.gate, wb.gate) and torch.equal(wa.up, wb.up) and torch.equal(wa.down, wb.down)
        for k, v in b.family.write_layer(wb, l).items():
            assert torch.equal(v, t[b.disk_key(k)]), k
    _cli("prune", hub, "--ratio", "0.25", "--method", "frequency", *CALIB, "-o", tmp_path / "out")
    got = _tensors(tmp_path / "out")
    E, H = 6, a.config.hidden_size
    assert got["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape[1] == H  # [E, H, 2I] kept
    assert got["model.language_model.layers.0.mlp.experts.down_proj"].shape[2] == H
    assert got["model.language_model.layers.0.mlp.experts.down_proj"].shape[0] == E
    reload_clean(tmp_path / "out")


def test_layouts_moecompress_load_cannot_read_back_are_refused_in_one_line(vl, tmp_path):
    src, _ = vl
    args = ["prune", str(src), "--ratio", "0.25", "--method", "frequency", "--layout", "per-layer", *CALIB]
    res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "pl")])
    assert res.exit_code == 2 and "writes it in the uniform or quantized layout only" in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 3 and not (tmp_path / "pl").exists()


def test_budget_plans_of_a_wrapper_are_refused_before_any_pass(vl, tmp_path, monkeypatch):
    """A layout known before the pass (a budget plan's per-expert counts, widths and bits) is refused up front, not
    after the calibration pass (quantized outputs load: tests/quant/test_wrapper_quant.py)."""
    cmd = ["compress", "--budget-ratio", "0.4"]
    from moecompress.core.engine import Engine

    def no_pass(*a, **k):
        raise AssertionError("a pass ran before the refusal")

    monkeypatch.setattr(Engine, "run", no_pass)
    src, _ = vl
    res = CliRunner().invoke(app, [cmd[0], str(src), *cmd[1:], *CALIB, "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "writes it in the uniform or quantized layout only" in res.output, res.output
    assert not (tmp_path / "q").exists()
