"""Behavioural routing check (issue 12, core/routing_check.py): a family's own MoE block, run on random inputs with
its experts captured, routes exactly as moecompress's re-implementation (prune.order.route) or it is not verified,
with the first difference; verified derived families get merge and the output-error search."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import run_checks  # noqa: E402
from family_models import tiny_config  # noqa: E402

from moecompress.core import routing_check  # noqa: E402
from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.derive import meta_model  # noqa: E402
from moecompress.core.errors import UserError  # noqa: E402
from moecompress.core.families import family_for  # noqa: E402
from moecompress.core.routing_check import check_routing  # noqa: E402
from moecompress.prune.order import RouterSpec, route  # noqa: E402


def _block(model_type: str):
    """(meta-device MoE block of the first MoE layer, family, config) of the tiny model of ``model_type``."""
    cfg = tiny_config(model_type)
    fam = family_for(cfg)
    l = fam.moe_layers(cfg)[0]
    return meta_model(cfg).model.layers[l].get_submodule(fam.module_block), fam, cfg


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss", "mellum"])
def test_families_whose_source_matches_also_pass_behaviourally(model_type):
    """softmax top-k renormalized (Qwen3-MoE, Mellum's copy of it), sigmoid + correction bias + group-limited top-k +
    routed scaling (DeepSeek-V3), router bias (gpt-oss): the re-implementation the source check trusts is exact."""
    block, fam, cfg = _block(model_type)
    assert fam.routing_known and fam.routing_verified_by in ("record", "source")
    res = check_routing(block, fam, cfg)
    assert res.verified and res.removal_verified and not res.reason, res


# model type -> (verified, words of the first difference): sigmoid + correction (GLM-4.5, group-limited; MiniMax-M2
# with the bias on the block), softmax (Cohere2-MoE), routed scaling applied to the experts' output (Beam); by a
# RouterSpec variant (VARIANTS): ERNIE-4.5 chooses by softmax + correction, Kolibri1 by logits + correction, Flint's
# sigmoid without correction, Jamba does not renormalize, HY-V3 scales by router_scaling_factor; not verified:
# Phi-MoE's sparsemixer, Llama-4 scales the experts' inputs, AXK1 normalizes the block's output
CASES = {
    "glm4_moe": (True, ""),
    "minimax_m2": (True, ""),
    "cohere2_moe": (True, ""),
    "beam": (True, ""),
    "ernie4_5_moe": (True, ""),
    "kolibri1": (True, ""),
    "flint": (True, ""),
    "jamba": (True, ""),
    "hy_v3": (True, ""),
    "phimoe": (False, "weight for expert"),
    "llama4_text": (False, "weight for expert"),
    "axk1": (False, "not its experts' routed output"),
}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_derived_families_are_verified_by_their_own_blocks(model_type):
    ok, says = CASES[model_type]
    fam = family_for(tiny_config(model_type))
    assert fam.derived and fam.routing_known == ok, fam.routing_note
    assert fam.routing_verified_by == ("behaviour" if ok else None)
    if ok:
        assert not fam.routing_note
        fam.check_routing(tiny_config(model_type), "merging", True, True, "")  # no refusal
    else:
        assert says in fam.routing_note, fam.routing_note
        with pytest.raises(UserError, match="differs from moecompress's re-implementation on random inputs"):
            fam.check_routing(tiny_config(model_type), "merging", True, True, "prune with --method frequency")


# model type -> (the variant recorded on the Family, what RouterSpec.from_config then gives)
VARIANTS = {
    "ernie4_5_moe": ((("score", "softmax"),), dict(kind="sigmoid_group", score="softmax", norm_topk=True)),
    "kolibri1": ((("choice", "logits"),), dict(kind="sigmoid_group", choice="logits", norm_topk=False)),
    "flint": ((("kind", "sigmoid_group"),), dict(kind="sigmoid_group", score="sigmoid", norm_topk=True)),
    "jamba": ((("norm_topk", False),), dict(kind="softmax", norm_topk=False)),
    "hy_v3": ((("scaling_key", "router_scaling_factor"),), dict(kind="sigmoid_group", norm_topk=True)),
}


@pytest.mark.parametrize("model_type", sorted(VARIANTS))
def test_the_matching_variant_is_recorded_and_from_config_returns_it(model_type):
    """check_routing tries RouterSpec.from_config's spec first, then its variants; the one that routes as the
    block is recorded on the Family and from_config returns it (HY-V3: the scaling read from the config)."""
    cfg = tiny_config(model_type)
    fam = family_for(cfg)
    variant, fields = VARIANTS[model_type]
    assert fam.router_variant == variant
    spec = RouterSpec.from_config(fam, cfg)
    assert {k: getattr(spec, k) for k in fields} == fields, spec
    if model_type == "hy_v3":
        assert spec.scaling == float(cfg.router_scaling_factor) != 1.0
    base = RouterSpec.from_config(replace(fam, router_variant=()), cfg)
    assert base != spec and routing_check.candidates(fam, cfg)[0] == ((), base)
    # from_config's own spec is refused by the block: the variant is needed
    block, _, _ = _block(model_type)
    monkey = [(v, s) for v, s in routing_check.candidates(fam, cfg) if v == ()]
    assert monkey and not check_routing(block, fam, cfg, only=monkey).verified


def test_route_variants_by_hand():
    """route()'s variants on fixed logits: softmax scores + correction choose (ERNIE-4.5; a removed expert leaves
    the softmax), logits + correction choose with sigmoid weights (Kolibri1), unrenormalized softmax (Jamba)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    corr = torch.tensor([0.0, 0.0, 0.0, 0.9])
    p = logits.softmax(-1)
    w, idx = route(logits, RouterSpec(top_k=2, kind="sigmoid_group", score="softmax"), None, corr)
    want = (p + corr).topk(2).indices
    assert idx.sort().values.tolist() == want.sort().values.tolist()
    torch.testing.assert_close(w, p[0, idx[0]][None] / p[0, idx[0]].sum())
    removed = torch.tensor([True, False, False, False])
    w, idx = route(logits, RouterSpec(top_k=2, kind="sigmoid_group", score="softmax"), removed, corr)
    q = logits[:, 1:].softmax(-1)
    assert sorted(idx[0].tolist()) == sorted((q + corr[1:]).topk(2).indices[0].add(1).tolist())
    w, idx = route(logits, RouterSpec(top_k=2, kind="sigmoid_group", choice="logits", norm_topk=False), None, corr)
    assert sorted(idx[0].tolist()) == [0, 1] and torch.equal(w, logits[0, idx[0]].sigmoid()[None])
    w, idx = route(logits, RouterSpec(top_k=2, norm_topk=False))
    torch.testing.assert_close(w, p.topk(2).values)


def test_the_correction_bias_changes_the_choice():
    """Without the correction bias route() picks other experts than GLM-4.5's block: the check sees a mishandled
    correction (its random values are large enough to move choices)."""
    block, fam, cfg = _block("glm4_moe")
    res = check_routing(block, replace(fam, correction_bias=None), cfg)
    assert not res.verified and "goes to experts" in res.reason, res


def test_an_altered_router_is_not_verified(monkeypatch):
    """Qwen3-MoE's router with its logits doubled before the softmax: the same family code otherwise, not verified."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    block, fam, cfg = _block("qwen3_moe")
    forward = Qwen3MoeTopKRouter.forward
    monkeypatch.setattr(Qwen3MoeTopKRouter, "forward", lambda self, h: forward(self, 2 * h))
    res = check_routing(block, fam, cfg)
    assert not res.verified and "weight for expert" in res.reason, res


def test_a_block_that_scales_its_output_is_not_verified(monkeypatch):
    """Qwen3-MoE's block with its output doubled after the experts: the weights passed to the experts match, the
    block's output is not their routed output."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block, fam, cfg = _block("qwen3_moe")
    forward = Qwen3MoeSparseMoeBlock.forward
    monkeypatch.setattr(Qwen3MoeSparseMoeBlock, "forward", lambda self, h: 2 * forward(self, h))
    res = check_routing(block, fam, cfg)
    assert not res.verified and "not its experts' routed output" in res.reason, res


def test_group_removal_needs_the_rebuilt_block_to_route_as_route_masked(monkeypatch):
    """GLM-4.5 (2 groups of 4): the block rebuilt with 3 experts per group routes as route() with the removed experts
    masked, so removal is verified; a rebuilt block that ignores the groups is caught, and the family then refuses
    expert removal (its routing stays verified for the rest)."""
    block, fam, cfg = _block("glm4_moe")
    assert fam.n_group(cfg) == 2 and fam.groups_contiguous
    res = check_routing(block, fam, cfg)
    assert res.verified and res.removal_verified, res
    rebuild = routing_check._reduced_block

    def ungrouped(*args):
        b = rebuild(*args)
        b.gate.n_group = b.gate.num_group = b.gate.topk_group = 1
        return b

    monkeypatch.setattr(routing_check, "_reduced_block", ungrouped)
    res = check_routing(block, fam, cfg)
    assert res.verified and not res.removal_verified and res.reason.startswith("removal:"), res
    odd = replace(fam, routing_verified_by="behaviour", groups_contiguous=False, routing_note=res.reason)
    with pytest.raises(UserError, match="routes within groups of experts"):
        odd.check_routing(cfg, "expert pruning", True, False, "")
    odd.check_routing(cfg, "merging", False, True, "")  # no removal: verified routing


def test_a_block_that_cannot_run_is_not_verified_and_nothing_raises():
    _, fam, cfg = _block("glm4_moe")
    with torch.device("meta"):
        res = check_routing(torch.nn.Linear(4, 4), fam, cfg)
    assert not res.verified and res.reason, res


def test_info_says_how_the_routing_is_known():
    assert family_for(tiny_config("qwen3_moe")).routing_summary().startswith("re-implemented")
    assert family_for(tiny_config("mellum")).routing_summary().startswith("verified: its router code")
    assert family_for(tiny_config("glm4_moe")).routing_summary().startswith("verified: its own block")
    assert "weight for expert" in family_for(tiny_config("phimoe")).routing_summary()


def test_a_newly_verified_family_merges_and_its_output_error_prune_is_the_base_masked(tmp_path, tokenizer_dir):
    """MiniMax-M2 (sigmoid + the block's correction bias, verified by behaviour): merge writes a checkpoint plain
    transformers loads with no missing/unexpected keys, and prune 25% by the output-error search (refit none) gives
    the base model's logits with those experts masked out of routing (family_checks.check_prune)."""
    r = run_checks("minimax_m2", tmp_path, tokenizer_dir, ops=("prune", "merge"))
    assert r["routing_known"] and r["ops"] == {"open": "ok", "prune": "ok", "merge": "ok"}, r
    stage = Checkpoint(tmp_path / "minimax_m2-out" / "pruned").manifest.stage("prune")
    assert stage["method"] == "output-error", stage


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["hy_v4", "qwen4_exp"])
def test_output_error_prune_of_hyper_connection_models_is_the_base_masked(model_type, tmp_path, tokenizer_dir):
    """HY-V4 (verified by behaviour) and Qwen4-Exp (by source) carry hc residual streams [B, S, hc, D]: the default
    output-error prune runs (its residual-energy scale crashed on that cache) and equals the base model masked."""
    r = run_checks(model_type, tmp_path, tokenizer_dir, ops=("prune",))
    assert r["routing_known"] and r["ops"] == {"open": "ok", "prune": "ok"}, r


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(VARIANTS))
def test_families_verified_by_a_variant_merge_and_prune_as_the_base_masked(model_type, tmp_path, tokenizer_dir):
    """ERNIE-4.5, Kolibri1, Flint, Jamba, HY-V3 (each by its RouterSpec variant): the default output-error prune
    (refit none) gives the base model's logits with those experts masked out of routing, and merge writes a
    checkpoint plain transformers loads (family_checks)."""
    r = run_checks(model_type, tmp_path, tokenizer_dir, ops=("prune", "merge"))
    assert r["routing_known"] and r["ops"] == {"open": "ok", "prune": "ok", "merge": "ok"}, r
    stage = Checkpoint(tmp_path / f"{model_type}-out" / "pruned").manifest.stage("prune")
    assert stage["method"] == "output-error", stage


@pytest.mark.parametrize("variant", ["score_softmax", "choice_logits"])
def test_output_error_order_of_a_variant_is_the_brute_force_greedy(variant):
    """The incremental output-error search under ERNIE-4.5's softmax scores + correction (every removal rescales
    every score, so it can reorder any token's choice) and Kolibri1's logits + correction choice: each step removes
    the expert a brute-force recomputation of every candidate finds cheapest, at that cost."""
    from moecompress.prune.order import output_error_order, routed_output

    g = torch.Generator().manual_seed(3)
    T, E, H = 96, 8, 12
    outs, logits = torch.randn(T, E, H, generator=g), torch.randn(T, E, generator=g)
    corr = torch.randn(E, generator=g) * 0.1
    spec = RouterSpec(top_k=2, kind="sigmoid_group", **({"score": "softmax"} if variant == "score_softmax" else {}))
    if variant == "choice_logits":
        spec = replace(spec, choice="logits", norm_topk=False)
    rows = torch.arange(T)
    src = type("S", (), {"get": lambda self, r, i: outs[r[:, None], i]})()
    y0 = routed_output(src, rows, *route(logits, spec, None, corr)).double()
    steps = output_error_order(outs, logits, spec, set(), 4, corr)
    removed = torch.zeros(E, dtype=torch.bool)
    prev = 0.0
    for step in steps:
        errs = {}
        for e in range(E):
            if removed[e]:
                continue
            trial = removed.clone()
            trial[e] = True
            y = routed_output(src, rows, *route(logits, spec, trial, corr)).double()
            errs[e] = float((y - y0).pow(2).sum() / y0.pow(2).sum())
        best = min(errs, key=errs.get)
        assert step.experts == (best,) and step.cost == pytest.approx(errs[best] - prev, rel=1e-6, abs=1e-9)
        removed[best] = True
        prev = errs[best]
