"""Compensation after channel pruning: refit each expert's down projection on its routed tokens.

Removing channels R of expert e leaves f'_e(x) = W_K h_K(x) instead of f_e(x) = W h(x). The least-squares refit
(the merge refit, ``merge/refit.py``) of the kept columns,
    W'_K = argmin_W sum_{x routed to e} p_e(x)^2 ||W h_K(x) - f_e(x)||^2 + lam ||W - W_K||^2,
equals the OBS-style update W_K + W_R C_RK C_KK^-1 (C = the routing-weighted second moments of h) up to the
ridge: the removed channels' contribution is predicted from the kept ones. With ``sequential`` the layers are
compensated in order on the already-pruned (and refitted) earlier layers' activations, so each layer also
absorbs what the earlier ones lost; otherwise every layer sees the unpruned model's activations.
Memory: one decoder layer and the calibration activations (LayerStream), plus [T, I] activations of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..core.families import MoEWeights
from ..merge.align import activations
from ..merge.refit import refit_down
from .apply import ExactLayer, pad_exact, padded_width, slice_exact, slice_uniform

ERROR_TOKENS = 2048  # calibration tokens on which each layer's routed-output error is reported (manifest)


@dataclass(frozen=True)
class Compensation:
    """How to refit the kept channels' down projections (recorded in the manifest by ``describe``)."""

    input_ids: torch.Tensor  # [N, S] calibration windows
    sequential: bool = True
    fit_tokens: int = 8192
    ridge: float = 1e-3
    holdout: int = 4  # every holdout-th token checks each expert's refit (kept only where it beats slicing)
    batch_size: int = 8
    device: torch.device | None = None

    def describe(self) -> str:
        where = "the already-pruned earlier layers" if self.sequential else "the unpruned model"
        return (
            f"least-squares refit of each expert's kept down_proj columns on its routed tokens (routing-weighted, "
            f"ridge {self.ridge:g}, <= {self.fit_tokens} tokens per layer, every {self.holdout}th token held out to "
            f"check it: an expert keeps plain slicing where the refit is worse there), activations from {where}"
        )


def dense_routing(logits: torch.Tensor, spec: Any, correction: torch.Tensor | None = None) -> torch.Tensor:
    """Routing weights [T, E] (zero off the top-k) as the family's router computes them."""
    from ..prune.run import route

    w, idx = route(logits, spec, None, correction)  # [T, k]
    return torch.zeros(logits.shape, dtype=torch.float64).scatter(1, idx, w.double())


def refit_expert_downs(
    x: torch.Tensor,
    weights: torch.Tensor,
    w: MoEWeights,
    keep: list[torch.Tensor],
    ridge: float = 1e-3,
    holdout: int = 4,
) -> list[torch.Tensor]:
    """Refitted down projections [H, K_e] of every expert (an expert with no channel gets an empty [H, 0]).

    Args:
        x: [T, H] MoE-block inputs; weights: [T, E] routing weights; w: the unpruned layer; keep: kept channels.
        holdout: every holdout-th token is left out of the fit and checks it; an expert whose refit is worse there
            than plain slicing keeps its sliced columns (0: fit on every token, no check).
    """
    check = torch.zeros(x.shape[0], dtype=torch.bool)
    if holdout > 1:
        check[::holdout] = True
    out = []
    for e, k in enumerate(keep):
        k = k.long()
        kept_down = w.down[e][:, k]  # [H, K_e]
        if k.numel() == 0:
            out.append(kept_down)
            continue
        gate, up = w.gate[e][k], w.up[e][k]
        fitted = refit_down(x[~check], weights[~check], [e], w.gate, w.up, w.down, gate, up, kept_down, ridge)
        if holdout > 1:
            on = check & (weights[:, e] > 0)
            xv, pv = x[on], weights[on, e, None].float()  # [n, H], [n, 1]
            target = activations(xv, w.gate[e], w.up[e]) @ w.down[e].float().T  # [n, H]
            h = activations(xv, gate, up)  # [n, K_e]
            err_fit, err_cut = (float((pv * (h @ d.float().T - target)).pow(2).sum()) for d in (fitted, kept_down))
            if err_fit > err_cut:
                fitted = kept_down
        out.append(fitted)
    return out


def with_downs(pruned: MoEWeights | ExactLayer, downs: list[torch.Tensor]) -> MoEWeights | ExactLayer:
    """The sliced layer with the refitted down projections (``downs`` indexed by old expert id)."""
    if isinstance(pruned, ExactLayer):
        dt = pruned.down[0].dtype if pruned.down else torch.float32
        return replace(pruned, down=[downs[e].to(dt) for e in pruned.kept_experts])
    return replace(pruned, down=torch.stack(downs).to(pruned.down.dtype))


def routed_error(x: torch.Tensor, w: MoEWeights, pruned: MoEWeights | ExactLayer, spec: Any) -> float:
    """sum ||y'(x) - y(x)||^2 / sum ||y(x)||^2 of the routed outputs of the pruned layer vs the unpruned one on x."""
    from ..prune.run import combine, expert_outputs, route

    def y(v: MoEWeights) -> torch.Tensor:
        logits = x @ v.router.T + (v.router_bias if v.router_bias is not None else 0.0)
        return combine(expert_outputs(x, v.gate, v.up, v.down), *route(logits, spec, None, v.correction_bias))

    p = pad_exact(pruned, padded_width(pruned.widths)) if isinstance(pruned, ExactLayer) else pruned
    y0 = y(w)
    return float((y(p) - y0).double().pow(2).sum() / y0.double().pow(2).sum().clamp_min(1e-30))


def slice_layer(w: MoEWeights, keep: list[torch.Tensor], layout: str) -> MoEWeights | ExactLayer:
    return slice_uniform(w, torch.stack(keep)) if layout == "uniform" else slice_exact(w, keep)


def _inputs(stream: Any, layer: Any, propagate: bool, limit: int) -> torch.Tensor:
    """MoE-block inputs [<= limit, H] (every step-th token) of one layer over the stream's cache."""
    xs: list[torch.Tensor] = []

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        xs.append(h.detach().reshape(-1, h.shape[-1]).cpu())

    handle = stream.moe_block(layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            if propagate:
                stream.forward_layer(layer)
            else:
                for i in range(len(stream.cache)):
                    stream.run_layer(layer, i)
    finally:
        handle.remove()
    x = torch.cat(xs).float()
    return x[:: max(1, x.shape[0] // limit)][:limit]


@torch.no_grad()
def compensated_downs(
    ckpt: Any, keep: dict[int, list[torch.Tensor]], layout: str, comp: Compensation
) -> tuple[dict[int, list[torch.Tensor]], dict[str, dict[str, float]]]:
    """Refitted down projections per MoE layer and old expert id ([H, K_e], float32), layer-streamed, and per layer
    the relative routed-output error on the calibration tokens of the sliced layer and of the refitted one."""
    from ..core.progress import progress_bar
    from ..core.stream import LayerStream
    from ..prune.load import layer_view, set_layer_experts
    from ..prune.run import RouterSpec

    fam = ckpt.family
    spec = RouterSpec.from_config(fam, ckpt.config)
    stream = LayerStream(ckpt, comp.input_ids, batch_size=comp.batch_size, device=comp.device)
    out: dict[int, list[torch.Tensor]] = {}
    errors: dict[str, dict[str, float]] = {}
    try:
        with progress_bar() as bar:
            task = bar.add_task("refit down_proj", total=len(stream.decoder_layers))
            for l, layer in stream.layers():
                if l not in keep:
                    stream.forward_layer(layer)
                    bar.advance(task)
                    continue
                x = _inputs(stream, layer, not comp.sequential, comp.fit_tokens)  # [T, H]
                w = layer_view(stream.model, fam, l)
                w = MoEWeights(*(None if t is None else t.detach().float().cpu() for t in (
                    w.gate, w.up, w.down, w.router, w.router_bias, w.correction_bias)))  # fmt: skip
                logits = x @ w.router.T + (w.router_bias if w.router_bias is not None else 0.0)  # [T, E]
                weights = dense_routing(logits, spec, w.correction_bias)
                out[l] = refit_expert_downs(x, weights, w, keep[l], comp.ridge, comp.holdout)
                sliced = slice_layer(w, keep[l], layout)
                pruned = with_downs(sliced, out[l])
                xe = x[:: max(1, x.shape[0] // ERROR_TOKENS)][:ERROR_TOKENS]  # the diagnostic needs few tokens
                errors[str(l)] = {
                    "sliced": round(routed_error(xe, w, sliced, spec), 6),
                    "refit": round(routed_error(xe, w, pruned, spec), 6),
                }
                if comp.sequential:
                    if isinstance(pruned, ExactLayer):
                        pruned = pad_exact(pruned, padded_width(pruned.widths))
                    dev = stream.device
                    set_layer_experts(stream.model, fam, l, MoEWeights(*(None if t is None else t.to(dev) for t in (
                        pruned.gate, pruned.up, pruned.down, pruned.router, pruned.router_bias,
                        pruned.correction_bias))))  # fmt: skip
                    stream.forward_layer(layer)
                bar.advance(task)
    finally:
        stream.close()
    return out, errors
