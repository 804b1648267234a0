"""Channel pruning with compensation (issue 14 section 3): least-squares refit of the kept down_proj columns."""

import json

import carved
import pytest
import torch
from conftest import reload_clean

import moecompress
from moecompress.atomic import run as ap
from moecompress.atomic.compensate import dense_routing, refit_down, refit_expert_downs, slice_layer, with_downs
from moecompress.core.experts import routed_forward
from moecompress.core.families import MoEWeights
from moecompress.prune.order import RouterSpec, route

carved_model = carved.carved_model
FAST = dict(samples=8, seq_len=64, batch_size=4, hessian="diag")


def _routed(x, w, spec):
    wk, idx = route(x @ w.router.T, spec)  # [T, k]
    return routed_forward(torch.cat([w.gate, w.up], dim=1), w.down, torch.nn.functional.silu, x, idx, wk)


def test_refit_among_tokens_equals_the_refit_on_their_copied_rows():
    """``among`` fits on a subset of the tokens without copying their rows first: the same down, bit for bit (the
    hold-out refit of ``iter_refit_downs`` no longer makes a [T, H] copy of x per expert)."""
    g = torch.Generator().manual_seed(3)
    E, I, H = 4, 20, 12
    w = MoEWeights(*(torch.randn(*s, generator=g) * 0.4 for s in ((E, I, H), (E, I, H), (E, H, I), (E, H))))
    x = torch.randn(500, H, generator=g)
    p = dense_routing(x @ w.router.T, RouterSpec(top_k=2))
    among = torch.ones(500, dtype=torch.bool)
    among[::4] = False
    keep = torch.arange(0, I, 2)
    for e in range(E):
        got = refit_down(x, p[:, e], w, e, keep, torch.nn.functional.silu, among=among)
        want = refit_down(x[among], p[among, e], w, e, keep, torch.nn.functional.silu)
        assert torch.equal(got, want) and got.shape == (H, keep.numel())
    none = torch.zeros(500, dtype=torch.bool)  # no token: the sliced columns
    assert torch.equal(refit_down(x, p[:, 0], w, 0, keep, torch.nn.functional.silu, among=none), w.down[0][:, keep])


def test_refit_lowers_the_layer_output_error_of_pruned_channels():
    g = torch.Generator().manual_seed(0)
    E, I, H = 4, 20, 12
    r = lambda *s: torch.randn(*s, generator=g) * 0.4  # noqa: E731
    w = MoEWeights(gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I), router=r(E, H))
    spec = RouterSpec(top_k=2)
    x = torch.randn(2000, H, generator=g)
    keep = [torch.sort(torch.randperm(I, generator=g)[:14]).values for _ in range(E)]
    y = _routed(x, w, spec)
    plain = slice_layer(w, keep, "uniform")
    downs = refit_expert_downs(x, dense_routing(x @ w.router.T, spec), w, keep, torch.nn.functional.silu)
    fitted = with_downs(plain, downs)
    err_plain = float((_routed(x, plain, spec) - y).pow(2).sum())
    err_fit = float((_routed(x, fitted, spec) - y).pow(2).sum())
    assert err_fit < 0.9 * err_plain
    # exact layout: per-expert widths, an emptied expert stays empty
    keep[1] = torch.tensor([], dtype=torch.long)
    exact = with_downs(
        slice_layer(w, keep, "exact"),
        refit_expert_downs(x, dense_routing(x @ w.router.T, spec), w, keep, torch.nn.functional.silu),
    )
    assert exact.kept_experts == [0, 2, 3] and [d.shape for d in exact.down] == [(H, 14)] * 3


@pytest.mark.parametrize("layout", ["uniform", "exact"])
def test_refit_lowers_each_layers_output_error_and_the_output_reloads(layout, tmp_path, carved_model):
    out = tmp_path / layout
    man = ap.atomic_prune(carved_model, out, 0.25, layout=layout, **FAST)
    assert "least-squares refit" in man["compensation"]
    errors = man["compensation_output_error"]
    assert sorted(errors) == ["0", "1"]
    for e in errors.values():  # relative routed-output error on the calibration tokens (0: nothing removed there)
        assert e["refit"] < e["sliced"] or e["refit"] == e["sliced"] == 0
    assert any(e["sliced"] > 0 for e in errors.values())
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b = moecompress.load(out)(ids).logits
        if layout == "uniform":  # loads in transformers with no missing keys and the same logits
            torch.testing.assert_close(reload_clean(out)(ids).logits, b, rtol=0, atol=0)
    assert torch.isfinite(b).all()
    plain = ap.atomic_prune(carved_model, tmp_path / "plain", 0.25, layout=layout, refit=False, **FAST)
    assert plain["compensation"] is None and "compensation_output_error" not in plain
    assert json.loads((out / "atomic_channels.json").read_text()) == json.loads(
        (tmp_path / "plain" / "atomic_channels.json").read_text()
    )  # the refit changes weights, not the selection


def test_sequential_refit_sees_the_pruned_earlier_layers(tmp_path, carved_model):
    from moecompress.core.checkpoint import Checkpoint

    views = {}
    for seq in (True, False):
        out = tmp_path / f"seq-{seq}"
        man = ap.atomic_prune(carved_model, out, 0.25, layout="uniform", sequential=seq, **FAST)
        assert ("already-pruned" in man["compensation"]) is seq
        views[seq] = Checkpoint(out)
    assert torch.equal(views[True].moe_weights(0).down, views[False].moe_weights(0).down)
    assert not torch.equal(views[True].moe_weights(1).down, views[False].moe_weights(1).down)
