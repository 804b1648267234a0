"""Quantized multimodal wrappers (issue 12): a tiny Qwen3.5-MoE (natively multimodal: a vision tower beside its MoE
language model), quantized to 4 bits, loads in plain transformers (its own image-text-to-text class, with
compressed-tensors) with no missing or unexpected keys, and in moecompress.load with the same logits; the vision
tower and every other tensor outside the language model are copied byte for byte.

The model is bf16, as published checkpoints are: transformers 5.23 leaves a wrapper's dequantized fused experts in
the scale dtype (bf16) when the rest of the model is float32, so a float32 wrapper's quantized output loads but does
not run in transformers (moecompress.load is not affected)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import _cli, reload_clean  # noqa: E402
from family_models import build  # noqa: E402

from moecompress import load  # noqa: E402
from moecompress.core.manifest import Manifest  # noqa: E402

CALIB = ("--samples", "2", "--seq-len", "16", "--device", "cpu")
LM = "model.language_model."


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _bf16(folder: Path) -> Path:
    """The saved model in bf16 (its tensors and config.json's dtype)."""
    for f in folder.glob("*.safetensors"):
        t = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file(t, str(f), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    for c in (cfg, *(v for v in cfg.values() if isinstance(v, dict) and "dtype" in v)):
        c["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def q35(tmp_path_factory, tokenizer_dir):
    """A tiny bf16 Qwen3.5-MoE and its RTN 4-bit quantized output."""
    work = tmp_path_factory.mktemp("q35")
    src = _bf16(build("qwen3_5_moe", work / "src", tokenizer_dir))
    _cli("quantize", src, "--bits", "4", "--plan", "uniform", "--method", "rtn", *CALIB, "-o", work / "q4")
    return src, work / "q4"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_rtn_output_loads_in_transformers_and_moecompress_load_with_equal_logits(q35):
    src, out = q35
    theirs = reload_clean(out)  # AutoModelForImageTextToText + compressed-tensors: no missing/unexpected keys
    assert type(theirs).__name__ == "Qwen3_5MoeForConditionalGeneration"
    ref = _logits(theirs)
    for packed in (False, True):
        from moecompress.quant.load import load_quantized

        ours = load_quantized(out, dtype=torch.bfloat16, packed=packed)
        assert type(ours).__name__ == "Qwen3_5MoeForConditionalGeneration"
        assert torch.equal(_logits(ours), ref), packed
    assert torch.equal(_logits(load(out, dtype=torch.bfloat16)), ref)
    base = _logits(reload_clean(src))
    kl = torch.nn.functional.kl_div(ref.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < kl.item() < 0.05  # quantized, not garbage


def test_vision_tower_is_copied_and_the_config_names_the_wrappers_modules(q35):
    src, out = q35
    before, after = _tensors(src), _tensors(out)
    other = [k for k in before if not k.startswith((LM, "lm_head."))]
    assert any(k.startswith("model.visual.") for k in other)
    for k in other:  # vision tower (and anything else outside the language model): byte-identical, not quantized
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert not any(k.startswith("model.visual.") and k.endswith("weight_packed") for k in after)
    assert f"{LM}layers.0.mlp.experts.0.gate_proj.weight_packed" in after
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]  # at config.json's top, where transformers reads it; text_config holds none
    assert q["format"] == "pack-quantized" and "quantization_config" not in cfg["text_config"]
    targets = [t for g in q["config_groups"].values() for t in g["targets"]]
    named = [t for t in targets if "layers" in t]
    assert named and all(re_lm in t for t in named for re_lm in [r"model\.language_model\.layers"])
    assert not any("visual" in t for t in [*targets, *q["ignore"]])
    src_cfg = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg  # nothing else changed
    assert Manifest.read(out).layout == "quantized"


@pytest.mark.slow
def test_compress_prune_then_quantize_of_a_wrapper_loads_in_both(q35, tmp_path):
    """compress writes config.json's own dict: its quantize stage's targets are renamed to the wrapper's modules too."""
    src, _ = q35
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- prune: {ratio: 0.25, method: frequency}\n- quantize: {bits: 4}\n")
    out = tmp_path / "c"
    _cli("compress", src, "--recipe", recipe, *CALIB, "-o", out)
    targets = [t for g in json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
               for t in g["targets"]]  # fmt: skip
    assert not any(t.startswith(r"re:^model\.layers") for t in targets)
    assert torch.equal(_logits(load(out, dtype=torch.bfloat16)), _logits(reload_clean(out)))
