"""Layers held in the checkpoint's dtype: a bf16 checkpoint's routed experts stay bf16 in memory (half the float32
layer) and every result is the float32 layer's bit for bit (bf16 -> float32 is exact; the kernel upcasts per
expert)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_tokenizer
from moecompress.calibration.sets import calibration_set, load_tokenizer

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine, LayerContext, Transform
from moecompress.core.experts import expert_outputs
from moecompress.profile.transform import ProfileTransform


def _bf16_model(model_type: str, folder, tok):
    return build_tiny(model_type, folder, tok, dtype=torch.bfloat16)


@pytest.fixture(scope="module", params=["mixtral", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def bf16_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("narrow")
    return _bf16_model(request.param, d / request.param, make_tokenizer(d / "tok"))


class Seen(Transform):
    """Records each MoE layer's expert dtypes and its outputs (the cache after the layer's forward)."""

    name = "seen"
    wants_inputs = False

    def __init__(self, narrow: bool):
        self.reads_narrow = narrow
        self.dtypes: dict[int, tuple[torch.dtype, torch.dtype]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.similar: dict[int, torch.Tensor] = {}

    def moe_layer(self, ctx: LayerContext) -> None:
        ex = ctx.experts
        self.dtypes[ctx.index] = (ex.gate_up_proj.dtype, ex.down_proj.dtype)
        x = torch.randn(7, ex.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(ctx.index))
        self.similar[ctx.index] = expert_outputs(ex.gate_up_proj, ex.down_proj, ex.act_fn, x)

    def layer_done(self, ctx: LayerContext) -> None:
        self.outputs[ctx.index] = torch.cat([ctx.engine.cache[i] for i in range(len(ctx.engine.cache))])


def _run(path, transforms):
    ck = Checkpoint(path)
    tokens = calibration_set(load_tokenizer(path), "mixed", 4, 16, seed=1)
    Engine(ck, tokens.input_ids, batch_size=3).run(transforms)
    return ck, tokens


def test_narrow_layers_are_bf16_and_compute_the_float32_layer_bit_for_bit(bf16_model):
    wide, narrow = Seen(False), Seen(True)
    ck, _ = _run(bf16_model, [wide])
    _run(bf16_model, [narrow])
    assert sorted(narrow.outputs) == ck.moe_layers
    for l in ck.moe_layers:
        assert wide.dtypes[l] == (torch.float32, torch.float32)
        assert narrow.dtypes[l] == (torch.bfloat16, torch.bfloat16)
        assert narrow.outputs[l].dtype == torch.float32
        assert torch.equal(wide.outputs[l], narrow.outputs[l])  # the forward (routed_forward, upcast per expert)
        assert torch.equal(wide.similar[l], narrow.similar[l])  # every expert on the same tokens


def test_a_transform_that_does_not_read_narrow_keeps_the_float32_layer(bf16_model):
    narrow, wide = Seen(True), Seen(False)
    ck, _ = _run(bf16_model, [narrow, wide])  # one transform not declaring it: the whole pass is float32
    assert all(narrow.dtypes[l] == (torch.float32, torch.float32) for l in ck.moe_layers)


def test_profile_statistics_are_identical_with_narrow_layers(bf16_model):
    ck = Checkpoint(bf16_model)
    tokens = calibration_set(load_tokenizer(bf16_model), "mixed", 4, 16, seed=1)

    def profile(narrow: bool) -> dict:
        p = ProfileTransform(ck.num_experts, ck.top_k, tokens.domain_names, tokens.domains, 16)
        p.reads_narrow = narrow
        Engine(ck, tokens.input_ids, batch_size=3).run([p])
        return p.results

    a, b = profile(False), profile(True)
    assert sorted(a) == sorted(b) == ck.moe_layers
    for l in a:
        assert sorted(a[l]) == sorted(b[l])
        for k in a[l]:
            assert torch.equal(a[l][k], b[l][k]), (l, k)
