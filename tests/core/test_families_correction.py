"""Families whose routing correction bias or router sits where DeepSeek-V3's does not (issue 12):

- MiniMax-M2 (``minimax_m2``): the MoE block holds ``e_score_correction_bias`` [E] and passes it to its router;
  saved as ``block_sparse_moe.e_score_correction_bias``.
- HY-V3 (``hy_v3``): the same block buffer, saved as ``mlp.expert_bias``; router saved as ``mlp.router.gate``,
  shared experts as ``mlp.shared_mlp``.
- ERNIE-4.5 (``ernie4_5_moe``): the router holds it in ``moe_statics`` as a [1, E] parameter (top-k in ``moe_k``).
- Hunyuan (``hunyuan_v1_moe``): the gate module holds the router as a Linear child ``gate.wg``.
- AFMoE (``afmoe``): the block's ``expert_bias`` parameter, passed to its router module (Linear ``router.gate``).

Each is carried as the block's correction bias (sliced with the router rows on expert removal, its disk key and shape
kept); the family checks (view -> write bit-exact, profile = brute force, prune logits = base with the experts
masked out of routing, quantize loads in plain transformers) pass for each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import OPS, run_checks  # noqa: E402
from family_models import build, tiny_config  # noqa: E402

from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.derive import derive  # noqa: E402
from moecompress.core.families import family_for  # noqa: E402

# model type -> derived fields that place the correction bias and the router
WHERE = {
    "minimax_m2": dict(
        correction_module="e_score_correction_bias", disk_correction="e_score_correction_bias",
        correction_row=False, disk_block="block_sparse_moe", router="gate", disk_router=None,
    ),
    "hy_v3": dict(
        correction_module="e_score_correction_bias", disk_correction="expert_bias", correction_row=False,
        disk_block="mlp", router="gate", disk_router="router.gate",
    ),
    "ernie4_5_moe": dict(
        correction_module="gate.moe_statics.e_score_correction_bias",
        disk_correction="moe_statics.e_score_correction_bias", correction_row=True, disk_block="mlp",
        router="gate", disk_router=None,
    ),
    "afmoe": dict(
        correction_module="expert_bias", disk_correction="expert_bias", correction_row=False, disk_block="mlp",
        router="router.gate", disk_router=None,
    ),
    "hunyuan_v1_moe": dict(
        correction_module=None, disk_correction=None, correction_row=False, disk_block="mlp", router="gate.wg",
        disk_router=None,
    ),
}  # fmt: skip


def _read(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("model_type", sorted(WHERE))
def test_derivation_places_the_correction_bias_and_the_router(model_type):
    d = derive(tiny_config(model_type))
    for name, want in WHERE[model_type].items():
        assert d[name] == want, (name, d[name])
    assert d["correction_bias"] == ("e_score_correction_bias" if model_type != "hunyuan_v1_moe" else None)
    assert not d["routing_like"]  # routing not re-implemented: merge and the output-error search refuse it


def test_the_view_reads_and_writes_the_correction_bias_under_its_disk_key_and_shape(tmp_path):
    """ERNIE-4.5's [1, E] parameter is [E] in the view and [1, E] again on write; the module gets it back where its
    code reads it (a parameter inside gate.moe_statics), so its routing uses the new values."""
    ck = Checkpoint(build("ernie4_5_moe", tmp_path / "m"))
    fam, l = ck.family, ck.moe_layers[0]
    key = f"model.layers.{l}.mlp.moe_statics.e_score_correction_bias"
    disk = ck.get(key)
    assert tuple(disk.shape) == (1, ck.num_experts) and disk.abs().sum() > 0
    w = ck.moe_weights(l)
    assert torch.equal(w.correction_bias, disk.reshape(-1))
    written = fam.write_layer(w.select([3, 0, 5]), l)
    assert torch.equal(written[key], disk[:, [3, 0, 5]])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ck.path)
    block = model.model.layers[l].mlp
    assert torch.equal(fam.correction_of(block), disk.reshape(-1))
    fam.set_correction(block, torch.arange(3.0))
    statics = block.gate.moe_statics
    assert isinstance(statics.e_score_correction_bias, torch.nn.Parameter)
    assert torch.equal(statics.e_score_correction_bias, torch.arange(3.0).reshape(1, 3))


def test_minimax_m2_prunes_with_its_block_correction_bias_sliced(tmp_path, tokenizer_dir):
    """view -> write bit-exact; prune 25%: the output's block_sparse_moe.e_score_correction_bias is the base's at the
    kept experts, in order, and the pruned logits equal the base model's with the removed experts masked out of
    routing (their router logits and correction bias -inf); quantize loads in plain transformers."""
    r = run_checks("minimax_m2", tmp_path, tokenizer_dir, ops=("view_write", "prune", "quantize"))
    assert r["ops"] == {"open": "ok", "view_write": "ok", "prune": "ok", "quantize": "ok"}, r
    base = _read(tmp_path / "minimax_m2")
    out = tmp_path / "minimax_m2-out" / "pruned"
    pruned, layers = _read(out), Checkpoint(out).manifest.stage("prune")["layers"]
    for l, info in layers.items():
        key = f"model.layers.{l}.block_sparse_moe.e_score_correction_bias"
        kept = [e for e in range(base[key].shape[0]) if e not in info["removed"]]
        assert info["removed"] and torch.equal(pruned[key], base[key][kept]), l


def test_quantized_targets_name_the_modules_transformers_renames_on_load(tmp_path):
    """HY-V3 saves its shared experts as mlp.shared_mlp.*, the loaded modules are mlp.shared_experts.*:
    compressed-tensors matches the module names, moecompress.load the checkpoint's, so targets name both."""
    ck = Checkpoint(build("hy_v3", tmp_path / "m"))
    q = {
        "config_groups": {"g": {"targets": [r"re:^model\.layers\.1\.mlp\.shared_mlp\.down_proj$", "re:.*attn"]}},
        "ignore": ["lm_head"],
    }
    got = ck.output_config({"quantization_config": q})["quantization_config"]
    assert got["config_groups"]["g"]["targets"] == [
        r"re:^model\.layers\.1\.mlp\.shared_mlp\.down_proj$",
        "re:.*attn",
        r"re:^model\.layers\.1\.mlp\.shared_experts\.down_proj$",
    ]
    assert got["ignore"] == ["lm_head"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["hy_v3", "ernie4_5_moe", "hunyuan_v1_moe", "afmoe"])
def test_family_checks(model_type, tmp_path, tokenizer_dir):
    """open, view -> write bit-exact, profile = brute force, prune (masked-routing logits), quantize loads."""
    assert family_for(tiny_config(model_type)).derived
    r = run_checks(model_type, tmp_path, tokenizer_dir, ops=OPS)
    assert r["supported"] and all(v == "ok" for v in r["ops"].values()), r
