"""Channel pruning in the uniform layout of families whose shared experts are sized from the routed experts' width
key (DeepSeek-style ``moe_intermediate_size * n_shared_experts``): the count key is found on the meta-model, the
shared experts are zero-padded to K * n' channels, the output loads in plain transformers with no missing or
unexpected keys, its logits equal moecompress.load's, and the shared experts' output equals the base model's on the
same input; where no config key widens the module back (a dense or shared MLP sized by the key itself), the uniform
layout is refused in one line naming it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import from_pretrained, reload_clean  # noqa: E402
from family_models import MOE_WIDTH, build, tiny_config  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moecompress import load  # noqa: E402
from moecompress.atomic.run import atomic_prune, check_layout  # noqa: E402
from moecompress.atomic.shared import shared_padding  # noqa: E402
from moecompress.cli.main import app  # noqa: E402
from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.errors import UserError  # noqa: E402

# model type -> the count key the meta-model check must find, and its value in the tiny config
SHARED = {"deepseek_v3": ("n_shared_experts", 1), "glm4_moe": ("n_shared_experts", 1)}
SHARED.update(ernie4_5_moe=("moe_num_shared_experts", 2), hy_v3=("num_shared_experts", 1))  # hy_v3: shared_mlp on disk


@pytest.mark.parametrize("model_type", sorted(SHARED))
@pytest.mark.parametrize("kept", [16, 32])
def test_count_key_is_found_on_the_meta_model(model_type, kept):
    key, n = SHARED[model_type]
    cfg = tiny_config(model_type)
    plan = shared_padding(cfg, "moe_intermediate_size", kept, ".experts.")
    assert plan.refusal is None and plan.count_key == key and plan.count == n
    assert plan.new_count == math.ceil(MOE_WIDTH * n / kept)
    assert getattr(cfg, key) == n and cfg.moe_intermediate_size == MOE_WIDTH  # the source config is left alone
    d = plan.describe()
    assert d["padded_width"] == plan.new_count * kept >= d["width"] == MOE_WIDTH * n
    assert 0 <= d["zero_channels_per_module"] < kept  # less than one routed expert's width per module
    assert all(m.endswith(".shared_experts") for m in d["modules"])
    gate = next(k for k in plan.shapes if k.endswith("gate_proj.weight"))
    w = torch.randn(MOE_WIDTH * n, cfg.hidden_size)
    padded = plan.pad(gate, w)
    assert padded.shape == (plan.new_count * kept, cfg.hidden_size)
    assert torch.equal(padded[: w.shape[0]], w) and not padded[w.shape[0] :].any()
    assert plan.pad("model.layers.1.self_attn.o_proj.weight", w) is None
    cfg_out: dict = {}
    plan.config(cfg_out)
    assert cfg_out == {key: plan.new_count}


@pytest.mark.parametrize(
    "model_type,key,module",
    [
        ("jamba", "intermediate_size", ".feed_forward."),  # the dense MLP layers between MoE layers
        ("hunyuan_v1_moe", "intermediate_size", ".shared_mlp."),  # a shared MLP of width intermediate_size itself
    ],
)
def test_no_count_key_is_refused_naming_the_module(model_type, key, module):
    plan = shared_padding(tiny_config(model_type), key, 32, ".experts.")
    assert plan.refusal is not None and module in plan.refusal and not plan.active
    assert plan.describe() is None and plan.pad(plan.refusal, torch.zeros(1)) is None


def test_families_without_shared_experts_are_unchanged():
    plan = shared_padding(tiny_config("qwen3_moe"), "moe_intermediate_size", 32, ".experts.")
    assert plan.refusal is None and plan.count_key is None and not plan.shapes and plan.describe() is None


def test_jamba_uniform_layout_is_refused_in_one_line(tmp_path):
    ck = Checkpoint(build("jamba", tmp_path / "jamba"))
    with pytest.raises(UserError, match=r"feed_forward\..*no config key widens it back.*--layout exact"):
        check_layout(ck, "uniform", 0.25)
    assert check_layout(ck, "exact", 0.25) is None


def shared_modules(model):
    return {
        i: layer.mlp.shared_experts
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "shared_experts")
    }


@pytest.mark.parametrize("model_type,refit", [("deepseek_v3", True), ("glm4_moe", False), ("hy_v3", False)])
def test_uniform_atom_pads_shared_experts_exactly(tmp_path, tokenizer_dir, model_type, refit):
    key, n = SHARED[model_type]
    src = build(model_type, tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    man = atomic_prune(src, out, 0.25, score="magnitude", samples=4, seq_len=32, batch_size=4, refit=refit)
    K = man["width"]
    assert K < MOE_WIDTH and K % 16 == 0
    cfg = json.loads((out / "config.json").read_text())
    new = math.ceil(MOE_WIDTH * n / K)
    assert cfg["moe_intermediate_size"] == K and cfg[key] == new
    pad = man["shared_padding"]
    assert pad["count_key"] == key and pad["count"] == n and pad["new_count"] == new
    assert pad["padded_width"] == new * K and pad["zero_channels_per_module"] == new * K - MOE_WIDTH * n
    assert pad["params_added"] == len(pad["modules"]) * 3 * cfg["hidden_size"] * pad["zero_channels_per_module"]
    assert any(key in w for w in man["warnings"])
    facts = tmp_path / "facts.json"  # moecompress info shows the padding too
    res = CliRunner().invoke(app, ["info", str(out), "--json", str(facts)])
    assert res.exit_code == 0 and f"{key} {n} -> {new}" in " ".join(res.output.split())
    assert any(f"{key} {n} -> {new}" in w for w in json.loads(facts.read_text())["warnings"])

    pruned = reload_clean(out).float()  # plain transformers: no missing, unexpected or mismatched keys
    ids = torch.arange(24)[None] % 300
    with torch.no_grad():
        assert torch.equal(load(out)(input_ids=ids).logits, pruned(input_ids=ids).logits)
        base = from_pretrained(src)
        x = torch.randn(40, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
        before, after = shared_modules(base), shared_modules(pruned)
        assert sorted(before) == sorted(after) and len(after) == len(pad["modules"])
        for l, s in after.items():
            assert s.gate_proj.weight.shape[0] == new * K
            assert not s.down_proj.weight[:, MOE_WIDTH * n :].any()  # the zero channels
            torch.testing.assert_close(s(x), before[l](x), rtol=0, atol=0)  # the shared experts' output, exactly


@pytest.mark.slow
def test_compress_atom_then_quantize_quantizes_the_padded_shared_experts(tmp_path, tokenizer_dir):
    """compress --atom --bits: the later quantize stage's rewrite sees atom's padded shared experts (core/output)."""
    from safetensors import safe_open

    from moecompress.compress.recipe import Stage
    from moecompress.compress.run import compress_model

    src = build("deepseek_v3", tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    stages = [Stage("atom", {"ratio": 0.25, "score": "magnitude", "refit": "none"}), Stage("quantize", {"bits": 4})]
    compress_model(src, out, stages, samples=4, seq_len=32, batch_size=4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == 32 and cfg["n_shared_experts"] == 2
    keys = [k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert "model.layers.1.mlp.shared_experts.down_proj.weight_packed" in keys
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" not in keys
    shape = next(
        safe_open(f, "pt").get_tensor("model.layers.1.mlp.shared_experts.down_proj.weight_shape")
        for f in out.glob("*.safetensors")
        if "model.layers.1.mlp.shared_experts.down_proj.weight_shape" in safe_open(f, "pt").keys()
    )
    assert shape.tolist() == [cfg["hidden_size"], 64]  # zero-padded to 2 x 32 before quantization
    ids = torch.arange(24)[None] % 300
    with torch.no_grad():
        a = load(out)(input_ids=ids).logits
        b = reload_clean(out)(input_ids=ids).logits
    assert torch.equal(a, b)
