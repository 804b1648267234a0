"""The quantize-only guard: a joint plan is written only when it beats the plan without removal or cuts.

The joint program's feasible set contains the quantize-only plan (every expert at full width, bits chosen by the
same costs as quant's LP plan), so its predicted cost is never worse; but predictions of removal and channel cuts
transfer less well than those of bits (layers interact). So when the two plans differ, both are applied to the
model and their KL to the source is measured on the calibration windows (never the evaluation windows): the final
hidden states of every calibration batch, through the model as the write pass changes it (``FinalStates``), against
those of the unchanged model from the measuring pass. The lower KL is written; plan.json records both.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.engine import Engine, LayerContext
from ..quant.transform import probe_kl


class FinalStates:
    """``emit`` hook: after the last decoder layer, every calibration batch's hidden states as the pass leaves the
    model ([N, S, H], on the engine's device); ``inner`` (e.g. the writer's add_layer) runs first."""

    def __init__(self, engine: Engine, inner: Any = None):
        self.engine, self.inner = engine, inner
        self.last = len(engine.stream.decoder_layers) - 1
        self.states: torch.Tensor | None = None

    def __call__(self, ctx: LayerContext) -> None:
        if self.inner is not None:
            self.inner(ctx)
        if ctx.index == self.last:
            cache = self.engine.cache
            self.states = torch.cat([cache[b].to(self.engine.device) for b in range(len(cache))]).clone()


def calibration_kl(base: torch.Tensor, states: torch.Tensor, engine: Engine) -> float:
    """Mean per-token KL(source || changed model) on the calibration windows (``FinalStates`` of both)."""
    return probe_kl(base, {"plan": states}, engine.stream.head)["plan"]
