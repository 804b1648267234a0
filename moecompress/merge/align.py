"""Neuron alignment before merging (pure tensor functions).

An expert's intermediate neurons can be permuted without changing its function (permute the rows of gate and
up and the columns of down together). Experts trained from different initialisations hold similar neurons at
different indices, so averaging them index by index mixes unrelated neurons. ``align_to`` permutes a member
so that its neurons match the reference expert's neurons with the highest activation correlation on sample
tokens (Hungarian matching, as in M-SMoE / ZipIt); it changes no expert's output.
"""

from __future__ import annotations

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


def match_neurons(ref_act: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Permutation perm [I] maximizing sum_i corr(ref neuron i, neuron perm[i]) over tokens.

    Args:
        ref_act, act: [T, I] activations of the reference expert and of the expert to align.
    """
    a = F.normalize(ref_act.double() - ref_act.double().mean(0), dim=0, eps=1e-12)  # [T, I]
    b = F.normalize(act.double() - act.double().mean(0), dim=0, eps=1e-12)  # [T, I]
    corr = a.T @ b  # [I, I]
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    perm = torch.empty(corr.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute_expert(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same expert with neurons reordered: gate/up [I, H] rows and down [H, I] columns follow ``perm``."""
    return gate[perm], up[perm], down[:, perm]


def align_cluster(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ref: int, act: Act
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align every member of a cluster to member ``ref``.

    Args:
        x: [T, H] sample tokens; gate, up: [n, I, H]; down: [n, H, I] the members; ref: index of the reference;
        act: the experts' activation.

    Returns:
        (gate, up, down) with every member's neurons permuted to match the reference (functions unchanged).
    """
    ref_act = activations(x, gate[ref], up[ref], act)  # [T, I]
    g, u, d = gate.clone(), up.clone(), down.clone()
    for j in range(gate.shape[0]):
        if j == ref:
            continue
        perm = match_neurons(ref_act, activations(x, gate[j], up[j], act))
        g[j], u[j], d[j] = permute_expert(gate[j], up[j], down[j], perm)
    return g, u, d
