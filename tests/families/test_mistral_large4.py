"""Mistral-Large-4 (``mistral_large4``, issue 12): a multimodal wrapper whose checkpoint keeps the language model at the
root in Mistral's native names. The decoder layer saves its MoE block's modules itself (``layers.N.experts.E.w1``,
``layers.N.gate``, ``layers.N.shared_experts.w1``; module ``layers.N.mlp.*``), attention and norms are renamed per
layer (``attention.wq`` -> ``self_attn.q_proj``), and outside the layers ``tok_embeddings``, ``norm``, ``output`` and
the rotary embedding's ``lerope.alpha`` (frequencies scaled by exp(alpha)) stand for ``embed_tokens``, ``norm``,
``lm_head`` and ``rotary_emb.alpha``; the vision tower and projector are copied as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_checks import check_profile, check_view_write, disk_keys, run_checks  # noqa: E402
from family_models import build, tiny_config  # noqa: E402

from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.derive import derive, nest_disk_body, nest_disk_head  # noqa: E402

T = "mistral_large4"


def _with_alpha(path: Path) -> torch.Tensor:
    """Give the saved lerope.alpha non-zero values (a released checkpoint's are learned; the tiny model saves its
    zero init, under which a stream that ignores it would still agree)."""
    f = next(path.glob("*.safetensors"))
    tensors = load_file(str(f))
    g = torch.Generator().manual_seed(0)
    tensors["lerope.alpha"] = torch.rand(tensors["lerope.alpha"].shape, generator=g) * 3 - 1.5
    save_file(tensors, str(f), metadata={"format": "pt"})
    return tensors["lerope.alpha"]


def test_derive_maps_the_native_root_layout():
    cfg = tiny_config(T)
    d = derive(cfg)
    assert d["nest"] == ("model.language_model", "lm_head")
    assert nest_disk_body(cfg) == "" and nest_disk_head(cfg) == "output"  # the text model at the root
    assert d["module_block"] == d["disk_block"] == "mlp" and d["router"] == "gate" and d["shared"] == "shared_experts"
    assert d["layer_parts"] == ("experts", "gate", "shared_experts") and d["expert_names"] == ("w1", "w3", "w2")
    renames = dict(d["renames"])
    assert renames["attention.wq.weight"] == "self_attn.q_proj.weight"
    assert renames["feed_forward.w1.weight"] == "mlp.gate_proj.weight"  # the dense layer's MLP
    assert renames["mlp.shared_experts.w2.weight"] == "mlp.shared_experts.down_proj.weight"
    assert set(d["view"]) == {
        ("", "model.embed_tokens.weight", (("tok_embeddings.weight", -1),)),
        ("", "model.rotary_emb.alpha", (("lerope.alpha", -1),)),
    }


def test_checkpoint_names_disk_and_view_both_ways(tmp_path, tokenizer_dir):
    path = build(T, tmp_path / T, tokenizer_dir)
    disk = disk_keys(path)
    ck = Checkpoint(path)
    pairs = {
        "layers.1.experts.3.w1.weight": "model.layers.1.mlp.experts.3.w1.weight",
        "layers.1.gate.weight": "model.layers.1.mlp.gate.weight",
        "layers.2.shared_experts.w3.weight": "model.layers.2.mlp.shared_experts.w3.weight",
        "layers.0.feed_forward.w2.weight": "model.layers.0.feed_forward.w2.weight",
        "layers.1.attention.wq.weight": "model.layers.1.attention.wq.weight",
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "lerope.alpha": "model.rotary_emb.alpha",
        "vision_encoder.ln_pre.weight": "vision_encoder.ln_pre.weight",  # the vision tower: as it is
    }
    for d, v in pairs.items():
        assert d in disk, d
        assert ck.view_key(d) == v and ck.disk_key(v) == d and v in ck.weight_map, (d, v)
    # new keys an operation writes keep the checkpoint's names
    assert ck.disk_key("model.layers.1.mlp.experts.0.w2.weight_packed") == "layers.1.experts.0.w2.weight_packed"
    assert ck.moe_layers == [1, 2, 3] and ck.num_experts == 8
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as s:
        w1 = s.get_tensor("layers.2.experts.5.w1.weight")
        gate = s.get_tensor("layers.2.gate.weight")
    w = ck.moe_weights(2)
    assert torch.equal(w.gate[5], w1) and torch.equal(w.router, gate)


def test_view_write_is_bit_exact_and_profile_reads_the_saved_rotary_alpha(tmp_path, tokenizer_dir):
    """The profile equals the brute-force loop on transformers' own model, which scales its RoPE frequencies by
    exp(lerope.alpha): the layer stream must load the saved alpha (the skeleton's is the zero init)."""
    path = build(T, tmp_path / T, tokenizer_dir)
    alpha = _with_alpha(path)
    ck = Checkpoint(path)
    check_view_write(ck)
    from moecompress.core.stream import skeleton

    assert torch.equal(skeleton(ck).model.rotary_emb.alpha, alpha)
    check_profile(ck)


@pytest.mark.slow
def test_every_operation_runs_or_refuses_in_one_line(tmp_path, tokenizer_dir):
    """Frequency prune 25% loads clean in MistralLarge4ForConditionalGeneration with the base's logits with those
    experts masked; 4-bit RTN loads clean there with moecompress.load's logits (bf16, equal); info, channel pruning,
    load, eval and report run; merge is refused in one line (its routing is not verified)."""
    every = ("view_write", "profile", "prune", "quantize", "info", "atom", "merge", "load", "eval", "report")
    r = run_checks(T, tmp_path, tokenizer_dir, ops=every)
    ops = r["ops"]
    assert ops.pop("merge").startswith("refused: merging re-implements the router"), r
    assert ops == {op: "ok" for op in ("open", *every) if op != "merge"}, r


@pytest.mark.slow
def test_one_pass_prune_and_quantize_loads_clean_with_moecompress_loads_logits(tmp_path, tokenizer_dir):
    """compress (frequency prune 25% then 4 bits): config.json's quantization_config names the renamed modules
    (attention.wq is self_attn.q_proj, shared_experts saved in the layer are mlp.shared_experts) so transformers loads
    it clean, with moecompress.load's logits."""
    import json

    from family_checks import _cli, reload_clean

    from moecompress import load

    path = build(T, tmp_path / T, tokenizer_dir)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"prune": {"ratio": 0.25, "method": "frequency"}}, {"quantize": {"bits": 4}}]))
    out = tmp_path / "c"
    _cli("compress", path, "--recipe", recipe, "--samples", "2", "--seq-len", "16", "--device", "cpu", "-o", out)
    targets = json.dumps(json.loads((out / "config.json").read_text())["quantization_config"])
    assert "self_attn\\\\.q_proj" in targets and "mlp\\\\.shared_experts\\\\.gate_proj" in targets, targets[:300]
    reload_clean(out)
    ids = torch.arange(12)[None] % 300
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out, experts_implementation="eager", dtype=torch.bfloat16)
    with torch.no_grad():
        a = load(out, dtype=torch.bfloat16)(input_ids=ids).logits.float()
        b = model(input_ids=ids).logits.float()
    assert torch.equal(a, b), float((a - b).abs().max())
