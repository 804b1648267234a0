"""Qwen3-Omni (issue 12): the thinker's text model, a Qwen3-MoE nested two configs deep (thinker_config.text_config;
on disk thinker.model.layers.*, in the module thinker.model.language_model.layers.*), is the expert view; the vision
and audio towers are copied through. transformers' wrapper has ``generate`` but no ``forward``: moecompress loads it
with its thinker's forward (derive.wrapper_auto_class), the text logits."""

from __future__ import annotations

import json

import family_checks
import family_models
import pytest
import torch
from family_checks import EXTRA_OPS, run_checks
from family_models import build, tiny_config
from transformers import AutoConfig

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.derive import derive, nests_text, wrapper_auto_class
from moecompress.core.errors import UserError

MT = "qwen3_omni_moe"


def with_talker() -> object:
    """The tiny Qwen3-Omni with its talker (the Instruct release's enable_audio_output): a second MoE text model
    (talker.model.layers.N.mlp.experts.*), a code predictor with its own lm_head, and a tiny code2wav."""
    base = tiny_config(MT).to_dict()
    d = AutoConfig.for_model(MT).to_dict()
    t, th = d["talker_config"], base["thinker_config"]
    t["text_config"] |= dict(layer_types=None, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=24,
                             num_experts_per_tok=2, num_experts=4, shared_expert_intermediate_size=24)  # fmt: skip
    t["code_predictor_config"] |= dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_code_groups=4,
                                       layer_types=["full_attention"])  # fmt: skip
    t |= dict(spatial_merge_size=2, num_code_groups=4, thinker_hidden_size=th["text_config"]["hidden_size"],
              accept_hidden_layer=1, codec_eos_token_id=90, codec_nothink_id=91, codec_think_bos_id=92,
              codec_think_eos_id=93, codec_pad_id=94, codec_bos_id=95)  # fmt: skip
    for k in ("audio_token_id", "image_token_id", "video_token_id", "vision_start_token_id", "audio_start_token_id"):
        t[k] = th.get(k, 300)
    c2w = d["code2wav_config"] | dict(codebook_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                      intermediate_size=48, num_hidden_layers=1, num_quantizers=4, decoder_dim=32,
                                      upsample_rates=[2, 2, 2, 2])  # fmt: skip
    return AutoConfig.for_model(MT, thinker_config=th, talker_config=t, code2wav_config=c2w, enable_audio_output=True)


@pytest.fixture
def talker_config(monkeypatch):
    cfg = with_talker()
    for mod in (family_models, family_checks):
        monkeypatch.setattr(mod, "tiny_config", lambda model_type, width=None: cfg)
    return cfg


def test_it_opens_round_trips_and_profiles_exactly(tmp_path, tokenizer_dir):
    """The thinker's text model is the view, two configs deep; view -> write is bit-exact, profile = brute force."""
    cfg = tiny_config(MT)
    assert getattr(cfg, "text_config", None) is None and nests_text(cfg)
    d = derive(cfg)
    assert d["nest"] == ("thinker.model.language_model", "thinker.lm_head")
    assert d["text_config"].to_dict() == cfg.thinker_config.text_config.to_dict()
    assert (d["module_block"], d["router"], d["experts"]) == ("mlp", "gate", "experts")
    r = run_checks(MT, tmp_path, tokenizer_dir, ops=("view_write", "profile"))
    assert r["supported"] and r["derived"], r
    assert r["ops"] == {"open": "ok", "view_write": "ok", "profile": "ok"}, r
    ck = Checkpoint(tmp_path / MT)
    assert ck._nest == ("thinker.model", "thinker.lm_head")  # the checkpoint's names, not the module's
    assert ck.wrapper_config.model_type == MT and ck.config.model_type == "qwen3_omni_moe_text"


def test_the_loaded_wrapper_forwards_through_its_thinker(tmp_path):
    path = build(MT, tmp_path / "m")
    cfg = tiny_config(MT)
    model = wrapper_auto_class(cfg).from_pretrained(path, experts_implementation="eager").eval()
    ids = torch.arange(10)[None] % 300
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = model.thinker(input_ids=ids).logits
    assert got.shape == (1, 10, cfg.thinker_config.text_config.vocab_size) and torch.equal(got, want)


@pytest.mark.slow
def test_every_operation_on_the_thinker(tmp_path, tokenizer_dir):
    """prune and quantize load in transformers' own class with no missing/unexpected keys and moecompress.load's
    logits; pruned logits = the base model with those experts masked; info, atom, merge, load, eval, report run."""
    r = run_checks(MT, tmp_path, tokenizer_dir, ops=("prune", "quantize", *EXTRA_OPS))
    assert set(r["ops"].values()) == {"ok"}, r
    out = json.loads((tmp_path / f"{MT}-out" / "pruned" / "config.json").read_text())
    base = json.loads((tmp_path / MT / "config.json").read_text())
    text, before = out["thinker_config"]["text_config"], base["thinker_config"]["text_config"]
    assert text["num_experts"] < before["num_experts"]  # the count moved in the text config, two deep
    assert {k: v for k, v in out.items() if k != "thinker_config"} == {
        k: v for k, v in base.items() if k != "thinker_config"
    }
    assert out["thinker_config"]["vision_config"] == base["thinker_config"]["vision_config"]


def test_with_its_talker_the_view_is_the_thinkers_and_quantize_is_refused_in_one_line(tmp_path, talker_config):
    assert derive(talker_config)["nest"] == ("thinker.model.language_model", "thinker.lm_head")
    ck = Checkpoint(build(MT, tmp_path / "m"))
    assert any(k.startswith("talker.model.layers.0.mlp.experts.") for k in ck.weight_map)
    with pytest.raises(UserError, match="holds experts outside its language model"):
        ck.check_layout("quantized")
    ck.check_layout("uniform")


@pytest.mark.slow
def test_with_its_talker_every_other_operation_works(tmp_path, tokenizer_dir, talker_config):
    """The talker's tensors are copied through; prune loads in transformers' class with the base model's logits with
    those experts masked, and so on; quantize is refused (exit 2) before the pass."""
    r = run_checks(MT, tmp_path, tokenizer_dir, ops=("view_write", "profile", "prune", "quantize", *EXTRA_OPS))
    assert r["ops"].pop("quantize") == "failed: AssertionError: SystemExit: 2", r
    assert set(r["ops"].values()) == {"ok"}, r
