"""Every MoE model type the installed transformers ships: derived and checked end to end, or refused for its
listed reason (issue 12). The model types are enumerated from the installed transformers, so the next release
is tested without edits: a new type must pass every check, or its refusal must be added to REFUSED knowingly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from family_checks import family_or_refusal, run_checks
from family_models import build, installed_moe_types, tiny_config

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.derive import derive
from moecompress.core.errors import UserError
from moecompress.core.families import FAMILIES, family_for

TYPES = installed_moe_types()

# model type -> what its one-line refusal must say (the reason moecompress cannot support it correctly yet);
# (lfm2_moe, deepseek_ocr2 and qwen4_exp are built with the fields their default configs leave None: REAL_FIELDS).
# Multimodal wrappers are read through their language model (qwen3_5_moe, qwen3_vl_moe, glm4v_moe, qwen3_omni_moe);
# the others are refused for what their text model has
REFUSED: dict[str, str] = {
    "diffusion_gemma": "does not find one text model",
    "ernie4_5_vl_moe": "not one block.experts per layer",
    "glm5_next": "converts its tensor",
    "inkling": "no config class registered",
    "inkling2": "converted on save",
    "minimax_m3_vl": "too large to map by markers",
    "mistral4": "has no causal-LM class",
    "openai_privacy_filter": "has no causal-LM class",
    "zaya": "no single router",
}

# fast subset for the default suite: derived families of different shapes (shared experts, correction bias and
# groups, mixed sliding/full attention, linear-attention hybrid)
FAST = ("glm4_moe", "mellum", "cohere2_moe", "qwen3_next")


def test_the_enumeration_sees_every_hand_written_family():
    assert len(TYPES) >= 40
    for fam in FAMILIES:
        assert set(fam.model_types) <= set(TYPES), fam.name


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_derivation_agrees_with_the_hand_written_record(model_type):
    """The transcribed records are what derivation finds (disk names, router, shared experts, routing)."""
    cfg = tiny_config(model_type)
    d, fam = derive(cfg), family_for(cfg)
    for name in ("disk_block", "module_block", "router", "experts", "expert_names", "shared", "shared_gate"):
        assert d[name] == getattr(fam, name), name
    assert d["correction_bias"] == fam.correction_bias and d["routing_like"] == model_type
    assert set(d["count_keys"]) <= set(fam.count_keys)
    assert d["dense"] == fam.dense_layers(cfg)


@pytest.mark.parametrize("model_type", FAST)
def test_a_derived_family_opens_round_trips_and_profiles_exactly(model_type, tmp_path, tokenizer_dir):
    assert model_type not in REFUSED and model_type in TYPES
    r = run_checks(model_type, tmp_path, tokenizer_dir, ops=("view_write", "profile"))
    assert r["supported"] and r["derived"], r
    assert r["ops"] == {"open": "ok", "view_write": "ok", "profile": "ok"}, r


def test_a_derived_family_prunes_and_quantizes_to_clean_transformers_checkpoints(tmp_path, tokenizer_dir):
    r = run_checks("cohere2_moe", tmp_path, tokenizer_dir, ops=("prune", "quantize"))
    assert r["ops"] == {"open": "ok", "prune": "ok", "quantize": "ok"}, r


def test_group_routing_prunes_whole_groups_and_equals_the_base_model_with_those_experts_masked(tmp_path, tokenizer_dir):
    """glm4_moe routes within contiguous groups (sigmoid + correction bias, top-2 group scores) by its own code:
    prune removes the same number of experts from every group, so the pruned model's logits equal the base
    model's with those experts masked out of routing (the check fails if a removal regroups experts)."""
    r = run_checks("glm4_moe", tmp_path, tokenizer_dir, ops=("prune", "quantize"))
    assert r["ops"] == {"open": "ok", "prune": "ok", "quantize": "ok"}, r
    removed = Checkpoint(tmp_path / "glm4_moe-out" / "pruned").manifest.stage("prune")["layers"]
    for info in removed.values():  # 8 experts in 2 groups of 4: one from each
        assert sorted(e // 4 for e in info["removed"]) == [0, 1], info


def test_group_routing_is_refused_only_when_its_groups_are_not_contiguous_index_blocks():
    glm = family_for(tiny_config("glm4_moe"))
    assert glm.group_key == "n_group" and glm.groups_contiguous and glm.routing_verified_by == "behaviour"
    cfg = tiny_config("glm4_moe")
    glm.check_routing(cfg, "expert pruning", True, False, "")  # verified: no refusal
    odd = replace(glm, groups_contiguous=False)
    with pytest.raises(UserError, match="routes within groups of experts"):
        odd.check_routing(cfg, "expert pruning", True, False, "")


def test_derived_routing_is_marked_unknown_unless_it_copies_a_hand_written_router(tmp_path, tokenizer_dir):
    """prune's output-error search re-implements routing: a derived router it does not know must say so; one whose
    code differs but whose block routes as the re-implementation (core.routing_check) is verified by behaviour."""
    glm = Checkpoint(build("glm4_moe", tmp_path / "glm", tokenizer_dir))
    assert glm.family.derived and glm.family.routing_known  # sigmoid + correction bias, own code
    assert glm.family.routing_verified_by == "behaviour"  # not by source: its block ran against route()
    assert not family_for(tiny_config("phimoe")).routing_known  # its sparsemixer: no RouterSpec variant
    mellum = family_for(tiny_config("mellum"))
    assert mellum.derived and mellum.routing_known and mellum.routing_verified_by == "source"  # Qwen3-MoE's code
    assert glm.family.correction_bias == "e_score_correction_bias" and glm.family.group_key == "n_group"
    w = glm.moe_weights(glm.moe_layers[0])
    assert w.correction_bias is not None and w.correction_bias.shape == (glm.num_experts,)
    assert not torch.equal(w.correction_bias, torch.zeros_like(w.correction_bias))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_listed_refusals_name_their_reason(model_type):
    cfg, reason = family_or_refusal(model_type)
    assert cfg is None and REFUSED[model_type] in reason, reason


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_every_installed_moe_type(model_type, tmp_path, tokenizer_dir):
    """Supported: open, view -> write bit-identical, profile = brute force, prune and quantize load cleanly."""
    r = run_checks(model_type, tmp_path, tokenizer_dir)
    if model_type in REFUSED:
        assert not r["supported"] and REFUSED[model_type] in r["reason"], r
        return
    assert r["supported"], f"{model_type} is refused ({r.get('reason')}): support it or list it in REFUSED"
    fam = Checkpoint(build(model_type, tmp_path / "again", tokenizer_dir)).family
    unverified_groups = fam.routing_verified_by in (None, "behaviour") and not fam.groups_contiguous
    refusable = {"prune"} if fam.group_key and unverified_groups else set()
    if fam.hash_layers:  # DeepSeek-V4: layers routed by a token -> expert table refuse expert removal
        refusable.add("prune")
    if fam.fused_disk or fam.nest:  # per-expert quantized tensors would not load in transformers / moecompress.load
        refusable.add("quantize")
    assert all(v == "ok" or (k in refusable and v.startswith("refused:")) for k, v in r["ops"].items()), r["ops"]


def test_the_fast_subset_keeps_mixed_layer_types():
    """cohere2_moe (sliding + full attention, window 8 < the 16-token windows) and qwen3_next (linear + full
    attention) exercise the stream's per-type layer inputs in the profile = brute force check above: each type
    comes before a later MoE layer (with the first layer's inputs replayed to every layer, cohere2_moe's check
    fails at layer 2)."""
    for model_type in ("cohere2_moe", "qwen3_next"):
        cfg = tiny_config(model_type)
        assert len(set(cfg.layer_types)) > 1 and len(set(cfg.layer_types[:2])) == 2, model_type
    assert tiny_config("cohere2_moe").sliding_window == 8
