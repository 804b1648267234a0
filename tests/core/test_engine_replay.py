"""The layer's forward after ``moe_inputs`` replays the attention outputs recorded while the MoE inputs were captured:
the attention runs once per batch and layer, and the outputs are bit-identical to running it again."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from moecompress.calibration.sets import calibration_set, load_tokenizer
from torch import nn

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine, LayerContext, Replay, Transform


class DropFirst(Transform):
    """Wants the MoE inputs and changes the block: the first routed expert's weights are zeroed."""

    name = "drop-first"

    def moe_layer(self, ctx: LayerContext) -> None:
        assert ctx.inputs
        ex = ctx.experts
        gu = ex.gate_up_proj.data.clone()
        gu[0] = 0
        ex.gate_up_proj = nn.Parameter(gu, requires_grad=False)


def _final_states(path, monkeypatch, replay: bool) -> tuple[list[torch.Tensor], int]:
    ck = Checkpoint(path)
    tokens = calibration_set(load_tokenizer(path), "mixed", 5, 16, seed=2)
    eng = Engine(ck, tokens.input_ids, batch_size=2)
    attn = type(eng.model.model.layers[0].self_attn)
    calls = [0]
    original = attn.forward

    def counted(self, *a, **k):
        calls[0] += 1
        return original(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(attn, "forward", counted)
        if not replay:
            m.setattr(Replay, "complete", lambda self, n: False)
        states: list[torch.Tensor] = []
        n_layers = len(eng.model.model.layers)
        for ctx in eng.layers([DropFirst()]):
            if ctx.index == n_layers - 1:
                states = [eng.cache[i].clone() for i in range(len(eng.cache))]
        eng.close()
    return states, calls[0]


@pytest.mark.parametrize("model_type", ["mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_replayed_attention_gives_the_same_outputs_and_runs_once(tmp_path, tokenizer_dir, monkeypatch, model_type):
    path = build_tiny(model_type, tmp_path / "m", tokenizer_dir)
    ck = Checkpoint(path)
    batches = 3  # 5 windows in batches of 2
    once, n_once = _final_states(path, monkeypatch, replay=True)
    twice, n_twice = _final_states(path, monkeypatch, replay=False)
    assert len(once) == batches
    for a, b in zip(once, twice, strict=True):
        assert torch.equal(a, b)
    n_layers = ck.config.num_hidden_layers
    moe = len(ck.moe_layers)
    assert n_twice == batches * (n_layers + moe)  # capture up to the block, then the forward
    assert n_once == batches * n_layers  # the forward replays the MoE layers' attention


def test_a_mixer_called_twice_is_not_replayed():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.mlp(self.attn(self.attn(x)))

    layer = Twice()
    rep = Replay(layer, layer.mlp)
    with rep.recording():
        layer(torch.ones(2, 4))
    rep.batch_done()
    assert not rep.complete(1)
    once = Replay(layer, layer.mlp)
    layer.forward = lambda x: layer.mlp(layer.attn(x))
    with once.recording():
        want = layer(torch.ones(2, 4))
    once.batch_done()
    assert once.complete(1) and list(once.outputs) == ["attn"]
    layer.attn.weight.data.zero_()  # a replayed mixer is not run: its (changed) weights do not matter
    with once.playing(0):
        assert torch.equal(layer(torch.ones(2, 4)), want)
    assert "forward" not in vars(layer.attn)


class TwiceAndProbe(Transform):
    """Checks the attention's weights are released once the MoE inputs are captured, asks for the inputs a second
    time (they must be the same) and keeps nothing else."""

    name = "twice"

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def moe_layer(self, ctx: LayerContext) -> None:
        first = [x.clone() for x in ctx.inputs]
        self.seen.append(all(p.device.type == "meta" for p in ctx.layer.self_attn.parameters()))
        ctx.inputs = []
        again = ctx.engine.moe_inputs(ctx.layer)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        ctx.inputs = again


def _probed(path, release: bool, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
    """Final states and, per layer, the layer run again on batch 0 in ``emit`` (as quantize's probes do)."""
    ck = Checkpoint(path)
    tokens = calibration_set(load_tokenizer(path), "mixed", 5, 16, seed=2)
    eng = Engine(ck, tokens.input_ids, batch_size=2)
    t = TwiceAndProbe()
    probes: list[torch.Tensor] = []
    h = None
    with monkeypatch.context() as m:
        if not release:
            m.setattr(Replay, "release", lambda self, restore: None)
        for ctx in eng.layers([t]):
            kw = eng.stream.layer_kwargs(ctx.index, 0)
            h = (eng.stream.cache[0] if h is None else h).clone()
            out = ctx.layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
            probes.append(h.clone())
            assert all(p.device.type != "meta" for p in ctx.layer.self_attn.parameters())
        states = [eng.cache[i].clone() for i in range(len(eng.cache))]
        eng.close()
    return states, probes, t.seen


def test_released_attention_comes_back_when_the_layer_runs_again(tmp_path, tokenizer_dir, monkeypatch):
    path = build_tiny("mixtral", tmp_path / "m", tokenizer_dir)
    states, probes, seen = _probed(path, True, monkeypatch)
    states0, probes0, seen0 = _probed(path, False, monkeypatch)
    assert seen and all(seen) and not any(seen0)  # released only when release runs
    for a, b in zip(states + probes, states0 + probes0, strict=True):
        assert torch.equal(a, b)
