"""The profile as an engine transform: per-expert statistics of each MoE layer, gathered while the layer runs."""

from __future__ import annotations

from typing import Any

import torch

from ..core.engine import LayerContext, Transform
from .stats import LayerAccumulator, add_router_batch, finalize, observe_into, output_similarity


class ProfileTransform(Transform):
    """Observes every batch's routed computation (the model's own routing) into one ``LayerAccumulator`` per
    layer; changes nothing. ``results[l]`` holds layer l's statistics (``stats.finalize`` + output similarity)."""

    name = "profile"
    wants_inputs = False
    observes_forward = True
    changes_block = False

    def __init__(self, num_experts: int, top_k: int, domains: list[str], window_domains: list[str], sim_tokens: int):
        self.num_experts, self.top_k, self.sim_tokens = num_experts, top_k, sim_tokens
        self.num_domains = len(domains)
        self.window_domain = torch.tensor([domains.index(d) for d in window_domains])  # [N]
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self._acc: LayerAccumulator | None = None

    def moe_layer(self, ctx: LayerContext) -> None:
        down = ctx.experts.down_proj  # [E, H, I]
        self._acc = LayerAccumulator(self.num_experts, down.shape[-1], down.shape[1], self.num_domains, self.sim_tokens)

    def observe_forward(
        self, ctx: LayerContext, batch: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> Any:
        router, acc, bs = ctx.router, self._acc, ctx.engine.batch_size
        assert acc is not None
        logits = torch.nn.functional.linear(hidden.float(), router.weight.float())  # [T, E]
        if getattr(router, "bias", None) is not None:
            logits = logits + router.bias.float()
        add_router_batch(acc, logits, hidden)
        rows = self.window_domain[batch * bs : (batch + 1) * bs]  # [B]
        td = rows[:, None].expand(-1, hidden.shape[0] // max(rows.numel(), 1)).reshape(-1)  # [T]
        return observe_into(acc, w, td)

    def observed(self, ctx: LayerContext) -> None:
        acc = self._acc
        assert acc is not None
        stats = finalize(acc, self.top_k)
        x = torch.cat(acc.sim_inputs).to(ctx.engine.device)
        experts = ctx.experts
        stats["output_similarity"] = output_similarity(experts.gate_up_proj, experts.down_proj, experts.act_fn, x).cpu()
        self.results[ctx.index] = stats
        self._acc = None

    def section(self) -> dict[str, Any]:
        return {"layers": sorted(self.results)}
