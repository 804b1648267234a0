import pytest
import torch
import torch.nn.functional as F

from moecompress.merge.align import align_cluster, match_neurons, permute_expert
from moecompress.merge.similarity import outputs_by_expert
from moecompress.merge.subspace import merge_average, merge_subspace


def _expert(seed: int, I: int = 12, H: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g)


def test_permutation_keeps_the_expert_function():
    gate, up, down = _expert(0)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    pg, pu, pd = permute_expert(gate, up, down, perm)
    x = torch.randn(20, 8)
    a = outputs_by_expert(x, gate[None], up[None], down[None], F.silu)
    b = outputs_by_expert(x, pg[None], pu[None], pd[None], F.silu)
    assert torch.allclose(a, b, atol=1e-5)


def test_alignment_recovers_a_permuted_copy_so_the_merge_returns_the_expert():
    gate, up, down = _expert(2)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    pg, pu, pd = permute_expert(gate, up, down, perm)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(4))
    G, U, D = torch.stack([gate, pg]), torch.stack([up, pu]), torch.stack([down, pd])
    f = torch.tensor([0.5, 0.5])
    assert not torch.allclose(merge_average(G, f), gate, atol=1e-3)  # unaligned averaging mixes neurons
    G2, U2, D2 = align_cluster(x, G, U, D, 0, F.silu)
    assert torch.allclose(merge_average(G2, f), gate, atol=1e-6)
    assert torch.allclose(merge_average(D2, f), down, atol=1e-6)
    assert torch.allclose(merge_subspace(U2.double(), f.double()), up.double(), atol=1e-5)


def test_match_neurons_is_a_permutation():
    a = torch.randn(50, 10)
    perm = match_neurons(a, a[:, torch.arange(9, -1, -1)])
    assert torch.equal(perm, torch.arange(9, -1, -1))
    assert sorted(perm.tolist()) == list(range(10))


def _correlated(I: int, T: int = 400, noise: float = 0.3, seed: int = 0):
    """Reference activations [T, I] and a member whose neuron perm[i] is reference neuron i plus noise."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(T, I, generator=g)
    perm = torch.randperm(I, generator=g)
    member = torch.empty_like(ref)
    member[:, perm] = ref + noise * torch.randn(T, I, generator=g)
    return ref, member, perm


def _total_corr(ref, member, perm):
    a = F.normalize(ref - ref.mean(0), dim=0)
    b = F.normalize(member - member.mean(0), dim=0)
    return float((a * b[:, perm]).sum())


def test_blocked_matching_recovers_a_permuted_copy_exactly():
    ref, member, perm = _correlated(96, noise=0.0)
    for block in (2, 7, 32, 96):
        assert torch.equal(match_neurons(ref, member, block=block), perm), block


def test_blocked_matching_is_a_permutation_close_to_the_exact_assignment():
    """Above ``block`` neurons the matching is exact within principal-direction blocks: a permutation, and on
    noisy copies it keeps most of the exact assignment's total correlation."""
    ref, member, perm = _correlated(128, noise=0.5, seed=1)
    exact = match_neurons(ref, member)  # 128 <= the default block: Hungarian on the whole matrix
    assert torch.equal(exact, perm)
    for block in (16, 64):
        approx = match_neurons(ref, member, block=block)
        assert sorted(approx.tolist()) == list(range(128))
        ratio = _total_corr(ref, member, approx) / _total_corr(ref, member, exact)
        assert 0.8 < ratio <= 1.0 + 1e-9, (block, ratio)
    with pytest.raises(ValueError, match="block"):
        match_neurons(ref, member, block=1)


def test_align_in_place_permutes_the_given_copies_as_the_copying_form():
    experts = [_expert(s, I=40) for s in (5, 6, 7)]
    G, U, D = (torch.stack([e[i] for e in experts]).to(torch.bfloat16) for i in range(3))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(8))
    want = align_cluster(x, G, U, D, 1, F.silu, block=16)
    g, u, d = G.clone(), U.clone(), D.clone()
    got = align_cluster(x, g, u, d, 1, F.silu, block=16, inplace=True)
    for a, b, own in zip(got, want, (g, u, d), strict=True):
        assert a is own and torch.equal(a, b)
    assert not torch.equal(g, G)  # the members were permuted (the reference stays as it is)
    assert torch.equal(g[1], G[1])
