"""Expert similarity for merging (pure tensor functions).

Output similarity: every expert is evaluated on the SAME sampled tokens (that costs E/k times the routed
compute, so callers sample tokens), and sim[a, b] = mean_t cos(f_a(x_t), f_b(x_t)).
Router-logit similarity: cosine over tokens of the router logit columns, after removing the per-token mean
(softmax ignores it). Cheap: it needs only the router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompress.core.experts import Act, expert_forward


def outputs_by_expert(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: Act
) -> torch.Tensor:
    """Unweighted outputs of every expert on the same tokens, expert-major (``core.experts.expert_forward``).

    Args:
        x: [T, H] tokens.
        w_gate, w_up: [E, I, H]; w_down: [E, H, I].
        act: the experts' activation (``experts.act_fn`` or ``core.experts.activation(config)``).

    Returns:
        [E, T, H] float32 outputs f_e(x_t) (one expert's [T, I] activations in memory at a time).
    """
    xf = x.to(torch.float32)
    f32 = torch.float32
    return torch.stack(
        [expert_forward(xf, w_gate[e].to(f32), w_up[e].to(f32), w_down[e].to(f32), act) for e in range(w_gate.shape[0])]
    )


def output_similarity(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Act,
    chunk_bytes: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairwise_output_similarity(outputs_by_expert(x, ...))`` and the experts' mean outputs, without the
    [E, T, H] outputs: tokens are taken in chunks of about ``chunk_bytes`` of outputs (on the tokens' device).

    Returns:
        ([E, E] mean per-token cosine similarity, [E, H] mean output per expert), float32.
    """
    E, T, H = w_gate.shape[0], x.shape[0], w_down.shape[1]
    step = max(1, chunk_bytes // (4 * E * H))
    sim = torch.zeros(E, E, device=x.device)
    total = torch.zeros(E, H, device=x.device)
    for s in range(0, T, step):
        outs = outputs_by_expert(x[s : s + step], w_gate, w_up, w_down, act)  # [E, t, H]
        total += outs.sum(1)
        unit = F.normalize(outs, dim=-1, eps=1e-12).reshape(E, -1)  # [E, t*H]
        sim += unit @ unit.T
    return sim / T, total / T


def output_features(outputs: torch.Tensor) -> torch.Tensor:
    """Flattened per-token unit outputs, scaled so that ||a - b||^2 = 2 - 2 * mean_t cos(a_t, b_t).

    Args:
        outputs: [E, T, H] expert outputs.

    Returns:
        [E, T*H] features for k-means: squared Euclidean distance is an affine map of the output similarity.
    """
    E, T, _ = outputs.shape
    unit = F.normalize(outputs.to(torch.float32), dim=-1, eps=1e-12)  # [E, T, H]
    return unit.reshape(E, -1) / T**0.5  # [E, T*H]


def pairwise_output_similarity(outputs: torch.Tensor) -> torch.Tensor:
    """Mean per-token cosine similarity of expert outputs.

    Args:
        outputs: [E, T, H] outputs of every expert on the same T tokens.

    Returns:
        [E, E] symmetric similarity, diagonal 1 (0 for an expert whose output is identically zero).
    """
    feats = output_features(outputs)  # [E, T*H]
    return feats @ feats.T  # [E, E]


def router_logit_similarity(logits: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of router logit columns over tokens, per-token mean removed.

    Args:
        logits: [T, E] router logits on calibration tokens.

    Returns:
        [E, E] symmetric similarity in [-1, 1].
    """
    z = logits.to(torch.float32)
    z = z - z.mean(dim=1, keepdim=True)  # [T, E]: softmax-invariant
    cols = F.normalize(z, dim=0, eps=1e-12)  # [T, E]
    return cols.T @ cols  # [E, E]


def gram_features(similarity: torch.Tensor) -> torch.Tensor:
    """Vectors whose Gram matrix is ``similarity`` (clipped to PSD): [E, E] -> [E, E].

    For a cosine-type similarity S, ||z_a - z_b||^2 = S_aa + S_bb - 2 S_ab, so k-means on these vectors is
    k-means on the similarity itself (e.g. a profile's stored output similarity, without the outputs).
    """
    s = similarity.to(torch.float64)
    s = (s + s.T) / 2
    evals, evecs = torch.linalg.eigh(s)  # ascending
    return evecs * evals.clamp_min(0).sqrt()  # [E, E]
