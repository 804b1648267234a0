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


def slice_uniform(w: MoEWeights, keep: torch.Tensor) -> MoEWeights:
    """keep: [E, K] channel indices per expert -> gate/up [E, K, H], down [E, H, K]; router unchanged."""
    E, K = keep.shape
    H = w.gate.shape[2]
    rows = keep[:, :, None].expand(E, K, H)  # [E, K, H]
    cols = keep[:, None, :].expand(E, w.down.shape[1], K)  # [E, H, K]
    return replace(
        w,
        gate=torch.gather(w.gate, 1, rows).contiguous(),
        up=torch.gather(w.up, 1, rows).contiguous(),
        down=torch.gather(w.down, 2, cols).contiguous(),
    )


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


def slice_exact(w: MoEWeights, keep: list[torch.Tensor]) -> ExactLayer:
    """keep: per expert ascending channel indices (may be empty). Empty experts leave routing."""
    kept = [e for e, k in enumerate(keep) if k.numel() > 0]
    idx = torch.tensor(kept, dtype=torch.long)
    sub = w.select(idx)
    gates, ups, downs = [], [], []
    for new, old in enumerate(kept):
        k = keep[old].long()
        gates.append(sub.gate[new].index_select(0, k).contiguous())  # [K_e, H]
        ups.append(sub.up[new].index_select(0, k).contiguous())  # [K_e, H]
        downs.append(sub.down[new].index_select(1, k).contiguous())  # [H, K_e]
    return ExactLayer(
        gate=gates,
        up=ups,
        down=downs,
        router=sub.router,
        router_bias=sub.router_bias,
        correction_bias=sub.correction_bias,
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
