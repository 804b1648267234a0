"""HEAPr atomic-expert scores and channel selection (Li et al. 2025), as pure functions over tensors.

An atom is one intermediate channel j of a routed expert e: row j of gate and up, column j of down.
Removing it changes the expert's (unweighted) output by -h_j(x) w_j, with w_j = W_down[e, :, j].
A second-order (Fisher) estimate of the loss change, with g = dL/d f_e(x) over the tokens routed to e and
the activation and gradient treated as independent, is

    s_{e,j} = m_{e,j} * w_j^T G_e w_j,     m_{e,j} = mean_x h_j(x)^2,   G_e = mean_x g g^T.

G_e comes in three forms (memory per expert for hidden size H):
    full      Tensor [E, H, H]                    H^2 floats
    diag      Tensor [E, H]                       H floats (only diag(G_e))
    low-rank  LowRankG(factors [E, H, r], diag)   H*(r+1) floats, G_e ~ U U^T + diag(residual)
    chunked   ChunkedG (full G built for a chunk of experts at a time, under ``--max-memory``)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankG:
    """G_e ~ U_e U_e^T + diag(residual_e): a rank-r sketch plus the exact remainder of the diagonal."""

    factors: torch.Tensor  # [E, H, r]
    residual_diag: torch.Tensor | None = None  # [E, H], >= 0


@dataclass(frozen=True)
class ChunkedG:
    """Full G_e made ``chunk`` experts at a time: ``build(ids)`` -> [len(ids), H, H] (G of those experts, in
    order). The scores computed from it equal the whole [E, H, H]'s bit for bit (each expert's G is its own
    sum, made by the same operations whatever the chunk)."""

    num_experts: int
    chunk: int
    build: Callable[[list[int]], torch.Tensor]

    def chunks(self, experts: Iterable[int] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(ids, G of ids [len(ids), H, H]) for ``experts`` (default all) in chunks; one chunk lives at a time."""
        ids = list(range(self.num_experts)) if experts is None else list(experts)
        for c0 in range(0, len(ids), max(1, self.chunk)):
            part = ids[c0 : c0 + max(1, self.chunk)]
            yield part, self.build(part)


GradStat = torch.Tensor | LowRankG | ChunkedG


def g_kind(G: GradStat) -> str:
    """'full', 'diag' or 'lowrank' for a gradient statistic."""
    if isinstance(G, LowRankG):
        return "lowrank"
    if isinstance(G, ChunkedG) or G.dim() == 3:
        return "full"
    if G.dim() == 2:
        return "diag"
    raise ValueError(f"G must be [E, H, H], [E, H] or LowRankG, got shape {tuple(G.shape)}")


def quadratic_form(W_down: torch.Tensor, G: GradStat, experts: Iterable[int] | None = None) -> torch.Tensor:
    """q_{e,j} = w_j^T G_e w_j for every column j of every expert's down projection (of ``experts`` only when
    given: the other rows are zero; each expert's row is computed on its own, the same either way).

    W_down: [E, H, I], wherever the experts are (not copied: the GPU's layer stays on the GPU). Each expert's [H, I]
    is upcast to float64 on G's device (the GPU for a chunked G under --device cuda), where its row is computed;
    the rows come to the CPU together (one copy per chunk of experts). Returns [E, I] float64 on the CPU. No
    float64 or host copy of a layer-sized tensor (full G at H 2048, E 128 is 2.1 GB in fp32; its float64 copy and
    G W would add 4.3 + 1.6 GB).
    """
    kind = g_kind(G)
    E, _, I = W_down.shape
    q = torch.zeros(E, I, dtype=torch.float64)  # [E, I] on the CPU, where the scores are ranked
    if isinstance(G, ChunkedG):
        for ids, part in G.chunks(experts):
            rows = [_quad_full(W_down[e].to(part.device, torch.float64), part[k]) for k, e in enumerate(ids)]
            _put_rows(q, ids, rows)
            del part, rows
        return q
    dev = G.factors.device if isinstance(G, LowRankG) else G.device  # compute where G is (the GPU under --device cuda)
    ids = list(range(E)) if experts is None else list(experts)
    rows = []
    for e in ids:
        W = W_down[e].to(dev, torch.float64)  # [H, I]: this expert only
        if kind == "full":
            assert isinstance(G, torch.Tensor)
            qe = _quad_full(W, G[e])
        elif kind == "diag":
            assert isinstance(G, torch.Tensor)
            qe = (W.square() * G[e].double().unsqueeze(-1)).sum(dim=0)
        else:
            assert isinstance(G, LowRankG)
            UW = G.factors[e].double().T @ W  # [r, I]
            qe = UW.square().sum(dim=0)
            if G.residual_diag is not None:
                qe += (W.square() * G.residual_diag[e].double().unsqueeze(-1)).sum(dim=0)
        rows.append(qe)
    _put_rows(q, ids, rows)
    return q


QUAD_BLOCK_BYTES = 32 << 20  # float64 rows of G_e upcast at once on the CPU (``_quad_full``)


def _quad_full(W: torch.Tensor, Ge: torch.Tensor) -> torch.Tensor:
    """w_j^T G_e w_j for every column of one expert's float64 down projection W [H, I] (on G_e's device): [I].

    On the CPU, G_e W is made QUAD_BLOCK_BYTES of float64 rows of G_e at a time into one [H, I] float64 buffer, which
    then takes W's product in place: no float64 copy of G_e (H^2 x 8 B: 411 MB at H 7168) and one [H, I] float64
    temporary instead of two. Each element of G_e W is the same dot product over H as the whole matmul's (the
    blocks split rows only; bit for bit with MKL, one thread or more) and the column sums run over the same [H, I]
    tensor, so the row is the whole expression's ``(W * (G_e.double() @ W)).sum(0)``. Elsewhere (CUDA) that
    expression as it is."""
    if Ge.device.type != "cpu":
        return (W * (Ge.double() @ W)).sum(dim=0)
    H = Ge.shape[0]
    step = max(1, QUAD_BLOCK_BYTES // (8 * H))
    GW = torch.empty(H, W.shape[1], dtype=torch.float64)  # [H, I]
    for r0 in range(0, H, step):
        torch.mm(Ge[r0 : r0 + step].double(), W, out=GW[r0 : r0 + step])
    return GW.mul_(W).sum(dim=0)


def _put_rows(q: torch.Tensor, ids: list[int], rows: list[torch.Tensor]) -> None:
    """q[ids] = the rows [I] (on the compute device), brought to q's device in one copy."""
    if ids:
        q[ids] = torch.stack(rows).to(q.device)


def heapr_scores(
    m: torch.Tensor, W_down: torch.Tensor, G: GradStat, experts: Iterable[int] | None = None
) -> torch.Tensor:
    """HEAPr score s_{e,j} = m_{e,j} * w_j^T G_e w_j (estimated loss increase when channel j of e is removed).

    m: [E, I] channel second moments over routed tokens; W_down: [E, H, I]; G: see module docstring.
    Returns [E, I] float64 on the CPU (larger = more important); only the rows of ``experts`` when given (others
    zero).
    """
    if m.shape != (W_down.shape[0], W_down.shape[2]):
        raise ValueError(f"m {tuple(m.shape)} does not match W_down {tuple(W_down.shape)}")
    return m.double().to("cpu") * quadratic_form(W_down, G, experts)


# ---- selection ---------------------------------------------------------------------------------


def n_to_remove(total_channels: int, ratio: float) -> int:
    """Number of routed channels removed for a ratio of all routed channels."""
    return int(round(ratio * total_channels))


def select_exact(
    scores: list[torch.Tensor],
    ratio: float,
    protected: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Global ranking over all routed experts of all layers; drop the lowest-scoring channels.

    scores: per MoE layer [E_l, I]; protected: per layer bool [E_l] (protected experts keep every channel).
    Removes round(ratio * all routed channels) channels, all from unprotected experts.
    Returns per layer a bool keep mask [E_l, I]. Ties are broken by position (stable sort).
    """
    flat, owner = [], []
    total = 0
    for l, s in enumerate(scores):
        s = s.double().clone()
        total += s.numel()
        if protected is not None and protected[l].any():
            s[protected[l]] = math.inf
        flat.append(s.reshape(-1))
        owner.append(torch.full((s.numel(),), l))
    n = n_to_remove(total, ratio)
    allv = torch.cat(flat)  # [N]
    if n > int(torch.isfinite(allv).sum()):
        raise ValueError(f"cannot remove {n} channels: only {int(torch.isfinite(allv).sum())} are unprotected")
    order = torch.sort(allv, stable=True).indices
    keep_flat = torch.ones_like(allv, dtype=torch.bool)
    keep_flat[order[:n]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep_flat[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def uniform_width(I: int, ratio: float, multiple: int = 16) -> int:
    """One kept width for every routed expert: I * (1 - ratio) rounded to the nearest multiple (at least one)."""
    top = (I // multiple) * multiple
    if top == 0:
        raise ValueError(f"expert width {I} is below the width multiple {multiple}")
    k = int(round(I * (1.0 - ratio) / multiple)) * multiple
    return max(multiple, min(k, top))


def top_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Each expert keeps its own top-`width` channels by score, returned in ascending channel order.

    scores: [E, I]. Returns kept channel indices [E, width] (long).
    """
    if not 0 < width <= scores.shape[1]:
        raise ValueError(f"width {width} not in 1..{scores.shape[1]}")
    # stable descending: sort ascending on -score with index tie-break
    top = torch.sort(-scores.double(), dim=1, stable=True).indices[:, :width]  # [E, K]
    return torch.sort(top, dim=1).values


def mask_to_indices(keep: torch.Tensor) -> list[torch.Tensor]:
    """Bool keep mask [E, I] -> per-expert ascending kept channel indices (possibly empty)."""
    return [row.nonzero().flatten() for row in keep]


def select_channels(
    scores: dict[int, torch.Tensor],
    ratio: float,
    width: int | None,
    protected: dict[int, torch.Tensor],
    top_k: int,
    n_group: int = 1,
) -> dict[int, list[torch.Tensor]]:
    """Kept channel indices per MoE layer and expert (ascending; empty for an expert that loses every channel).

    scores: per layer [E, I]; width: the one kept width of the uniform layout (each expert keeps its own top
    ``width``), or None for the exact layout (global ranking, ``select_exact``); protected: per layer bool [E]
    (exact layout only). Raises ValueError when the exact selection leaves a layer fewer routable experts than
    ``top_k``, or empties an expert of a group-limited router (``n_group`` > 1).
    """
    layers = sorted(scores)
    if width is not None:
        return {l: list(top_channels(scores[l], width)) for l in layers}
    masks = select_exact([scores[l] for l in layers], ratio, [protected[l] for l in layers])
    keep = {}
    for l, mask in zip(layers, masks, strict=True):
        alive = int(mask.any(dim=1).sum())
        if alive < top_k:
            raise ValueError(
                f"ratio {ratio} leaves layer {l} with {alive} experts that have channels, fewer than top-k {top_k}"
            )
        if n_group > 1 and alive < mask.shape[0]:
            raise ValueError(
                f"ratio {ratio} empties {mask.shape[0] - alive} expert(s) of layer {l}, which a group-limited router "
                f"(n_group={n_group}) cannot lose"
            )
        keep[l] = mask_to_indices(mask)
    return keep


# ---- ranking agreement -------------------------------------------------------------------------


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), 0-based, float64."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    if uniq.numel() < x.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
        ranks = (sums / counts)[inv]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score tensors of the same shape."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def bottom_overlap(a: torch.Tensor, b: torch.Tensor, frac: float) -> float:
    """|lowest-frac set of a  intersect  lowest-frac set of b| / set size: agreement on what gets removed."""
    n = max(1, int(round(frac * a.numel())))
    sa = set(torch.argsort(a.double().flatten(), stable=True)[:n].tolist())
    sb = set(torch.argsort(b.double().flatten(), stable=True)[:n].tolist())
    return len(sa & sb) / n


def ranking_agreement(ref: list[torch.Tensor], other: list[torch.Tensor], frac: float = 0.25) -> dict[str, float]:
    """How close a cheaper score's ranking is to the reference one, globally over all layers.

    Returns Spearman correlation (global and mean within-expert) and the overlap of the removed sets at `frac`
    (global, and within-expert as used by the uniform layout).
    """
    a = torch.cat([s.double().flatten() for s in ref])
    b = torch.cat([s.double().flatten() for s in other])
    per_expert, per_expert_overlap = [], []
    for sa, sb in zip(ref, other, strict=True):
        for ra, rb in zip(sa, sb, strict=True):
            per_expert.append(spearman(ra, rb))
            per_expert_overlap.append(bottom_overlap(ra, rb, frac))
    return {
        "spearman_global": spearman(a, b),
        "spearman_within_expert_mean": float(torch.tensor(per_expert).nanmean()),
        f"removed_overlap_global@{frac:g}": bottom_overlap(a, b, frac),
        f"removed_overlap_within_expert@{frac:g}": float(torch.tensor(per_expert_overlap).mean()),
    }
