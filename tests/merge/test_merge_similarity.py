import pytest
import torch
import torch.nn.functional as F

from moecompress.merge.similarity import (
    output_features,
    outputs_by_expert,
    pairwise_output_similarity,
    router_logit_similarity,
)


@pytest.mark.parametrize("act", [F.silu, F.gelu])
def test_outputs_by_expert_match_per_expert_loop_with_the_given_activation(act):
    g = torch.Generator().manual_seed(0)
    E, I, H, T = 5, 6, 8, 7
    wg, wu, wd = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    out = outputs_by_expert(x, wg, wu, wd, act)
    assert out.shape == (E, T, H)
    for e in range(E):
        ref = (act(x @ wg[e].T) * (x @ wu[e].T)) @ wd[e].T
        assert torch.allclose(out[e], ref, atol=1e-5)
    other = F.gelu if act is F.silu else F.silu  # the activation is honoured, not assumed
    assert not torch.allclose(outputs_by_expert(x, wg, wu, wd, other), out, atol=1e-3)


def test_output_similarity_is_mean_per_token_cosine():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(4, 10, 6, generator=g)
    out[3] = 2.5 * out[1]  # same direction on every token
    sim = pairwise_output_similarity(out)
    ref = F.cosine_similarity(out[0], out[2], dim=-1).mean()
    assert torch.allclose(sim[0, 2], ref, atol=1e-6)
    assert torch.allclose(sim.diagonal(), torch.ones(4), atol=1e-6)
    assert torch.allclose(sim[1, 3], torch.tensor(1.0), atol=1e-6)
    feats = output_features(out)
    d2 = ((feats[0] - feats[2]) ** 2).sum()
    assert torch.allclose(d2, 2 - 2 * sim[0, 2], atol=1e-5)


def test_router_logit_similarity_ignores_per_token_offset():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 16, generator=g)
    logits[:, 2] = logits[:, 0] * 3.0
    shifted = logits + torch.randn(200, 1, generator=g) * 5
    sim = router_logit_similarity(shifted)
    assert torch.allclose(sim, router_logit_similarity(logits), atol=1e-5)
    assert sim.shape == (16, 16) and torch.allclose(sim, sim.T)
    z = logits - logits.mean(1, keepdim=True)
    assert torch.allclose(sim[0, 2], F.cosine_similarity(z[:, 0], z[:, 2], dim=0), atol=1e-5)
    assert sim[0, 2] > 0.8 > sim[0, 1]


def test_gram_features_reproduce_output_distances():
    from moecompress.merge.similarity import gram_features

    out = torch.randn(6, 9, 5, generator=torch.Generator().manual_seed(4))
    z = gram_features(pairwise_output_similarity(out))
    f = output_features(out).double()
    assert torch.allclose(torch.cdist(z, z), torch.cdist(f, f), atol=1e-5)
