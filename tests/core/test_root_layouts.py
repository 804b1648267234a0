"""Model types whose checkpoint keeps its tensors under other roots than transformers' modules (issue 12):

- Aria (``aria``, a multimodal wrapper): llava's legacy names on disk - the language model as
  ``language_model.model.*``, its head as ``language_model.lm_head``, the vision tower and projector at the root
  (module: ``model.language_model.*``, ``lm_head``, ``model.vision_tower.*``) - and experts fused on disk as
  ``mlp.experts.fc1.weight`` [E, H, 2I] / ``fc2.weight`` [E, I, H] (transposed in memory too: x @ W). Read and written
  under the checkpoint's names; the stream runs its experts in the view's layout with the module's own SiLU gate.
- Mistral-Large-4 (``mistral_large4``): Mistral's native names at the root (``layers.N.experts.E.w1``,
  ``tok_embeddings``, ``output``): tests/families/test_mistral_large4.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import disk_keys, run_checks  # noqa: E402
from family_models import build, tiny_config  # noqa: E402

from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.derive import derive, nest_disk_body, nest_disk_head  # noqa: E402


def test_aria_is_read_under_its_legacy_names_with_experts_fused_on_disk():
    cfg = tiny_config("aria")
    d = derive(cfg)
    assert d["nest"] == ("model.language_model", "lm_head")
    assert nest_disk_body(cfg) == "language_model.model" and nest_disk_head(cfg) == "language_model.lm_head"
    assert d["fused_names"] == ("experts.fc1.weight", "experts.fc2.weight", "")
    assert d["flags"]["is_transposed"] and d["view"] == () and d["renames"] == ()


def test_aria_checkpoint_maps_disk_and_view_both_ways(tmp_path, tokenizer_dir):
    path = build("aria", tmp_path / "aria", tokenizer_dir)
    disk = disk_keys(path)
    assert "language_model.lm_head.weight" in disk and "language_model.model.layers.0.mlp.experts.fc1.weight" in disk
    ck = Checkpoint(path)
    assert ck.family.fused_disk and ck.moe_layers == [0, 1, 2, 3]
    assert "lm_head.weight" in ck.weight_map and "model.embed_tokens.weight" in ck.weight_map
    assert ck.disk_key("lm_head.weight") == "language_model.lm_head.weight"
    assert ck.disk_key("model.layers.2.mlp.router.weight") == "language_model.model.layers.2.mlp.router.weight"
    assert ck.view_key("language_model.model.norm.weight") == "model.norm.weight"
    assert ck.view_key("vision_tower.post_layernorm.weight") == "vision_tower.post_layernorm.weight"  # copied as is
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as s:
        head = s.get_tensor("language_model.lm_head.weight")
        fc1 = s.get_tensor("language_model.model.layers.1.mlp.experts.fc1.weight")
    assert torch.equal(ck.read(["lm_head.weight"])["lm_head.weight"], head)
    E, H, I2 = fc1.shape
    assert E == ck.num_experts and H == ck.config.hidden_size


def test_aria_view_writes_profiles_prunes_and_refuses_quantize_in_one_line(tmp_path, tokenizer_dir):
    """view -> write bit-exact, profile = brute force on transformers' model, frequency prune 25% loads clean in
    AriaForConditionalGeneration with logits = the base with those experts masked out of routing; quantize is refused
    (experts fused on disk, as for every such family)."""
    r = run_checks("aria", tmp_path, tokenizer_dir, ops=("view_write", "profile", "prune", "quantize"))
    assert r["supported"] and r["derived"], r
    assert r["ops"] == {
        "open": "ok",
        "view_write": "ok",
        "profile": "ok",
        "prune": "ok",
        "quantize": "refused: experts fused on disk: per-expert quantized tensors would not load in transformers",
    }, r
