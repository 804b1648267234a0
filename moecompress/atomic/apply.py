"""Slice experts' channels: keep rows of gate/up and columns of down, per expert (pure tensor functions).

Uniform layout: every expert keeps the same number K of channels -> a normal MoEWeights with I' = K.
Exact layout: every expert keeps its own channels (K_e may differ, or be 0). Experts left with zero channels
are removed from routing (router row, biases dropped; experts renumbered). For an in-memory stock module the
per-expert weights are zero-padded to one width per layer: a padded channel has gate = up = 0 and down = 0,
so SiLU(0) * 0 = 0 and it adds exactly nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.families import MoEWeights


def slice_uniform(w: MoEWeights, keep: torch.Tensor, down_dtype: torch.dtype | None = None) -> MoEWeights:
    """keep: [E, K] channel indices per expert -> gate/up [E, K, H] (the two halves of one [E, 2K, H] tensor:
    ``fused_gate_up`` returns it without a copy), down [E, H, K] (in ``down_dtype``, default that of ``w.down``);
    router unchanged. Filled one expert at a time: no temporary the size of the layer."""
    E, K = keep.shape
    H, Hd = w.gate.shape[2], w.down.shape[1]
    gate_up = torch.empty(E, 2 * K, H, dtype=w.gate.dtype, device=w.gate.device)  # [E, 2K, H]
    down = torch.empty(E, Hd, K, dtype=down_dtype or w.down.dtype, device=w.down.device)  # [E, H, K]
    for e in range(E):
        k = keep[e].to(w.gate.device)
        gate_up[e, :K] = w.gate[e].index_select(0, k)
        gate_up[e, K:] = w.up[e].index_select(0, k)
        down[e] = w.down[e].index_select(1, k.to(w.down.device))
    return replace(w, gate=gate_up[:, :K], up=gate_up[:, K:], down=down)


def fused_gate_up(w: MoEWeights) -> torch.Tensor:
    """The fused gate_up [E, 2I, H] (gate rows first) of a view: the memory ``w.gate`` and ``w.up`` already share
    when they are the two halves of one contiguous [E, 2I, H] tensor (a block's own ``gate_up_proj``, or
    ``slice_uniform``'s result), no copy; else their concatenation."""
    fused = fused_halves(w)
    return fused if fused is not None else torch.cat([w.gate, w.up], dim=1)


def fused_halves(w: MoEWeights) -> torch.Tensor | None:
    """The [E, 2I, H] tensor whose two halves ``w.gate`` and ``w.up`` are (a view, no copy), or None when they
    are not."""
    g, u = w.gate, w.up
    E, I, H = g.shape
    halves = (
        g.dtype == u.dtype
        and g.device == u.device
        and g.stride() == u.stride() == (2 * I * H, H, 1)
        and u.data_ptr() == g.data_ptr() + I * H * g.element_size()
    )
    return g.as_strided((E, 2 * I, H), (2 * I * H, H, 1)) if halves else None


@dataclass
class ExactLayer:
    """One MoE layer after exact (per-expert width) atomic pruning."""

    gate: list[torch.Tensor]  # per kept expert [K_e, H]
    up: list[torch.Tensor]  # per kept expert [K_e, H]
    down: list[torch.Tensor]  # per kept expert [H, K_e]
    router: torch.Tensor  # [E', H]
    router_bias: torch.Tensor | None
    correction_bias: torch.Tensor | None
    kept_experts: list[int]  # old expert index of each new expert (those with >= 1 channel)
    kept_channels: list[list[int]]  # per new expert: old channel indices

    @property
    def widths(self) -> list[int]:
        return [g.shape[0] for g in self.gate]


def slice_exact(w: MoEWeights, keep: list[torch.Tensor], down_dtype: torch.dtype | None = None) -> ExactLayer:
    """keep: per expert ascending channel indices (may be empty). Empty experts leave routing. Downs in
    ``down_dtype`` (default that of ``w.down``)."""
    kept = [e for e, k in enumerate(keep) if k.numel() > 0]
    idx = torch.tensor(kept, dtype=torch.long)
    pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
    gates, ups, downs = [], [], []
    for old in kept:  # one expert at a time: no copy of the kept experts' whole weights
        k = keep[old].long()
        gates.append(w.gate[old].index_select(0, k).contiguous())  # [K_e, H]
        ups.append(w.up[old].index_select(0, k).contiguous())  # [K_e, H]
        downs.append(w.down[old].index_select(1, k).to(down_dtype or w.down.dtype).contiguous())  # [H, K_e]
    return ExactLayer(
        gate=gates,
        up=ups,
        down=downs,
        router=pick(w.router),
        router_bias=pick(w.router_bias),
        correction_bias=pick(w.correction_bias),
        kept_experts=kept,
        kept_channels=[keep[e].tolist() for e in kept],
    )


def padded_width(widths: list[int], multiple: int = 16) -> int:
    """Smallest multiple of `multiple` that holds the widest expert (kernels want aligned widths)."""
    return max(multiple, -(-max(widths) // multiple) * multiple)


def pad_exact(layer: ExactLayer, width: int) -> MoEWeights:
    """Zero-pad every expert to `width` channels -> stock [E', width, H] / [E', H, width] view (exact)."""
    E, H = len(layer.gate), layer.router.shape[1]
    dtype = layer.gate[0].dtype if E else layer.router.dtype
    gate = torch.zeros(E, width, H, dtype=dtype)
    up = torch.zeros(E, width, H, dtype=dtype)
    down = torch.zeros(E, H, width, dtype=layer.down[0].dtype if E else dtype)  # (refitted downs may be wider)
    for e in range(E):
        k = layer.gate[e].shape[0]
        gate[e, :k], up[e, :k], down[e, :, :k] = layer.gate[e], layer.up[e], layer.down[e]
    return MoEWeights(
        gate=gate,
        up=up,
        down=down,
        router=layer.router,
        router_bias=layer.router_bias,
        correction_bias=layer.correction_bias,
    )
