"""QuantTransform on the engine: it quantizes the block as an earlier stage of the same pass left it (fewer experts,
narrower experts), writes a folder moecompress.load reads, and leaves the block quantized for the next layer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from moecompress.calibration.sets import calibration_set, load_tokenizer
from torch import nn

import moecompress
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine, LayerContext, Transform
from moecompress.core.manifest import Manifest
from moecompress.core.output import Output
from moecompress.quant.layer import expert_group_sizes
from moecompress.quant.load import load_quantized
from moecompress.quant.transform import QuantTransform


class Shrink(Transform):
    """Test stage: drops the last routed expert (weights, router row) or the last 8 channels of every expert."""

    name = "shrink"
    wants_inputs = False

    def __init__(self, what: str):
        self.what = what

    def moe_layer(self, ctx: LayerContext) -> None:
        ex, r = ctx.experts, ctx.router
        gu, dn = ex.gate_up_proj.data, ex.down_proj.data  # [E, 2I, H], [E, H, I]
        if self.what == "expert":
            gu, dn = gu[:-1], dn[:-1]
            r.weight = nn.Parameter(r.weight.data[:-1].clone(), requires_grad=False)
            for m in (ex, r):
                if hasattr(m, "num_experts"):
                    m.num_experts -= 1
        else:
            I = dn.shape[-1]
            keep = torch.cat([torch.arange(I - 8), I + torch.arange(I - 8)])
            gu, dn = gu[:, keep], dn[..., : I - 8]
        ex.gate_up_proj = nn.Parameter(gu.clone(), requires_grad=False)
        ex.down_proj = nn.Parameter(dn.clone(), requires_grad=False)
        if hasattr(ex, "intermediate_dim"):
            ex.intermediate_dim = dn.shape[-1]
        self.updates = ctx.engine.fam.expert_count_updates(gu.shape[0])

    def config(self, cfg: dict) -> None:
        if self.what == "expert":
            cfg.update(self.updates)
        else:
            cfg["moe_intermediate_size"] -= 8


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def _run(src, out, transforms):
    ck = Checkpoint(src)
    tokens = calibration_set(load_tokenizer(src), "mixed", 4, 32, seed=0)
    cfg = json.loads((ck.path / "config.json").read_text())
    man = Manifest("compress", "quantized", "moecompress.load", str(ck.path), ck.fingerprint, tokens.describe(),
                   ck.num_params, ck.bytes_on_disk)  # fmt: skip
    with Output(out) as o:
        o.add_globals(ck, transforms)
        Engine(ck, tokens.input_ids, batch_size=4).run(transforms, emit=o.add_layer)
        for t in transforms:
            t.config(cfg)
            man.add("quantize" if t.name == "quantize" else "prune", t.section())
        o.finish(ck, cfg, man, report=False)
    return ck


@pytest.mark.parametrize("what", ["expert", "channels"])
def test_quantize_chained_after_a_shrinking_stage_loads(qwen, tmp_path, what):
    q = QuantTransform(3, "gptq", min_tokens=4, other_bits=8)
    ck = _run(qwen, tmp_path / "out", [Shrink(what), q])
    m = moecompress.load(tmp_path / "out")
    E, I = ck.num_experts - (what == "expert"), 24 - 8 * (what == "channels")
    base = Checkpoint(qwen)
    for l in ck.moe_layers:
        ex = m.model.layers[l].mlp.experts
        assert tuple(ex.gate_up_proj.shape) == (E, 2 * I, 32) and tuple(ex.down_proj.shape) == (E, 32, I)
        assert q.layers[l]["bits"] == [3] * E
        w = base.moe_weights(l)  # the shrunk original: the loaded weights are its 3-bit quantization
        ref = w.down[:E, :, :I].float()
        err = (ex.down_proj - ref).abs().max().item()
        assert 0 < err < 0.5 * ref.abs().max().item()
        g = expert_group_sizes(32, I)[1]
        assert max(len(torch.unique(row)) for row in ex.down_proj[0].reshape(-1, g)) <= 8  # 3 bits
        torch.testing.assert_close(m.model.layers[l].mlp.gate.weight, w.router[:E].float(), rtol=0, atol=0)
    # attention went through rewrite at --other-bits 8
    sd = m.state_dict()
    assert not torch.equal(
        sd["model.layers.0.self_attn.q_proj.weight"], base.get("model.layers.0.self_attn.q_proj.weight")
    )
    man = Manifest.read(tmp_path / "out")
    assert [s["op"] for s in man.stages] == ["prune", "quantize"] and man.stage("quantize")["bits"] == 3
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, load_quantized(tmp_path / "out")(input_ids=ids).logits)


def test_quantized_block_feeds_the_next_layer(qwen, tmp_path):
    """With propagate (the default) the block holds the dequantized weights after the stage (the next layer is
    calibrated on it); with propagate=False it keeps the weights it was given (the single command's default)."""
    seen = {}

    class Peek(Transform):
        wants_inputs = False
        changes_block = False

        def __init__(self, key):
            self.key = key

        def moe_layer(self, ctx):
            seen[(self.key, ctx.index)] = ctx.experts.down_proj.detach().clone()

    for prop in (True, False):
        q = QuantTransform(2, "rtn", propagate=prop)
        _run(qwen, tmp_path / f"p{prop}", [q, Peek(prop)])
    loaded = load_quantized(tmp_path / "pTrue")
    base = Checkpoint(qwen)
    for l in base.moe_layers:
        torch.testing.assert_close(seen[(True, l)], loaded.model.layers[l].mlp.experts.down_proj, rtol=0, atol=0)
        torch.testing.assert_close(seen[(False, l)], base.moe_weights(l).down.float(), rtol=0, atol=0)


def test_refusals_are_value_errors():
    with pytest.raises(ValueError, match="not one of gptq, rtn"):
        QuantTransform(3, "awq")
    with pytest.raises(ValueError, match="widths"):
        QuantTransform({0: [5, 3]})
    with pytest.raises(ValueError, match="one width for every expert"):
        QuantTransform({0: [2, 3]}, with_err=True)
    q = QuantTransform({1: [2, 3]})
    with pytest.raises(ValueError, match="2 widths for 4 experts"):
        q.widths(1, 4)


def test_recipe_stage_builds_a_sequential_transform(qwen):
    from moecompress.core.job import Job
    from moecompress.quant.transform import transform_for_recipe

    t = transform_for_recipe(Job.prepare(qwen, None, seq_len=32), {"bits": 4, "method": "rtn"}, None)
    assert (t.bits, t.method, t.other_bits, t.propagate, t.layout) == (4, "rtn", 8, True, "quantized")
