"""Merging is never worse than pruning (issue 14 section 2), on both kinds of tiny model.

Trained-style experts: the randomly initialized fixtures of conftest.py (independent experts). Dense-carved
experts: tests/carved.py (experts are disjoint pieces of one FFN). At the same expert count, the merged model's
KL to the base must not exceed the output-error pruned model's, and every layer's measured routed-output error
must not exceed the pruning choice's (the guarantee the per-cluster choice gives on calibration tokens).
"""

import carved
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, reload_clean
from moecompress.calibration.sets import calibration_set, load_tokenizer

import moecompress
from moecompress.core.evaluate import evaluate
from moecompress.core.experts import expert_forward, expert_hidden
from moecompress.core.families import MoEWeights
from moecompress.merge.choose import Clustering, LayerFit, choose_clusters, keep_candidate, merge_candidates
from moecompress.merge.run import MergeOptions, merge_model
from moecompress.prune.order import RouterSpec, route
from moecompress.prune.refit import dense_weights, fit_downs
from moecompress.prune.run import prune_model
from moecompress.prune.transform import PruneOptions

carved_model = carved.carved_model
SEQ = 64


def _kl(path, base):
    return evaluate(path, base, "mixed", SEQ, 8, torch.device("cpu"), 2)["kl_to_base"]


def _merge_and_prune(src, tmp_path, ratio):
    tokens = calibration_set(load_tokenizer(src), "mixed", 12, SEQ, seed=0)
    man = merge_model(src, tmp_path / "merged", MergeOptions(ratio=ratio), tokens=tokens, device=torch.device("cpu"))
    opts = PruneOptions(ratio=ratio, refit="down")  # the default pruning: output error + down refit
    prune_model(src, tmp_path / "pruned", opts, tokens=tokens, device=torch.device("cpu"))
    return man.stage("merge"), _kl(tmp_path / "merged", src), _kl(tmp_path / "pruned", src)


@pytest.mark.parametrize("kind", ["trained-style", "dense-carved"])
def test_merge_kl_not_above_pruning_kl(kind, tmp_path, tokenizer_dir, carved_model):
    if kind == "dense-carved":
        src, ratio = carved_model, 0.25  # 4 -> 3 experts
    else:
        src, ratio = build_tiny("mixtral", tmp_path / "mixtral", tokenizer_dir, seed=3), 0.5  # 6 -> 3 experts
    man, kl_merge, kl_prune = _merge_and_prune(src, tmp_path, ratio)
    assert man["experts_after"] == (3 if kind == "dense-carved" else 3)
    for info in man["layers"].values():
        assert info["output_error"] <= info["output_error_pruning"] + 1e-12
        assert sorted(e for c in info["clusters"] for e in c) == list(range(man["experts_before"]))
    # where every layer's choice is pruning's own (kept set and down refit: the dense-carved model here), the two
    # outputs are the same fit computed in different float orders: equal to rounding, not to the bit
    assert kl_merge <= kl_prune * (1 + 1e-4), (kl_merge, kl_prune)
    # the output loads in transformers with no missing keys, and moecompress.load gives the same logits
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = reload_clean(tmp_path / "merged")(ids).logits
        b = moecompress.load(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _random_layer(E=6, I=12, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return MoEWeights(gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I), router=r(E, H))


def test_layer_output_refit_lowers_the_error_and_choice_never_loses_to_keep():
    w = _random_layer()
    g = torch.Generator().manual_seed(1)
    x_fit, x_eval = torch.randn(600, 16, generator=g), torch.randn(300, 16, generator=g)
    fit = LayerFit(w, x_fit, x_eval, RouterSpec(top_k=2), F.silu)
    clusters = Clustering("test", [[0, 1], [2, 3], [4], [5]], [0, 2, 4, 5])
    freqs = torch.full((6,), 1 / 6)
    keep_only, start, err_keep, _ = choose_clusters(fit, clusters, freqs, x_fit, ("keep",))
    assert [c.kind for c in keep_only] == ["keep"] * 4 and err_keep == start > 0
    chosen, start2, err, d2 = choose_clusters(fit, clusters, freqs, x_fit)
    assert start2 < start  # the start: every kept expert's down refitted (pruning with its default refit)
    assert err < 0.9 * start and err <= start2  # refits and merges beat plain pruning here
    assert float(d2.sum()) / fit.norm == pytest.approx(err, rel=1e-9)
    assert _dense_error(fit, chosen) == pytest.approx(err, rel=1e-4)
    # refitting one kept expert's down projection to the layer output lowers the error it was fitted for
    cands, state = fit.start(clusters)
    (refit,) = state.trial(0, keep_candidate(w, 0), cands, None, "keep+refit")
    assert refit.cand.kind == "keep+refit" and refit.err < state.err
    assert _dense_error(fit, [refit.cand, *cands[1:]]) == pytest.approx(refit.err, rel=1e-4)


def _dense_error(fit, cands):
    """The merged layer's error on the measure tokens, computed densely (every candidate on every token)."""
    rows = torch.stack([c.row for c in cands])
    corr = None if cands[0].corr is None else torch.stack([c.corr for c in cands])
    w, idx = route(fit._logits(rows, None), fit.spec, None, corr)
    outs = torch.stack([expert_forward(fit.x, c.gate, c.up, c.down, fit.act) for c in cands], 1)  # [T, K, H]
    y = (outs.gather(1, idx[:, :, None].expand(-1, -1, outs.shape[-1])) * w[:, :, None]).sum(1)
    return float((y - fit.y)[fit.n_fit :].double().pow(2).sum()) / fit.norm


@pytest.mark.parametrize("spec", [RouterSpec(top_k=2), RouterSpec(top_k=2, norm_topk=False), RouterSpec(top_k=3)])
def test_incremental_trials_equal_the_dense_merged_layer(spec):
    """Every trial's error (only the tokens a candidate can change are recomputed; without top-k renormalization
    the others rescale in closed form) equals the error of the merged layer computed densely."""
    w = _random_layer(E=8, seed=2)
    g = torch.Generator().manual_seed(4)
    x_fit, x_eval = torch.randn(400, 16, generator=g), torch.randn(200, 16, generator=g)
    fit = LayerFit(w, x_fit, x_eval, spec, F.silu)
    clustering = Clustering("test", [[0, 1, 2], [3, 4], [5], [6, 7]], [1, 3, 5, 7])
    cands, state = fit.start(clustering)
    assert _dense_error(fit, cands) == pytest.approx(state.err, rel=1e-5)
    freqs = torch.full((8,), 1 / 8)
    for j, members in enumerate(clustering.clusters):
        if len(members) == 1:
            continue
        (merged,) = merge_candidates(fit, members, freqs, x_fit, clustering.dominant[j], True, lambda m: None)
        plain, refit = state.trial(j, merged, cands, "subspace", "subspace+refit")
        for t in (plain, refit):
            assert _dense_error(fit, [t.cand if i == j else c for i, c in enumerate(cands)]) == pytest.approx(
                t.err, rel=1e-4
            )
        best = min((plain, refit), key=lambda t: t.err)
        state.accept(best)
        cands[j] = best.cand
        assert _dense_error(fit, cands) == pytest.approx(state.err, rel=1e-4)


def test_sequential_calibration_sees_the_merged_earlier_layers(tmp_path, carved_model):
    from moecompress.core.checkpoint import Checkpoint

    tokens = calibration_set(load_tokenizer(carved_model), "mixed", 6, SEQ, seed=0)
    views = {}
    for seq in (True, False):
        out = tmp_path / f"seq-{seq}"
        man = merge_model(carved_model, out, MergeOptions(ratio=0.25, sequential=seq), tokens=tokens).stage("merge")
        assert ("already-merged" in man["propagation"]) is seq
        views[seq] = Checkpoint(out)
    a0, b0 = views[True].moe_weights(0), views[False].moe_weights(0)
    assert torch.equal(a0.down, b0.down) and torch.equal(a0.router, b0.router)  # same inputs at the first layer
    assert not torch.equal(views[True].moe_weights(1).down, views[False].moe_weights(1).down)


def test_clear_gain_rule_pruning_start_and_final_refit_on_every_token():
    """With a huge ``min_gain_se`` nothing leaves the start: pruning with its down refit (``fit_downs`` on every
    token, every kept expert refitted without the hold-out check); the final refit on all tokens lowers the all-token
    error of down projections refitted on the fit part, and ``routed`` rebuilds the state exactly."""
    w = _random_layer()
    g = torch.Generator().manual_seed(5)
    x_fit, x_eval = torch.randn(300, 16, generator=g), torch.randn(150, 16, generator=g)
    fit = LayerFit(w, x_fit, x_eval, RouterSpec(top_k=2), F.silu)
    clusters = Clustering("test", [[0, 1], [2, 3], [4], [5]], [0, 2, 4, 5])
    freqs = torch.full((6,), 1 / 6)
    held, start, err, _ = choose_clusters(fit, clusters, freqs, x_fit, min_gain_se=1e9, holdout=0)
    assert [c.kind for c in held] == ["keep+refit"] * 4 and all(c.fit_all for c in held) and err == start
    kept, state0 = fit.start(clusters)
    dense = dense_weights(state0.wts, torch.as_tensor(clusters.dominant)[state0.idx], 6)
    hid = lambda e, r: expert_hidden(fit.x[r], w.gate[e], w.up[e], F.silu)  # noqa: E731
    want, _ = fit_downs(hid, w.down, clusters.dominant, dense, fit.y, state0.yc, kept_only=True)
    torch.testing.assert_close(torch.stack([c.down for c in held]), want, rtol=0, atol=0)
    chosen, state = fit.start(clusters)  # down refits on the fit part only (the descent's trials)
    for j in range(4):
        (t,) = state.trial(j, chosen[j], chosen, None, "keep+refit")
        state.accept(t)
        chosen[j] = t.cand
    state = fit.routed(chosen)
    assert _dense_error(fit, chosen) == pytest.approx(state.err, rel=1e-4)
    before = float(state.d2.sum())
    state.refit_all(chosen)
    assert float(state.d2.sum()) < before
    assert _dense_error(fit, chosen) == pytest.approx(state.err, rel=1e-4)
    assert all(c.prior is not None for c in chosen)
