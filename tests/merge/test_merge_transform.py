"""MergeTransform chains: in one engine pass it merges the block as an earlier stage left it (fewer experts, their
source ids in ctx.extra), leaves the block merged for the layer's forward and for later stages, and replaces the
layer's routed tensors; the written model computes what the engine computed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, reload_clean
from moecompress.calibration.sets import calibration_set, load_tokenizer

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine, LayerContext, Transform
from moecompress.core.manifest import Manifest
from moecompress.core.output import Output
from moecompress.merge.options import MergeOptions
from moecompress.merge.transform import MergeTransform
from moecompress.prune.load import block_view, set_block_experts


class DropLast(Transform):
    """An expert-removing stage: drops the block's last expert and says which source experts remain."""

    name = "drop-last"
    wants_inputs = False

    def moe_layer(self, ctx: LayerContext) -> None:
        fam = ctx.engine.fam
        w = block_view(ctx.block, fam)
        keep = list(range(w.num_experts - 1))
        set_block_experts(ctx.block, fam, w.select(keep), ctx.index)
        src = ctx.extra.get("expert_ids") or list(range(w.num_experts))
        ctx.extra["expert_ids"] = [src[e] for e in keep]
        ctx.replace({"stale": torch.zeros(1)})  # a later stage's replace wins


class Recorder(Transform):
    """A later stage: records the block and the replaced tensors as the merge left them."""

    name = "recorder"
    wants_inputs = False
    changes_block = False

    def __init__(self) -> None:
        self.seen: dict[int, dict] = {}

    def moe_layer(self, ctx: LayerContext) -> None:
        self.seen[ctx.index] = {
            "experts": ctx.experts.gate_up_proj.shape[0],
            "router_rows": ctx.router.weight.shape[0],
            "replaced": sorted(ctx.replaced or {}),
            "merged_from": ctx.extra.get("merged_from"),
            "expert_ids": ctx.extra.get("expert_ids"),
        }


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer_dir):
    return build_tiny("mixtral", tmp_path_factory.mktemp("m") / "mixtral", tokenizer_dir)  # 6 experts, top-2


def test_merge_chains_after_an_expert_removing_stage_in_one_pass(mixtral, tmp_path):
    ck = Checkpoint(mixtral)
    tokens = calibration_set(load_tokenizer(mixtral), "mixed", 4, 16, seed=1)
    drop, merge, rec = DropLast(), MergeTransform(MergeOptions(ratio=0.4, sim_tokens=32)), Recorder()
    chain = [drop, merge, rec]
    cfg = json.loads((ck.path / "config.json").read_text())
    man = Manifest("compress", "uniform", "transformers", str(ck.path), ck.fingerprint, tokens.describe(),
                   ck.num_params, ck.bytes_on_disk)  # fmt: skip
    out = tmp_path / "chained"
    eng = Engine(ck, tokens.input_ids, batch_size=3)
    try:
        with Output(out) as o:
            o.add_globals(ck, chain)
            for ctx in eng.layers(chain):
                o.add_layer(ctx)
            logits = torch.cat([eng.stream.logits(i) for i in range(len(eng.cache))])  # [N, S, V] of the pass
            merge.config(cfg)
            man.add("merge", merge.section())
            o.finish(ck, cfg, man, report=False)
    finally:
        eng.close()

    K = 3  # 6 - 1 dropped = 5 experts, ratio 0.4 merges round(2.0) of them away
    sec = Manifest.read(out).stage("merge")
    assert sec["experts_before"] == 5 and sec["experts_after"] == K and cfg["num_local_experts"] == K
    assert merge.counts == {l: (5, K) for l in ck.moe_layers}
    for l in ck.moe_layers:
        info, seen = sec["layers"][str(l)], rec.seen[l]
        assert sorted(e for c in info["clusters"] for e in c) == list(range(5))  # the block as DropLast left it
        assert seen["experts"] == seen["router_rows"] == K  # left merged for the later stage and the forward
        assert seen["merged_from"] == info["clusters"] and seen["expert_ids"] is None
        assert "stale" not in seen["replaced"]
        assert f"model.layers.{l}.block_sparse_moe.experts.{K - 1}.w1.weight" in seen["replaced"]
        assert f"model.layers.{l}.block_sparse_moe.experts.{K}.w1.weight" not in seen["replaced"]
    model = reload_clean(out)
    assert model.config.num_local_experts == K
    with torch.no_grad():  # the written model is the one the engine ran: every layer fed by the merged ones
        ref = torch.cat([model(input_ids=ids).logits for ids in tokens.input_ids.split(3)])
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_merge_without_source_ids_ignores_the_profile_and_says_so(mixtral):
    """After a stage that removed experts without naming them, per-expert profile statistics cannot be mapped."""
    ck = Checkpoint(mixtral)
    tokens = calibration_set(load_tokenizer(mixtral), "mixed", 2, 16, seed=1)

    class Anonymous(DropLast):
        def moe_layer(self, ctx: LayerContext) -> None:
            super().moe_layer(ctx)
            del ctx.extra["expert_ids"]

    class NoProfile:
        def layer(self, l, name):
            raise AssertionError("profile statistics were read for renumbered experts")

    merge = MergeTransform(MergeOptions(ratio=0.4, sim_tokens=16), profile=NoProfile(), protected={0: [5]})
    Engine(ck, tokens.input_ids, batch_size=2).run([Anonymous(), merge])
    assert merge.counts == {l: (5, 3) for l in ck.moe_layers}
    assert all("are not used" in w for w in merge.warnings) and len(merge.warnings) == len(ck.moe_layers)


def test_merge_computes_experts_with_the_models_activation(tmp_path, tokenizer_dir, monkeypatch):
    """A GELU-gated model: every expert computation of the merge (similarity, choice, refit, alignment) gets the
    model's own activation, and the merged output loads."""
    import moecompress.merge.align as align
    import moecompress.merge.choose as choose
    import moecompress.merge.layer as layer
    from moecompress.merge.run import merge_model

    src = build_tiny("qwen3_moe", tmp_path / "gelu", tokenizer_dir, hidden_act="gelu")
    acts = []

    def spy(fn):
        def wrapped(*a, **k):
            acts.append(k.get("act", a[-1]))
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(layer, "output_similarity", spy(layer.output_similarity))
    monkeypatch.setattr(choose, "expert_forward", spy(choose.expert_forward))
    monkeypatch.setattr(align, "expert_hidden", spy(align.expert_hidden))
    merge_model(src, tmp_path / "m", MergeOptions(ratio=0.5, sim_tokens=32), samples=2, seq_len=16)
    gelu = type(reload_clean(tmp_path / "m").model.layers[0].mlp.experts.act_fn)
    assert gelu.__name__ == "GELUActivation" and len(acts) > 3
    assert all(isinstance(a, gelu) for a in acts)


def test_recipe_stage_builds_the_transform_and_refuses_a_bad_ratio_before_the_pass(mixtral, tmp_path):
    from moecompress.core.errors import UserError
    from moecompress.core.job import Job
    from moecompress.merge.transform import transform_for_recipe

    job = Job.prepare(mixtral, tmp_path / "o", samples=2, seq_len=16, seed=3)
    t = transform_for_recipe(job, {"ratio": 0.5}, None)
    assert isinstance(t, MergeTransform) and t.opts.ratio == 0.5 and t.opts.seed == 3
    with pytest.raises(UserError, match="top-k"):
        transform_for_recipe(job, {"ratio": 0.9}, None)  # 6 -> 1 expert, top-2
    with pytest.raises(UserError, match="--ratio"):
        transform_for_recipe(job, {"ratio": 1.0}, None)
