"""The one expert computation (SwiGLU-style gated MLP) every operation uses, honouring the family's activation.

For expert e with gate, up [I, H] and down [H, I] (transformers' fused ``gate_up_proj`` [E, 2I, H] holds gate
rows first): h(x) = act(x gate^T) * (x up^T) [T, I], f(x) = h(x) down^T [T, H]. ``act`` is the model's own
activation (``experts.act_fn`` of the transformers module, or ``activation(config)``): never assume SiLU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Act = Callable[[torch.Tensor], torch.Tensor]


def activation(config: object) -> Act:
    """The experts' activation named by ``config.hidden_act`` (transformers' ACT2FN), SiLU when unnamed."""
    from transformers.activations import ACT2FN

    return ACT2FN[getattr(config, "hidden_act", None) or "silu"]


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Act) -> torch.Tensor:
    """h(x) = act(x gate^T) * (x up^T): x [T, H], gate/up [I, H] -> [T, I]."""
    return act(nn.functional.linear(x, gate)) * nn.functional.linear(x, up)


def expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Act) -> torch.Tensor:
    """f(x) = h(x) down^T: x [T, H], gate/up [I, H], down [H, I] -> [T, H] (unweighted expert output)."""
    return nn.functional.linear(expert_hidden(x, gate, up, act), down)


def fused_hidden(x: torch.Tensor, gate_up: torch.Tensor, act: Act) -> torch.Tensor:
    """h(x) from transformers' fused ``gate_up [2I, H]`` (gate rows first): x [T, H] -> [T, I]. The same values as
    ``expert_hidden`` up to float rounding; bit for bit what the eager kernel (and ``routed_forward``) computes."""
    g, u = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    return act(g) * u


def routed_forward(
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    act: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    observe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The eager experts computation of transformers (same ops, same order), calling
    ``observe(e, token_idx, top_k_pos, h [n, I], f [n, H])`` with each expert's unweighted output."""
    out = torch.zeros_like(hidden)
    E = gate_up.shape[0]
    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= E:
            continue
        token_idx, pos = torch.where(top_k_index == e)
        h = fused_hidden(hidden[token_idx], gate_up[e], act)  # [n, I]
        f = nn.functional.linear(h, down[e])  # [n, H]
        if observe is not None:
            observe(e, token_idx, pos, h, f)
        out.index_add_(0, token_idx, (f * top_k_weights[token_idx, pos, None]).to(out.dtype))
    return out
