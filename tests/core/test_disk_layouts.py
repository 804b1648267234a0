"""Model types whose disk layout or config is what stood in the way (issue 12):

- LFM2-MoE (``lfm2_moe``, LFM2-8B-A1B): its config class leaves ``layer_types`` None (every published config.json
  sets it); a config without it is refused naming the key. Its block passes ``expert_bias`` to its router through a
  local alias: carried as the correction bias (saved as ``feed_forward.expert_bias``).
- Kimi-Linear (``kimi_linear``) and Bailing-hybrid (``bailing_hybrid``): transformers concatenates the q/k/v
  convolutions into one ``self_attn.conv1d.weight`` on load; Bailing-hybrid also renames ``model.word_embeddings``.
  The checkpoint's view names them as the modules do (read concatenated), outputs write the disk tensors back bit for
  bit; a quantized output keeps the conv whole (transformers' compressed-tensors loader cannot concatenate the
  pieces), which transformers loads.
- DeepSeek-OCR-2 and Unlimited-OCR (``deepseek_ocr2``, ``unlimited_ocr``, multimodal wrappers): the checkpoint
  keeps the language model as model.* where the module has model.language_model.*: read and written under the
  checkpoint's names; DeepSeek-OCR-2's text model class has no Auto mapping (built from its own modeling module).
- Renamed modules and parameters (A.X-K2's ``W_down``, Flint's ``softmax_offset``, MiMo-V2-Flash's
  ``attention_sink_bias``) and correction biases saved elsewhere (Kolibri-1's ``moe.router.expert_bias``, Laguna's
  ``experts.e_score_correction_bias``): outputs keep the disk names, quantized ones load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import OPS, _cli, reload_clean, run_checks  # noqa: E402
from family_models import build, tiny_config  # noqa: E402

from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.derive import derive  # noqa: E402
from moecompress.core.errors import UserError  # noqa: E402
from moecompress.core.families import family_for  # noqa: E402

CALIB = ("--samples", "2", "--seq-len", "16", "--device", "cpu")


def _read(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_a_config_without_a_key_its_code_reads_is_refused_naming_the_key():
    """LFM2-MoE's config class defaults layer_types to None and its decoder layer indexes it: the refusal says which
    key to add, not transformers' TypeError."""
    cfg = AutoConfig.for_model("lfm2_moe", num_hidden_layers=4, num_experts=8, hidden_size=64, vocab_size=320)
    with pytest.raises(UserError, match=r"config.json has no layer_types \(None\).*add layer_types to config.json"):
        family_for(cfg)
    ocr = AutoConfig.for_model("deepseek_ocr2")  # a wrapper: the key belongs in its text_config
    with pytest.raises(UserError, match=r"config.json's text_config has no mlp_layer_types"):
        family_for(ocr)


def test_lfm2_moe_is_derived_with_its_block_expert_bias_as_the_correction_bias():
    d = derive(tiny_config("lfm2_moe"))
    assert (d["disk_block"], d["module_block"], d["expert_names"]) == (
        "feed_forward",
        "feed_forward",
        ("w1", "w3", "w2"),
    )
    assert d["correction_module"] == "expert_bias" and d["disk_correction"] == "expert_bias"
    assert d["dense"] == frozenset({0, 1}) and d["final_norm"] == "embedding_norm" and not d["view"]


def test_lfm2_moe_prunes_with_its_expert_bias_sliced(tmp_path, tokenizer_dir):
    """view -> write bit-exact; prune 25%: the pruned logits equal the base model's with the removed experts masked
    out of routing, and feed_forward.expert_bias is the base's at the kept experts."""
    r = run_checks("lfm2_moe", tmp_path, tokenizer_dir, ops=("view_write", "prune"))
    assert r["ops"] == {"open": "ok", "view_write": "ok", "prune": "ok"}, r
    base, out = _read(tmp_path / "lfm2_moe"), tmp_path / "lfm2_moe-out" / "pruned"
    pruned = _read(out)
    for l, info in Checkpoint(out).manifest.stage("prune")["layers"].items():
        key = f"model.layers.{l}.feed_forward.expert_bias"
        kept = [e for e in range(base[key].shape[0]) if e not in info["removed"]]
        assert info["removed"] and torch.equal(pruned[key], base[key][kept]), l


def test_kimi_linear_conv_is_read_concatenated_and_written_back_as_its_disk_tensors(tmp_path):
    ck = Checkpoint(build("kimi_linear", tmp_path / "m"))
    disk = _read(ck.path)
    convs = [k for k in ck.keys() if k.endswith("self_attn.conv1d.weight")]
    assert convs and not any("q_conv1d" in k for k in ck.keys())
    for key in convs:
        pieces = [key.replace("conv1d", f"{p}_conv1d") for p in "qkv"]
        got = ck.get(key)
        assert torch.equal(got, torch.cat([disk[k] for k in pieces], 0))
        back = dict(ck.disk_items(key, got))
        assert list(back) == pieces and all(torch.equal(back[k], disk[k]) for k in pieces)
        with pytest.raises(UserError, match="may not change it"):
            ck.disk_items(key, got[:-1])
        with pytest.raises(UserError, match="concatenates from"):
            ck.disk_items(key + "_packed", got)
    renamed = [k for k in ck.keys() if "forget_gate" in k]
    assert renamed == [] and any(k.endswith("self_attn.f_a_proj.weight") for k in ck.keys())  # Family.renames


def test_bailing_hybrid_word_embeddings_keep_their_disk_name(tmp_path):
    ck = Checkpoint(build("bailing_hybrid", tmp_path / "m"))
    assert "model.embed_tokens.weight" in ck.keys() and "model.word_embeddings.weight" not in ck.keys()
    assert ck.disk_key("model.embed_tokens.weight") == "model.word_embeddings.weight"
    assert torch.equal(ck.get("model.embed_tokens.weight"), _read(ck.path)["model.word_embeddings.weight"])


def test_correction_biases_saved_outside_the_router_are_read_under_the_view_and_written_under_their_disk_name(
    tmp_path,
):
    """Kolibri-1 saves the router's correction bias outside the MoE block (moe.router.expert_bias): the view names
    it as the module does; Laguna saves it inside the experts (mlp.experts.e_score_correction_bias)."""
    ck = Checkpoint(build("kolibri1", tmp_path / "k"))
    l = ck.moe_layers[0]
    view, disk = f"model.layers.{l}.mlp.gate.e_score_correction_bias", f"model.layers.{l}.moe.router.expert_bias"
    assert view in ck.keys() and disk not in ck.keys() and ck.disk_key(view) == disk and ck.view_key(disk) == view
    w = ck.moe_weights(l)
    assert torch.equal(w.correction_bias, _read(ck.path)[disk]) and w.correction_bias.abs().sum() > 0
    assert ck.family.write_layer(w, l)[view] is not None
    lag = Checkpoint(build("laguna", tmp_path / "l"))
    assert lag.family.disk_correction == "experts.e_score_correction_bias"
    key = lag.family.correction_key(lag.moe_layers[0])
    assert torch.equal(lag.moe_weights(lag.moe_layers[0]).correction_bias, _read(lag.path)[key])


def test_a_wrapper_whose_checkpoint_keeps_the_text_model_elsewhere_is_read_and_written_under_its_disk_names(tmp_path):
    """DeepSeek-OCR-2 saves its language model as model.layers.* / model.embed_tokens (the module:
    model.language_model.*): the view's names are the disk names, and every key an output writes maps back to them."""
    ck = Checkpoint(build("deepseek_ocr2", tmp_path / "m"))
    assert ck.family.nest == ("model.language_model", "lm_head")
    disk = set(_read(ck.path))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= disk
    assert not any(k.startswith("model.language_model.") for k in disk)
    assert all(ck.disk_key(k) == k for k in ck.keys())
    l = ck.moe_layers[0]
    new = f"model.layers.{l}.mlp.experts.0.gate_proj.weight_packed"  # a key no checkpoint holds yet
    assert ck.disk_key(new) == new
    assert ck.moe_weights(l).gate.shape[0] == ck.num_experts


@pytest.mark.slow
def test_kimi_linear_prune_keeps_the_disk_bytes_and_quantize_keeps_the_conv_whole(tmp_path, tokenizer_dir):
    """Prune: every non-routed tensor of the output is the base's, under its disk name (q/k/v_conv1d); quantize
    (attention at 8 bits): the conv is written whole as self_attn.conv1d.weight and the output loads in plain
    transformers with no missing or unexpected keys."""
    r = run_checks("kimi_linear", tmp_path, tokenizer_dir, ops=("prune", "quantize"))
    assert r["ops"] == {"open": "ok", "prune": "ok", "quantize": "ok"}, r
    base, out = _read(tmp_path / "kimi_linear"), tmp_path / "kimi_linear-out"
    pruned = _read(out / "pruned")
    same = [k for k in base if "conv1d" in k or "word" in k or "f_a_proj" in k]
    assert same and all(torch.equal(pruned[k], base[k]) for k in same)
    q = _read(out / "q4")
    for k in [k for k in base if "q_conv1d" in k]:
        whole = k.replace("q_conv1d", "conv1d")
        assert whole in q and not any(p in q for p in (k, k.replace("q_", "k_")))
        assert torch.equal(q[whole], torch.cat([base[k], base[k.replace("q_", "k_")], base[k.replace("q_", "v_")]]))
    assert any(k.endswith("self_attn.f_a_proj.weight_packed") for k in q)  # renamed module, quantized, loads back


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["axk2", "flint", "mimo_v2_flash"])
def test_renamed_modules_quantize_to_checkpoints_transformers_loads(model_type, tmp_path, tokenizer_dir):
    """Every other weight at 8 bits (the renamed modules too): the output loads in plain transformers cleanly."""
    base = build(model_type, tmp_path / model_type, tokenizer_dir)
    out = tmp_path / "q"
    _cli(
        "quantize", base, "--bits", "4", "--plan", "uniform", "--method", "rtn", "--other-bits", "8", *CALIB, "-o", out
    )
    reload_clean(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type", ["lfm2_moe", "kimi_linear", "bailing_hybrid", "kolibri1", "laguna", "deepseek_ocr2", "unlimited_ocr"]
)
def test_family_checks(model_type, tmp_path, tokenizer_dir):
    """open, view -> write bit-exact, profile = brute force, prune (masked-routing logits), quantize loads, info,
    eval, load, report; merge and atom are either ok or refused in one line."""
    assert family_for(tiny_config(model_type)).derived
    r = run_checks(model_type, tmp_path, tokenizer_dir, ops=(*OPS, "info", "atom", "merge", "eval", "load", "report"))
    assert r["supported"], r
    wrapper = model_type in ("deepseek_ocr2", "unlimited_ocr")
    refusable = ("atom", "merge", "quantize") if wrapper else ("atom", "merge")
    bad = {k: v for k, v in r["ops"].items() if v != "ok" and not (k in refusable and v.startswith("refused:"))}
    assert not bad, r
