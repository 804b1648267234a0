"""PruneTransform chained with other transforms in ONE engine pass: it works on the block as the earlier stage left
it, leaves it pruned for the next stage and for the forward that feeds the next layer."""

import json

import pytest
import torch
from conftest import build_tiny, reload_clean
from moecompress.calibration.sets import TokenSet
from transformers import AutoModelForCausalLM

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine
from moecompress.core.manifest import Manifest
from moecompress.core.output import Output
from moecompress.profile.run import collect
from moecompress.profile.transform import ProfileTransform
from moecompress.prune.load import prune_in_memory
from moecompress.prune.order import RouterSpec
from moecompress.prune.transform import PruneOptions, PruneTransform


def _tokens():
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    return TokenSet(ids, ["a", "a", "b", "b"], "random", 0)


def _write(ckpt, out, transforms, tokens):
    """One engine pass of ``transforms`` over ``tokens``, written to ``out`` (a one-manifest-section-per-stage run)."""
    with Output(out) as o:
        o.add_globals(ckpt, transforms)
        Engine(ckpt, tokens.input_ids, batch_size=2).run(transforms, emit=o.add_layer)
        cfg = json.loads((ckpt.path / "config.json").read_text())
        man = Manifest("compress", "uniform", "transformers", str(ckpt.path), ckpt.fingerprint, None, 0, 0)
        for t in transforms:
            t.config(cfg)
            man.add(t.name, t.section())
        o.finish(ckpt, cfg, man, report=False)
    return man


@pytest.mark.parametrize(("family", "second_ratio"), [("qwen3_moe", 0.5), ("deepseek_v3", 0.34)])
def test_two_prune_stages_in_one_pass_equal_pruning_the_composed_experts(family, second_ratio, tmp_path, tokenizer_dir):
    """Stage 2 sees stage 1's pruned block (it is built for the smaller count and would refuse the original one),
    orders it on the same inputs, and its kept lists index stage 1's: the output is the original model pruned to
    the composed lists, exactly, and config.json carries the final count."""
    path = build_tiny(family, tmp_path / "m", tokenizer_dir)
    ckpt = Checkpoint(path)
    spec, E = RouterSpec.from_config(ckpt.family, ckpt.config), ckpt.num_experts
    first = PruneTransform(spec, E, PruneOptions(ratio=0.25, refit="none"))
    mid = E - first.n
    second = PruneTransform(spec, mid, PruneOptions(ratio=second_ratio, refit="none"))
    final = mid - second.n
    assert final < mid < E
    man = _write(ckpt, tmp_path / "out", [first, second], _tokens())
    assert [s["op"] for s in man.stages] == ["prune", "prune"]
    assert man.stages[0]["experts_after"] == mid and man.stages[1]["experts_before"] == mid

    composed = {l: [first.kept[l][i] for i in second.kept[l]] for l in ckpt.moe_layers}
    out = Checkpoint(tmp_path / "out")
    assert all(json.loads((tmp_path / "out" / "config.json").read_text())[k] == final for k in ckpt.family.count_keys)
    for l, keep in composed.items():
        assert len(keep) == final
        got, want = out.moe_weights(l), ckpt.moe_weights(l).select(keep)
        for name in ("gate", "up", "down", "router", "correction_bias"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), (l, name)
    base = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    ref = prune_in_memory(base, composed)
    ids = _tokens().input_ids
    with torch.no_grad():
        torch.testing.assert_close(reload_clean(tmp_path / "out")(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=0, atol=0)  # fmt: skip


def test_prune_then_profile_in_one_pass_equals_profiling_the_pruned_output(tmp_path, tokenizer_dir):
    """A profile riding the pruning pass observes the pruned layers, calibrated on the pruned earlier layers: its
    statistics are those of profiling the written pruned model (sequential calibration)."""
    path = build_tiny("mixtral", tmp_path / "m", tokenizer_dir)
    ckpt, tokens = Checkpoint(path), _tokens()
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    prune = PruneTransform(spec, ckpt.num_experts, PruneOptions(ratio=0.34, refit="router"))
    k = ckpt.num_experts - prune.n
    prof = ProfileTransform(k, ckpt.top_k, tokens.domain_names, tokens.domains, sim_tokens=32)
    _write(ckpt, tmp_path / "out", [prune, prof], tokens)
    again = collect(Checkpoint(tmp_path / "out"), tokens, batch_size=2, sim_tokens=32)
    assert sorted(prof.results) == sorted(again) == ckpt.moe_layers
    for l, stats in again.items():
        assert stats["tokens"].shape[0] == k
        for name, t in stats.items():
            torch.testing.assert_close(prof.results[l][name], t, rtol=1e-5, atol=1e-6, msg=f"layer {l} {name}")


def test_a_prune_stage_refuses_a_block_of_another_size(tmp_path, tokenizer_dir):
    path = build_tiny("olmoe", tmp_path / "m", tokenizer_dir)
    ckpt = Checkpoint(path)
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    wrong = PruneTransform(spec, ckpt.num_experts + 2, PruneOptions(ratio=0.25))
    with pytest.raises(ValueError, match="routed experts when pruning reaches it"):
        Engine(ckpt, _tokens().input_ids, batch_size=2).run([wrong])


def test_chosen_experts_slice_with_no_compute(tmp_path, tokenizer_dir):
    """Score-ordered experts without refit need no inputs: over zero windows the pass only slices and writes."""
    path = build_tiny("qwen2_moe", tmp_path / "m", tokenizer_dir)
    ckpt = Checkpoint(path)
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    scores = {l: torch.arange(ckpt.num_experts, dtype=torch.float64).flip(0) for l in ckpt.moe_layers}
    t = PruneTransform(spec, ckpt.num_experts, PruneOptions(ratio=0.34, method="reap"), scores=scores)
    assert not t.wants_inputs
    _write(ckpt, tmp_path / "out", [t], TokenSet(torch.zeros(0, 1, dtype=torch.long), [], "none", None))
    out = Checkpoint(tmp_path / "out")
    for l in ckpt.moe_layers:  # the highest indices score lowest
        assert t.kept[l] == [0, 1, 2, 3]
        assert torch.equal(out.moe_weights(l).down, ckpt.moe_weights(l).select([0, 1, 2, 3]).down)


def test_recipe_stage_builds_the_transform_and_a_one_stage_compress_equals_prune(tmp_path, tokenizer_dir):
    """``prune: {...}`` in a compress recipe is the same transform as the prune command: a one-stage compress
    writes the same safetensors bytes as ``prune`` with the same options and calibration."""
    from moecompress.compress.recipe import parse
    from moecompress.compress.run import compress_model
    from moecompress.core.errors import UserError
    from moecompress.core.job import Job
    from moecompress.prune.run import prune_model
    from moecompress.prune.transform import transform_for_recipe

    path = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir)
    job = Job.prepare(path, None, samples=4, seq_len=16)
    t = transform_for_recipe(job, {"ratio": 0.34, "refit": "router"}, None)
    assert isinstance(t, PruneTransform) and t.wants_inputs and t.layout == "uniform" and t.n == 2
    with pytest.raises(UserError, match="prune stage: ratio 0.9 leaves 1 of 6 experts"):
        transform_for_recipe(job, {"ratio": 0.9}, None)
    with pytest.raises(UserError, match="prune stage: method 'reap' orders experts by profile scores"):
        transform_for_recipe(job, {"ratio": 0.34, "method": "reap"}, None)

    calib = dict(calib="mixed", samples=4, seq_len=16, batch_size=2)
    prune_model(path, tmp_path / "prune", PruneOptions(ratio=0.34, refit="router"), **calib)
    man = compress_model(path, tmp_path / "compress", parse([{"prune": {"ratio": 0.34, "refit": "router"}}]), **calib)
    assert [s["op"] for s in man.stages] == ["prune"]
    files = sorted(f.name for f in (tmp_path / "prune").glob("*.safetensors"))
    assert files and files == sorted(f.name for f in (tmp_path / "compress").glob("*.safetensors"))
    for f in sorted((tmp_path / "prune").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "compress" / f.name).read_bytes(), f.name


def test_the_down_refit_runs_with_the_unpruned_experts_freed(tmp_path, tokenizer_dir, monkeypatch):
    """Output error + down refit: the block is pruned to the kept experts before fit_downs runs (the removed experts'
    weights are freed then, not held through the refit), and the written model is the same as pruning after it."""
    import weakref

    import moecompress.prune.transform as transform

    path = build_tiny("qwen3_moe", tmp_path / "m", tokenizer_dir)
    ckpt = Checkpoint(path)
    spec, E = RouterSpec.from_config(ckpt.family, ckpt.config), ckpt.num_experts
    seen: list[bool] = []
    held: list[weakref.ref] = []
    real_fit, real_layer = transform.fit_downs, PruneTransform.moe_layer

    def moe_layer(self, ctx):  # the unpruned layer's fused experts, as the stream materialized them
        held.append(weakref.ref(ctx.experts.gate_up_proj.data.untyped_storage()))
        return real_layer(self, ctx)

    def fit(*a, **k):
        seen.append(held[-1]() is None)
        return real_fit(*a, **k)

    opts = dict(ratio=0.5, refit="down", refit_min_rows=0.0)
    monkeypatch.setattr(PruneTransform, "moe_layer", moe_layer)
    monkeypatch.setattr(transform, "fit_downs", fit)
    first = PruneTransform(spec, E, PruneOptions(**opts))
    _write(ckpt, tmp_path / "early", [first], _tokens())
    assert seen and all(seen)
    assert set(first.refit_errors) == set(ckpt.moe_layers)
    out = Checkpoint(tmp_path / "early")
    for l in ckpt.moe_layers:
        got, want = out.moe_weights(l), ckpt.moe_weights(l).select(first.kept[l])
        for name in ("gate", "up", "router"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (l, name)
        assert not torch.equal(got.down, want.down)  # refitted
