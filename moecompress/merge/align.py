"""Neuron alignment before merging (pure tensor functions).

An expert's intermediate neurons can be permuted without changing its function (permute the rows of gate and
up and the columns of down together). Experts trained from different initialisations hold similar neurons at
different indices, so averaging them index by index mixes unrelated neurons. ``align_to`` permutes a member
so that its neurons match the reference expert's neurons with the highest activation correlation on sample
tokens (Hungarian matching, as in M-SMoE / ZipIt); it changes no expert's output.

The exact assignment costs O(I^3) time and an I x I matrix (Mixtral's I = 14336: minutes and 1.6 GB per member).
Above ``block`` neurons (default 1024: exact for Qwen3-30B's 768, DeepSeek-V3's 2048 takes 2 blocks) the matching
is bounded instead: the reference neurons are halved recursively along the top principal direction (over tokens)
of their activations, each member neuron follows the half holding its best-correlated reference neurons (the
members whose best match is clearest in each half go there, so both halves keep equal counts), and each pair of
blocks of at most ``block`` neurons is matched exactly. Time O(I^2 T) (the correlations, in chunks) +
O(I block^2), memory O(T I + block^2 + chunk); a member neuron whose partner went to the other half is not matched
to it (the KL change against the exact matching is measured in bench/merge_bench.py --align-block).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from moecompress.core.experts import Act, expert_hidden


def activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Act = F.silu) -> torch.Tensor:
    """Intermediate activations h = act(gate x) * (up x) in float32 (``core.experts.expert_hidden``):
    x [T, H], gate/up [I, H] -> [T, I]. Pass the family's ``act``; the SiLU default serves only callers outside
    merge/ that predate it (prune's down refit, atomic/compensate)."""
    f32 = torch.float32
    return expert_hidden(x.to(f32), gate.to(f32), up.to(f32), act)


EXACT_BLOCK = 1024  # neurons matched exactly (Hungarian) in one block


def match_neurons(ref_act: torch.Tensor, act: torch.Tensor, block: int = EXACT_BLOCK) -> torch.Tensor:
    """Permutation perm [I] maximizing sum_i corr(ref neuron i, neuron perm[i]) over tokens: exact up to ``block``
    neurons, above it exact within blocks found by recursive principal-direction halving (module docstring).

    Args:
        ref_act, act: [T, I] activations of the reference expert and of the expert to align (any device).
        block: the largest block matched exactly (at least 2).

    Returns:
        perm [I] (long, on the device of ``act``).
    """
    if block < 2:
        raise ValueError(f"block must be at least 2, got {block}")
    dev = act.device
    if ref_act.shape[1] <= block:  # exact, in float64 as it always was
        a = F.normalize(ref_act.double() - ref_act.double().mean(0), dim=0, eps=1e-12)  # [T, I]
        b = F.normalize(act.double() - act.double().mean(0), dim=0, eps=1e-12)  # [T, I]
        return _assign(a.T @ b).to(dev)
    a = F.normalize(ref_act.float() - ref_act.float().mean(0), dim=0, eps=1e-12)  # [T, I]
    b = F.normalize(act.float() - act.float().mean(0), dim=0, eps=1e-12)  # [T, I]
    I = a.shape[1]
    perm = torch.empty(I, dtype=torch.long, device=dev)
    ar = torch.arange(I, device=dev)
    stack = [(ar, ar)]  # (reference neurons, member neurons) of one block pair, equal counts
    while stack:
        ra, rb = stack.pop()
        n = ra.numel()
        if n <= block:
            local = _assign(a[:, ra].double().T @ b[:, rb].double()).to(dev)  # [n]
            perm[ra] = rb[local]
            continue
        left, right, bl, br = _split(a[:, ra], b[:, rb])
        stack += [(ra[left], rb[bl]), (ra[right], rb[br])]
    return perm


def _split(a: torch.Tensor, b: torch.Tensor, chunk_bytes: int = 1 << 26) -> tuple[torch.Tensor, ...]:
    """Halve a block pair: reference neurons a [T, n] along their top principal direction; member neurons b [T, n]
    by how much better their best correlation in the first half is than in the second. Returns the positions
    (left refs, right refs, left members, right members), halves of n // 2 and n - n // 2."""
    n = a.shape[1]
    h = n // 2
    order = (_top_direction(a) @ a).argsort(stable=True)
    in_left = torch.zeros(n, dtype=torch.bool, device=a.device)
    in_left[order[:h]] = True
    score = torch.empty(n, device=a.device)
    step = max(1, chunk_bytes // (4 * n))
    for s in range(0, n, step):
        corr = a.T @ b[:, s : s + step]  # [n, c]
        best_left = corr.masked_fill(~in_left[:, None], float("-inf")).amax(0)
        best_right = corr.masked_fill(in_left[:, None], float("-inf")).amax(0)
        score[s : s + step] = best_left - best_right
    members = score.argsort(descending=True, stable=True)
    return order[:h], order[h:], members[:h], members[h:]


def _assign(corr: torch.Tensor) -> torch.Tensor:
    """Exact maximum-correlation assignment (scipy's Hungarian on the CPU): corr [n, n] -> perm [n] (CPU)."""
    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    perm = torch.empty(corr.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _top_direction(z: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Top left singular vector [T] of z [T, m] by power iteration from a fixed start (deterministic)."""
    u = z.sum(1)
    if float(u.norm()) <= 1e-12:
        u = torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(iters):
        u = z @ (z.T @ u)
        u = u / u.norm().clamp_min(1e-30)
    return u


def permute_expert(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same expert with neurons reordered: gate/up [I, H] rows and down [H, I] columns follow ``perm``."""
    return gate[perm], up[perm], down[:, perm]


def align_cluster(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    ref: int,
    act: Act,
    block: int = EXACT_BLOCK,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align every member of a cluster to member ``ref``.

    Args:
        x: [T, H] sample tokens; gate, up: [n, I, H]; down: [n, H, I] the members; ref: index of the reference;
        act: the experts' activation; block: the largest neuron block matched exactly (``match_neurons``);
        inplace: permute the members of ``gate``, ``up``, ``down`` themselves (a caller's own copies), not copies.

    Returns:
        (gate, up, down) with every member's neurons permuted to match the reference (functions unchanged).
    """
    perms = align_perms(x, gate, up, ref, act, block)
    g, u, d = (gate, up, down) if inplace else (gate.clone(), up.clone(), down.clone())
    for j, perm in enumerate(perms):
        if perm is not None:
            g[j], u[j], d[j] = permute_expert(gate[j], up[j], down[j], perm)
    return g, u, d


def align_perms(
    x: torch.Tensor, gate: Any, up: Any, ref: int, act: Act, block: int = EXACT_BLOCK
) -> list[torch.Tensor | None]:
    """The permutations ``align_cluster`` applies: perm [I] of each member (None for ``ref``), from the members'
    gate[j], up[j] [I, H] (an [n, I, H] tensor or a list of the layer's own [I, H] tensors: no copies needed)."""
    ref_act = activations(x, gate[ref], up[ref], act)  # [T, I]
    return [
        None if j == ref else match_neurons(ref_act, activations(x, gate[j], up[j], act), block)
        for j in range(len(gate))
    ]
