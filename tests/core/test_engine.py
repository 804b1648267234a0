"""The engine owns the layer loop: MoE inputs captured once, transforms in order, sequential calibration, and the
Output writer fed layer by layer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, reload_clean
from moecompress.calibration.sets import calibration_set, load_tokenizer
from torch import nn

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine, LayerContext, Transform
from moecompress.core.manifest import Manifest
from moecompress.core.output import Output
from moecompress.profile.transform import ProfileTransform


class DropLast(Transform):
    """Test transform: removes the last routed expert of every MoE layer (weights and router row)."""

    name = "drop-last"
    wants_inputs = False

    def moe_layer(self, ctx: LayerContext) -> None:
        ex, r = ctx.experts, ctx.router
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.data[:-1].clone(), requires_grad=False)
        ex.down_proj = nn.Parameter(ex.down_proj.data[:-1].clone(), requires_grad=False)
        r.weight = nn.Parameter(r.weight.data[:-1].clone(), requires_grad=False)
        for m in (ex, r):
            if hasattr(m, "num_experts"):
                m.num_experts -= 1
        fam, l = ctx.engine.fam, ctx.index
        mb = f"model.layers.{l}.{fam.module_block}."
        state = {mb + k: v for k, v in ctx.block.state_dict().items()}
        E = ex.gate_up_proj.shape[0]
        dtype = ctx.engine.ckpt.moe_weights(l).router.dtype
        w = fam.read_layer(state, l, E)
        ctx.replace({k: t.to(dtype) for k, t in fam.write_layer(w, l).items()})

    def config(self, cfg: dict) -> None:
        cfg.update(self.fam_updates)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer_dir):
    return build_tiny("mixtral", tmp_path_factory.mktemp("m") / "mixtral", tokenizer_dir)


def _tokens(path):
    return calibration_set(load_tokenizer(path), "mixed", 4, 16, seed=1)


def test_moe_inputs_are_what_the_full_model_feeds_the_moe_block(mixtral):
    ck = Checkpoint(mixtral)
    tokens = _tokens(mixtral)
    eng = Engine(ck, tokens.input_ids, batch_size=3)
    got: dict[int, torch.Tensor] = {}

    class Inputs(Transform):
        def moe_layer(self, ctx: LayerContext) -> None:
            got[ctx.index] = torch.cat(ctx.inputs)

    eng.run([Inputs()])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral, experts_implementation="eager").eval()
    seen: dict[int, list[torch.Tensor]] = {}
    for l, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, _l=l: seen.setdefault(_l, []).append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for ids in tokens.input_ids.split(3):
            model(input_ids=ids)
    assert sorted(got) == ck.moe_layers
    for l in ck.moe_layers:
        torch.testing.assert_close(got[l], torch.cat(seen[l]), rtol=1e-5, atol=1e-5)


def test_observers_see_the_block_before_a_later_stage_changes_it(mixtral):
    """A profile chained before a changing stage is taken on the unchanged block (on the captured inputs), and
    equals the profile that rides the forward pass, on the first MoE layer (same inputs both ways)."""
    ck = Checkpoint(mixtral)
    tokens = _tokens(mixtral)

    def profile(chain):
        p = ProfileTransform(ck.num_experts, ck.top_k, tokens.domain_names, tokens.domains, 16)
        Engine(ck, tokens.input_ids, batch_size=3).run([p, *chain])
        return p.results

    alone, chained = profile([]), profile([DropLast()])
    first, later = ck.moe_layers[0], ck.moe_layers[1]
    for name, t in alone[first].items():
        torch.testing.assert_close(chained[first][name], t, rtol=1e-6, atol=1e-9, msg=name)
    assert chained[later]["tokens"].shape == alone[later]["tokens"].shape  # still measured on all experts
    # the later layer's inputs come from the changed earlier layer (sequential calibration): statistics differ
    assert not torch.equal(chained[later]["reap"], alone[later]["reap"])


def test_output_writes_the_transformed_layers_and_loads_in_transformers(mixtral, tmp_path):
    ck = Checkpoint(mixtral)
    tokens = _tokens(mixtral)
    drop = DropLast()
    drop.fam_updates = ck.family.expert_count_updates(ck.num_experts - 1)
    out = tmp_path / "dropped"
    eng = Engine(ck, tokens.input_ids, batch_size=3)
    cfg = json.loads((ck.path / "config.json").read_text())
    man = Manifest("test", "uniform", "transformers", str(ck.path), ck.fingerprint, tokens.describe(),
                   ck.num_params, ck.bytes_on_disk)  # fmt: skip
    with Output(out) as o:
        o.add_globals(ck, [drop])
        eng.run([drop], emit=o.add_layer)
        drop.config(cfg)
        man.add("prune", {"note": "test: last expert dropped"})
        o.finish(ck, cfg, man, report=False)
    model = reload_clean(out)
    assert model.config.num_local_experts == ck.num_experts - 1
    back = Manifest.read(out)
    assert back.stage("prune") == {"op": "prune", "note": "test: last expert dropped"}
    assert back.params_after == sum(p.numel() for p in model.parameters())
    # every tensor outside the routed experts is the checkpoint's, bit for bit
    sd = model.state_dict()
    torch.testing.assert_close(sd["model.embed_tokens.weight"], ck.get("model.embed_tokens.weight"), rtol=0, atol=0)
    ref = ck.get("model.layers.0.self_attn.q_proj.weight")
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], ref, rtol=0, atol=0)


def test_a_failed_pass_leaves_no_output(mixtral, tmp_path):
    ck = Checkpoint(mixtral)
    tokens = _tokens(mixtral)

    class Boom(Transform):
        def moe_layer(self, ctx: LayerContext) -> None:
            if ctx.index == ck.moe_layers[-1]:
                raise RuntimeError("boom")

    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="boom"), Output(out) as o:
        o.add_globals(ck)
        Engine(ck, tokens.input_ids, batch_size=3).run([Boom()], emit=o.add_layer)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


class Seen(Transform):
    """Test observer: records, for every batch it is shown, how the experts module runs and the routing it got."""

    name = "seen"
    wants_inputs = False
    observes_forward = True
    changes_block = False

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool, str, torch.Tensor, torch.Tensor]] = []

    def observe_forward(self, ctx, batch, hidden, idx, w):
        ex = ctx.experts
        self.calls.append((ctx.index, batch, "forward" in vars(ex), ex.config._experts_implementation, idx, w))
        return None


def test_observation_runs_through_the_experts_interface_and_leaves_eager_unchanged(mixtral):
    """The observing forward is reached through transformers' ExpertsInterface ("moecompress" registered, the
    module's forward untouched); outside an observation the registered implementation is the eager forward."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moecompress.core import interface

    assert ALL_EXPERTS_FUNCTIONS["moecompress"] is interface.experts_forward
    ck = Checkpoint(mixtral)
    tokens = _tokens(mixtral)
    seen = Seen()
    eng = Engine(ck, tokens.input_ids, batch_size=3)
    eng.run([seen])
    assert {(c[0], c[1]) for c in seen.calls} == {(l, b) for l in ck.moe_layers for b in range(2)}
    assert all(not patched and impl == "moecompress" for _, _, patched, impl, _, _ in seen.calls)
    assert eng.model.config._experts_implementation == "eager"  # restored after each observation
    # a pass that holds the experts narrow (core/stream.py: forward overridden) is observed the same way, as the
    # transformers class it narrows, and sees the same routing
    narrow = Seen()
    narrow.reads_narrow = True
    eng = Engine(ck, tokens.input_ids, batch_size=3)
    eng.run([narrow])
    assert eng.stream.narrow
    assert [c[:4] for c in narrow.calls] == [c[:4] for c in seen.calls]
    for a, b in zip(narrow.calls, seen.calls, strict=True):
        assert torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])
    # the routing shown is the model's own: top-k indices and weights of Mixtral's router on the batch
    model = AutoModelForCausalLM.from_pretrained(mixtral, experts_implementation="eager").eval()
    ids = tokens.input_ids[:3]
    routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(l: int):
        def hook(m: nn.Module, a: tuple) -> None:
            routed.setdefault(l, (a[1], a[2]))

        return hook

    for l in ck.moe_layers:
        model.model.layers[l].mlp.experts.register_forward_pre_hook(grab(l))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    for l, b, _, _, idx, w in seen.calls:
        if b == 0:
            assert torch.equal(idx, routed[l][0])
            torch.testing.assert_close(w, routed[l][1], rtol=1e-5, atol=1e-6)
    theirs = AutoModelForCausalLM.from_pretrained(mixtral, experts_implementation="moecompress").eval()
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, eager)


def test_modules_outside_the_interface_are_observed_by_a_replaced_forward():
    """moecompress's own BiasedExperts (gpt-oss) does not dispatch through ExpertsInterface, nor does a layout
    routed_forward does not compute: those get their forward replaced for the observation, then restored."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moecompress.core.experts import BiasedExperts
    from moecompress.core.interface import dispatches, observing
    from moecompress.core.stream import _narrow_class

    cfg = MixtralConfig(hidden_size=8, intermediate_size=6, num_local_experts=3)
    std = MixtralExperts(cfg)
    assert dispatches(std)
    odd = MixtralExperts(cfg)
    odd.has_bias = True
    own = BiasedExperts(3, 8, 6, "gpt_oss", "clamped_swiglu", 1.702, 7.0)
    narrowed = MixtralExperts(cfg)
    narrowed.__class__ = _narrow_class(MixtralExperts)  # the layer stream's narrow experts: forward overridden
    for ex, want in ((std, "interface"), (odd, "patch"), (own, "patch"), (narrowed, "interface")):
        cls = type(ex)
        with observing(ex, lambda h, i, w: h) as how:
            assert how == want
            assert ("forward" in vars(ex)) == (want == "patch")
            if want == "interface":
                assert type(ex) is MixtralExperts and ex.config._experts_implementation == "moecompress"
        assert "forward" not in vars(ex) and type(ex) is cls


@pytest.mark.slow
def test_every_supported_type_but_gpt_oss_is_observed_through_the_experts_interface(tmp_path):
    """Which supported model types the engine observes through ExpertsInterface (each type's experts module as the
    layer stream builds it from a tiny checkpoint): all but gpt-oss, whose experts run as moecompress's
    BiasedExperts."""
    import sys
    from pathlib import Path

    from moecompress.core.interface import dispatches
    from moecompress.core.stream import LayerStream

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
    from family_checks import family_or_refusal
    from family_models import build, installed_moe_types

    through, patched = [], []
    for t in installed_moe_types():
        if family_or_refusal(t)[0] is None:
            continue
        ck = Checkpoint(build(t, tmp_path / t))
        stream = LayerStream(ck, torch.zeros(0, 1, dtype=torch.long))
        block = getattr(stream.decoder_layers[ck.moe_layers[0]], ck.family.module_block)
        (through if dispatches(getattr(block, ck.family.experts)) else patched).append(t)
        stream.close()
    assert patched == ["gpt_oss"], patched
    assert len(through) >= 25, through


def test_a_finished_layer_is_not_held_while_the_next_one_runs(mixtral):
    """The engine (and its ``run`` loop) drops a finished layer's context, with the tensors it wrote, before the next
    layer is read: a pruned Qwen3-30B-shaped layer's experts were held through the next layer (+0.53 GB at peak)."""
    import gc
    import weakref

    ck = Checkpoint(mixtral)
    eng = Engine(ck, _tokens(mixtral).input_ids, batch_size=3)
    done: list[weakref.ref] = []
    alive: dict[int, list[bool]] = {}

    class Watch(DropLast):
        def moe_layer(self, ctx: LayerContext) -> None:
            gc.collect()
            alive[ctx.index] = [r() is not None for r in done]
            super().moe_layer(ctx)

    t = Watch()
    t.fam_updates = {}

    def emit(ctx: LayerContext) -> None:
        assert ctx.replaced
        done.append(weakref.ref(next(iter(ctx.replaced.values()))))

    eng.run([t], emit=emit)
    assert len(alive) >= 2 and all(not any(a) for a in alive.values()), alive
