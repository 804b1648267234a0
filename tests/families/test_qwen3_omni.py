"""Qwen3-Omni (issue 12): the thinker's text model, a Qwen3-MoE nested two configs deep (thinker_config.text_config;
on disk thinker.model.layers.*, in the module thinker.model.language_model.layers.*), is the expert view; the vision
and audio towers are copied through. transformers' wrapper has ``generate`` but no ``forward``: moecompress loads it
with its thinker's forward (derive.wrapper_auto_class), the text logits."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import EXTRA_OPS, run_checks
from family_models import build, tiny_config

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.derive import derive, nests_text, wrapper_auto_class

MT = "qwen3_omni_moe"


def test_the_thinkers_text_model_is_the_view_two_configs_deep():
    cfg = tiny_config(MT)
    assert getattr(cfg, "text_config", None) is None and nests_text(cfg)
    d = derive(cfg)
    assert d["nest"] == ("thinker.model.language_model", "thinker.lm_head")
    assert d["text_config"].to_dict() == cfg.thinker_config.text_config.to_dict()
    assert (d["module_block"], d["router"], d["experts"]) == ("mlp", "gate", "experts")


def test_it_opens_round_trips_and_profiles_exactly(tmp_path, tokenizer_dir):
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
