"""Compensation after channel pruning: refit each expert's down projection on its routed tokens (pure functions).

Removing channels R of expert e leaves f'_e(x) = W_K h_K(x) instead of f_e(x) = W h(x). The least-squares refit
of the kept columns,
    W'_K = argmin_W sum_{x routed to e} p_e(x)^2 ||W h_K(x) - f_e(x)||^2 + lam ||W - W_K||^2,
equals the OBS-style update W_K + W_R C_RK C_KK^-1 (C = the routing-weighted second moments of h) up to the
ridge: the removed channels' contribution is predicted from the kept ones. The engine pass (``AtomTransform``)
hands each MoE layer its inputs: with ``sequential`` they come from the already-pruned (and refitted) earlier
layers, so each layer also absorbs what the earlier ones lost; otherwise from the unpruned model.
Memory: the layer's fit tokens [<= fit_tokens, H] and [T, I] activations of one expert.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..core.experts import Act, expert_hidden, routed_forward
from ..core.families import MoEWeights
from ..merge.refit import lstsq_down
from ..prune.order import route
from .apply import ExactLayer, fused_gate_up, pad_exact, padded_width, slice_exact, slice_uniform

ERROR_TOKENS = 2048  # calibration tokens on which each layer's routed-output error is reported (manifest)


@dataclass(frozen=True)
class Refit:
    """How to refit the kept channels' down projections (recorded in the manifest by ``describe``)."""

    fit_tokens: int = 8192
    ridge: float = 1e-3
    holdout: int = 4  # every holdout-th token checks each expert's refit (kept only where it beats slicing)

    def describe(self, sequential: bool = True) -> str:
        where = "the already-pruned earlier layers" if sequential else "the unpruned model"
        return (
            f"least-squares refit of each expert's kept down_proj columns on its routed tokens (routing-weighted, "
            f"ridge {self.ridge:g}, <= {self.fit_tokens} tokens per layer, every {self.holdout}th token held out to "
            f"check it: an expert keeps plain slicing where the refit is worse there), activations from {where}"
        )


@dataclass(frozen=True)
class Compensation:
    """The refit of a single ``prune --granularity atom`` run: its options and the windows the pass runs over."""

    input_ids: torch.Tensor  # [N, S] calibration windows
    sequential: bool = True
    fit_tokens: int = 8192
    ridge: float = 1e-3
    holdout: int = 4
    batch_size: int = 8
    device: torch.device | None = None

    @property
    def refit(self) -> Refit:
        return Refit(self.fit_tokens, self.ridge, self.holdout)

    def describe(self) -> str:
        return self.refit.describe(self.sequential)


def refit_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype refitted down projections are computed and held in: at least float32 (a bf16 layer's refit is
    rounded to bf16 only when written, as it was when layers were held in float32)."""
    return torch.promote_types(dtype, torch.float32)


def dense_routing(logits: torch.Tensor, spec: Any, correction: torch.Tensor | None = None) -> torch.Tensor:
    """Routing weights [T, E] (zero off the top-k) as the family's router computes them."""
    w, idx = route(logits, spec, None, correction)  # [T, k]
    return torch.zeros(logits.shape, dtype=torch.float64).scatter(1, idx, w.double())


def _hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Act) -> torch.Tensor:
    """h(x) [T, I] in float32 (x [T, H], gate/up [I, H])."""
    return expert_hidden(x.float(), gate.float(), up.float(), act)


def refit_down(
    x: torch.Tensor,
    p: torch.Tensor,
    w: MoEWeights,
    e: int,
    keep: torch.Tensor,
    act: Act,
    ridge: float = 1e-3,
    among: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ridge least-squares down projection [H, K] of expert e's kept channels ``keep`` (``refit_dtype`` of
    ``w.down``: float32 for a bf16 or float32 layer).

    x: [T, H] tokens; p: [T] expert e's routing weight (0 where not routed); ``among`` [T] bool: fit on those
    tokens only (the same fit as on ``x[among]``, without copying those rows first). Target: p * f_e(x) of the
    unpruned expert; the sliced columns are the ridge prior and the answer when no token reaches e."""
    kept_down = w.down[e][:, keep]  # [H, K]
    rows = p > 0
    if among is not None:
        rows &= among
    if not bool(rows.any()):
        return kept_down.to(refit_dtype(kept_down.dtype), copy=True)
    xs, ps = x[rows].float(), p[rows]  # [t, H], [t]
    target = ps[:, None] * (_hidden(xs, w.gate[e], w.up[e], act).double() @ w.down[e].double().T)  # [t, H]
    h = _hidden(xs, w.gate[e][keep], w.up[e][keep], act)  # [t, K]
    del xs  # (not held through the solve: [t, H] float32, ~56 MiB at DeepSeek-V3 dims)
    return lstsq_down(ps.double()[:, None] * h.double(), target, kept_down, ridge, refit_dtype(w.down.dtype))


def refit_expert_downs(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """Refitted down projections [H, K_e] of every expert, as a list (an expert with no channel gets an empty
    [H, 0]); the arguments are ``iter_refit_downs``'s."""
    return [d for _, d in iter_refit_downs(*args, **kwargs)]


def iter_refit_downs(
    x: torch.Tensor,
    weights: torch.Tensor,
    w: MoEWeights,
    keep: list[torch.Tensor],
    act: Act,
    ridge: float = 1e-3,
    holdout: int = 4,
    experts: Iterable[int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The refitted down projection [H, K_e] of every expert, one at a time: yields (expert, down) in expert order,
    so a caller can store each where it belongs and hold no list of them. With ``experts``, only those are refitted
    (the others keep their sliced columns): each expert's fit is its own.

    Args:
        x: [T, H] MoE-block inputs; weights: [T, E] routing weights; w: the unpruned layer; keep: kept channels;
        act: the experts' activation (``experts.act_fn``).
        holdout: every holdout-th token is left out of the fit and checks it; an expert whose refit is worse there
            than plain slicing keeps its sliced columns (0: fit on every token, no check).
    """
    check = torch.zeros(x.shape[0], dtype=torch.bool)
    if holdout > 1:
        check[::holdout] = True
    todo = set(range(len(keep)) if experts is None else experts)
    for e, k in enumerate(keep):
        k = k.long()
        kept_down = w.down[e][:, k]  # [H, K_e]
        if k.numel() == 0 or e not in todo:
            yield e, kept_down
            continue
        fitted = refit_down(x, weights[:, e], w, e, k, act, ridge, among=~check)  # (no [T, H] copy of x[~check])
        if holdout > 1:
            on = check & (weights[:, e] > 0)
            xv, pv = x[on], weights[on, e, None].float()  # [n, H], [n, 1]
            target = _hidden(xv, w.gate[e], w.up[e], act) @ w.down[e].float().T  # [n, H]
            h = _hidden(xv, w.gate[e][k], w.up[e][k], act)  # [n, K_e]
            err_fit, err_cut = (float((pv * (h @ d.float().T - target)).pow(2).sum()) for d in (fitted, kept_down))
            if err_fit > err_cut:
                fitted = kept_down
        yield e, fitted


def with_downs(pruned: MoEWeights | ExactLayer, downs: list[torch.Tensor]) -> MoEWeights | ExactLayer:
    """The sliced layer with the refitted down projections (``downs`` indexed by the layer's expert id), held in
    ``refit_dtype`` (float32 for a bf16 layer: rounded to the checkpoint's dtype only when written)."""
    if isinstance(pruned, ExactLayer):
        dt = refit_dtype(pruned.down[0].dtype) if pruned.down else torch.float32
        return replace(pruned, down=[downs[e].to(dt) for e in pruned.kept_experts])
    dt = refit_dtype(pruned.down.dtype)
    return replace(pruned, down=torch.stack([d.to(dt) for d in downs]))


def routed_output(x: torch.Tensor, v: MoEWeights | ExactLayer, spec: Any, act: Act) -> torch.Tensor:
    """The routed output [T, H] of a layer (an exact layer zero-padded) on x [T, H]: its router's top-k, its experts
    (the fused gate_up read in place where gate and up are its halves; weights upcast per expert)."""
    p = pad_exact(v, padded_width(v.widths)) if isinstance(v, ExactLayer) else v
    logits = x @ p.router.T + (p.router_bias if p.router_bias is not None else 0.0)
    wk, idx = route(logits, spec, None, p.correction_bias)  # [T, k]
    return routed_forward(fused_gate_up(p), p.down, act, x, idx, wk)


def relative_error(y: torch.Tensor, y0: torch.Tensor) -> float:
    """sum ||y - y0||^2 / sum ||y0||^2 (routed outputs [T, H])."""
    num = (y - y0).double().pow_(2).sum()  # in place: one float64 temporary at a time, the same values
    return float(num / y0.double().pow_(2).sum().clamp_min(1e-30))


def routed_error(x: torch.Tensor, w: MoEWeights, pruned: MoEWeights | ExactLayer, spec: Any, act: Act) -> float:
    """sum ||y'(x) - y(x)||^2 / sum ||y(x)||^2 of the routed outputs of the pruned layer vs the unpruned one on x."""
    y0 = routed_output(x, w, spec, act)
    return relative_error(routed_output(x, pruned, spec, act), y0)


def slice_layer(
    w: MoEWeights, keep: list[torch.Tensor], layout: str, down_dtype: torch.dtype | None = None
) -> MoEWeights | ExactLayer:
    """The layer with each expert's ``keep`` channels (uniform: one width; exact: per-expert widths), its downs in
    ``down_dtype`` (default that of ``w.down``)."""
    if layout == "uniform":
        return slice_uniform(w, torch.stack(keep), down_dtype)
    return slice_exact(w, keep, down_dtype)
