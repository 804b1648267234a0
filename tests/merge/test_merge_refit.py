import torch

from moecompress.merge.align import activations
from moecompress.merge.refit import refit_down, routing_weights
from moecompress.merge.subspace import merge_average


def _layer(seed=0, E=4, I=10, H=8, T=400):
    g = torch.Generator().manual_seed(seed)
    gate, up = (
        torch.randn(E, I, H, generator=g, dtype=torch.float64),
        torch.randn(E, I, H, generator=g, dtype=torch.float64),
    )
    down = torch.randn(E, H, I, generator=g, dtype=torch.float64)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    return gate, up, down, x, logits


def test_routing_weights_top_k_renormalized():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w = routing_weights(logits, 2, True)
    assert torch.allclose(w.sum(1), torch.ones(1, dtype=torch.float64)) and (w[0, 2:] == 0).all()
    assert torch.allclose(w[0, :2], logits[0, :2].double().softmax(0))


def test_refit_of_a_single_member_cluster_returns_its_down():
    gate, up, down, x, logits = _layer()
    w = routing_weights(logits, 2, True)
    new = refit_down(x, w, [1], gate, up, down, gate[1], up[1], down[1] + 0.3, ridge=1e-9)
    assert torch.allclose(new, down[1], atol=1e-6)


def test_refit_reduces_contribution_error():
    gate, up, down, x, logits = _layer(1)
    w = routing_weights(logits, 2, True)
    members = [0, 2]
    f = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mg, mu, md = merge_average(gate[members], f), merge_average(up[members], f), merge_average(down[members], f)
    s = w[:, members].sum(1)

    def err(d):
        y = sum(w[:, e, None] * (activations(x, gate[e], up[e]).double() @ down[e].T) for e in members)
        return float(((s[:, None] * (activations(x, mg, mu).double() @ d.T) - y) ** 2).sum())

    new = refit_down(x, w, members, gate, up, down, mg, mu, md)
    assert err(new) < 0.9 * err(md)
