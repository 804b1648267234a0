"""AtomTransform chains with other transforms in one engine pass: it works on the block as an earlier stage left it,
leaves it narrowed (the next layer is calibrated on it) and writes exactly what it left."""

import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

from moecompress.atomic.heapr import top_channels
from moecompress.atomic.transform import AtomTransform, Refit
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.engine import Engine, LayerContext, Transform
from moecompress.core.manifest import Manifest
from moecompress.core.output import Output
from moecompress.profile.transform import ProfileTransform
from moecompress.prune.load import block_view, set_block_experts
from moecompress.prune.order import RouterSpec

DROP = [0, 3]


class DropExperts(Transform):
    """A stand-in earlier stage: removes experts DROP from every MoE layer and says which source experts remain."""

    name = "prune"

    def moe_layer(self, ctx: LayerContext) -> None:
        fam = ctx.engine.fam
        w = block_view(ctx.block, fam)
        kept = [e for e in range(w.num_experts) if e not in DROP]
        set_block_experts(ctx.block, fam, w.select(kept))
        ctx.extra["expert_ids"] = kept
        ctx.replace(fam.write_layer(w.select(kept), ctx.index))

    def config(self, cfg):
        for k in ("num_experts", "num_local_experts"):  # Qwen3-MoE reads both
            if k in cfg:
                cfg[k] -= len(DROP)


def _ids(ckpt, n=8, s=24, seed=0):
    return torch.randint(0, ckpt.config.vocab_size, (n, s), generator=torch.Generator().manual_seed(seed))


def test_atom_after_expert_removal_in_one_pass_writes_what_the_next_layer_saw(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    ckpt = Checkpoint(src)
    E, I = ckpt.num_experts, 24
    g = torch.Generator().manual_seed(1)
    scores = {l: torch.rand(E, I, generator=g, dtype=torch.float64) for l in ckpt.moe_layers}  # per source expert
    atom = AtomTransform(RouterSpec.from_config(ckpt.family, ckpt.config), scores=scores, width=16, refit=Refit())
    ts = [DropExperts(), atom]
    ids = _ids(ckpt)
    engine = Engine(ckpt, ids, batch_size=4)
    out = tmp_path / "out"
    with Output(out) as o:
        o.add_globals(ckpt, ts)
        for ctx in engine.layers(ts):
            if ctx.is_moe:  # written: 4 experts of width 16; the narrowed block ran the forward and was then dropped
                downs = [t for k, t in ctx.replaced.items() if k.endswith("down_proj.weight")]
                assert [tuple(t.shape) for t in downs] == [(32, 16)] * (E - len(DROP))
                assert ctx.experts.down_proj is None and ctx.experts.gate_up_proj is None
            o.add_layer(ctx)
        with torch.no_grad():
            logits = torch.cat([engine.stream.head(engine.cache[i]) for i in range(len(engine.cache))])
        engine.close()
        cfg = ckpt.config.to_dict()
        for t in ts:
            t.config(cfg)
        man = Manifest("test", "uniform", "transformers", str(src), ckpt.fingerprint, None, ckpt.num_params, 0)
        man.add("atom", atom.section())
        o.finish(ckpt, cfg, man, report=False)
    assert cfg["moe_intermediate_size"] == 16
    sec = Manifest.read(out).stage("atom")
    kept = [e for e in range(E) if e not in DROP]
    assert all(v == {"kept_experts": kept, "widths": [16] * len(kept)} for v in sec["layers"].values())
    for err in sec["compensation_output_error"].values():
        assert err["refit"] <= err["sliced"] and err["sliced"] > 0
    # the written model computes what the engine propagated: each layer's outputs came from the pruned block
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=2e-5)
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    for l in ckpt.moe_layers:  # gate/up rows: the top-16 channels by the source expert's own scores
        new, old = model.model.layers[l].mlp.experts, source.model.layers[l].mlp.experts
        for e, s in enumerate(kept):
            k = top_channels(scores[l][s : s + 1], 16)[0]
            assert torch.equal(new.gate_up_proj[e, :16], old.gate_up_proj[s, k])
            assert torch.equal(new.gate_up_proj[e, 16:], old.gate_up_proj[s, I + k])


def test_measured_moments_pick_the_profiles_channels_on_the_block_it_saw(tmp_path, tokenizer_dir):
    """Profile (observer) then AtomTransform without scores: both see each layer's block before the atom stage
    narrows it, on the same sequentially calibrated inputs, so the atom stage keeps the profile's top channels."""
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    ckpt = Checkpoint(src)
    ids = _ids(ckpt, n=8, s=32)
    prof = ProfileTransform(ckpt.num_experts, ckpt.top_k, ["d"], ["d"] * ids.shape[0], 16)
    atom = AtomTransform(RouterSpec.from_config(ckpt.family, ckpt.config), width=16)
    Engine(ckpt, ids, batch_size=4).run([prof, atom])
    assert sorted(prof.results) == ckpt.moe_layers and len(ckpt.moe_layers) > 1
    for l in ckpt.moe_layers:
        m = prof.results[l]["channel_sq_mean"]  # [E, I]
        assert atom.channels[str(l)] == top_channels(m, 16).tolist()


def test_a_block_with_fewer_experts_needs_the_source_map():
    atom = AtomTransform(RouterSpec(top_k=2), keep={0: [torch.arange(4)] * 6}, layout="uniform")

    class Ctx:
        index, extra = 0, {}

    with pytest.raises(ValueError, match="expert_ids"):
        atom._kept(Ctx(), type("W", (), {"num_experts": 4})(), None)
    with pytest.raises(ValueError, match="exact layout"):
        AtomTransform(RouterSpec(top_k=2), width=16, layout="exact")


class DropUnmapped(DropExperts):
    """Removes experts without saying which remain (as a merge would): source scores cannot be mapped."""

    def moe_layer(self, ctx: LayerContext) -> None:
        super().moe_layer(ctx)
        del ctx.extra["expert_ids"]


@pytest.mark.parametrize("score", ["magnitude", "heapr"])
def test_recipe_stage_ranks_each_remaining_expert_by_its_source_scores(tmp_path, tokenizer_dir, score):
    from moecompress.atomic.run import job_profile, score_channels, transform_for_recipe
    from moecompress.core.job import Job

    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    job = Job.prepare(src, None, samples=4, seq_len=32, batch_size=4)
    prof = job_profile(job)
    atom = transform_for_recipe(job, {"ratio": 0.3, "score": score, "refit": "none"}, prof)
    assert atom.width == 16 and atom.layout == "uniform" and not atom.wants_inputs
    scores, _ = score_channels(job, prof, score)
    job.engine("test").run([DropExperts(), atom])
    kept = [e for e in range(job.ckpt.num_experts) if e not in DROP]
    for l in job.ckpt.moe_layers:
        assert atom.channels[str(l)] == top_channels(scores[l][kept], 16).tolist()
    assert atom.section()["method"] == ("heapr" if score == "heapr" else "activation_magnitude")
    assert atom.section()["warnings"] == []
    # experts that are not source experts: ranked by moments measured on the block, and said so
    again = transform_for_recipe(job, {"ratio": 0.3, "score": "magnitude", "refit": "none"}, prof)
    job.engine("test").run([DropUnmapped(), again])
    warned = again.section()["warnings"]
    assert len(warned) == len(job.ckpt.moe_layers) and "measured on the block" in warned[0]
    assert all(len(k) == 16 for per in again.channels.values() for k in per)


@pytest.mark.parametrize("score", ["heapr", "magnitude"])
def test_a_lone_recipe_stage_writes_what_the_single_command_writes(tmp_path, tokenizer_dir, score):
    import hashlib

    from moecompress.atomic.run import atomic_prune, job_profile, transform_for_recipe
    from moecompress.core.job import Job

    src = build_tiny("mixtral", tmp_path / "src", tokenizer_dir)
    kw = dict(samples=6, seq_len=32, batch_size=3)
    atomic_prune(src, tmp_path / "single", 0.3, score=score, **kw)
    job = Job.prepare(src, tmp_path / "stage", **kw)
    atom = transform_for_recipe(job, {"ratio": 0.3, "score": score}, job_profile(job))
    with Output(job.out) as o:
        o.add_globals(job.ckpt, [atom])
        job.engine("stage").run([atom], emit=o.add_layer)
        cfg = job.ckpt.config.to_dict()
        atom.config(cfg)
        man = Manifest("compress", "uniform", "transformers", str(src), job.ckpt.fingerprint, None, 0, 0)
        man.add("atom", atom.section())
        o.finish(job.ckpt, cfg, man, report=False)

    def digest(d):
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))]

    assert digest(tmp_path / "single") == digest(tmp_path / "stage")
    assert Manifest.read(tmp_path / "stage").stage("atom")["width"] == 16


def _atom_pass(src, ids, scores, compact: bool, monkeypatch):
    """(every written tensor, the propagated logits, the manifest errors) of one refitted uniform atom pass; with
    ``compact`` False the sliced gate/up are built in a new tensor (the path before the in-place compaction)."""
    ckpt = Checkpoint(src)
    atom = AtomTransform(RouterSpec.from_config(ckpt.family, ckpt.config), scores=scores, width=16, refit=Refit())
    calls = []
    real = AtomTransform._refitted_in_place
    monkeypatch.setattr(AtomTransform, "_refitted_in_place", lambda *a: calls.append(1) or real(*a))
    if not compact:
        monkeypatch.setattr(AtomTransform, "_compactable", lambda *a: None)
    engine = Engine(ckpt, ids, batch_size=4)
    written = {}
    for ctx in engine.layers([atom]):
        if ctx.is_moe:
            written.update({k: t.clone() for k, t in ctx.replaced.items()})
    with torch.no_grad():
        logits = torch.cat([engine.stream.head(engine.cache[i]) for i in range(len(engine.cache))])
    engine.close()
    monkeypatch.undo()
    return written, logits, atom.errors, len(calls)


def test_in_place_slice_writes_and_propagates_what_a_new_tensor_did(tmp_path, tokenizer_dir, monkeypatch):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    ckpt = Checkpoint(src)
    g = torch.Generator().manual_seed(2)
    scores = {l: torch.rand(ckpt.num_experts, 24, generator=g, dtype=torch.float64) for l in ckpt.moe_layers}
    ids = _ids(ckpt)
    new, logits, errors, calls = _atom_pass(src, ids, scores, True, monkeypatch)
    old, logits0, errors0, calls0 = _atom_pass(src, ids, scores, False, monkeypatch)
    assert calls == len(ckpt.moe_layers) and calls0 == 0  # each MoE layer took the in-place path, then none did
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) and new[k].dtype == old[k].dtype for k in new)
    assert torch.equal(logits, logits0) and errors == errors0
