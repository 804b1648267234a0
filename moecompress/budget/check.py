"""The quantize-only guard: a joint plan is written only when it beats the plan without removal or cuts.

The joint program's feasible set contains the quantize-only plan (every expert at full width, bits chosen by the
same costs as quant's LP plan), so its predicted cost is never worse; but predictions of removal and channel cuts
transfer less well than those of bits (layers interact). So when the two plans differ, both are applied to the
model and their KL to the source is measured on JUDGE windows: calibration windows held out from every fit
(``judge_windows``: drawn from the same calibration text with another seed, never from the evaluation split). They
ride the measuring pass and both write passes as extra batches after the fitting windows (``HeldOutEngine``): the
layers run over them, but no transform sees them (no Hessian, no channel statistic, no refit, no measured error),
so the plans are fitted exactly as without them and their KL is not the optimistic one of the windows GPTQ fitted
(on the built-in model that one judged a joint plan 5% worse that measured 1.2% better on the evaluation windows).
``FinalStates`` keeps the judge batches' final hidden states of each pass; the source's come from the measuring
pass. The lower KL is written; plan.json records both and the rule. A plan written without propagation (quantize's
LP plan is written as quantize writes it: later layers calibrated on the source's layer inputs) leaves the block
unquantized for the fitting batches; its quantize stage leaves the quantized experts in ``ctx.extra[JUDGE_EXPERTS]``
and the judge batches run through them (``HeldOutEngine.forward``), so the judged model is the written one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..calibration.sets import calibration_set, load_tokenizer
from ..core import dist
from ..core.engine import Engine, LayerContext
from ..core.errors import UserError
from ..quant.transform import probe_kl
from .execute import JUDGE_EXPERTS

JUDGE_SEED = 7919  # added to the calibration seed: the judge windows are another draw of the calibration text
MIN_JUDGE = 16  # judge windows: max(MIN_JUDGE, fitting windows // 4)


def judge_windows(tokens: Any, tokenizer_path: Any) -> torch.Tensor | None:
    """``[R, S]`` calibration windows held out from the fit (module docstring): the calibration text's windows at
    seed + JUDGE_SEED that are not fitting windows; None when they cannot be drawn (the guard then judges on the
    fitting windows, plan.json says so) or under torchrun (one process decides)."""
    if dist.world() > 1:
        return None
    fit = tokens.input_ids
    n = max(MIN_JUDGE, fit.shape[0] // 4)
    try:
        got = calibration_set(
            load_tokenizer(tokenizer_path), tokens.name, n, fit.shape[1], (tokens.seed or 0) + JUDGE_SEED
        )
    except (UserError, OSError, ValueError):
        return None
    seen = {tuple(r.tolist()) for r in fit}
    rows = [r for r in got.input_ids if tuple(r.tolist()) not in seen]
    return torch.stack(rows) if rows else None


class HeldOutEngine(Engine):
    """The engine over the fitting windows followed by judge windows: transforms see only the fitting batches (MoE
    inputs and forward observers); every batch runs through the layers. The fitting windows keep their batches
    (the batch size is the largest one up to ``batch_size`` that divides their count)."""

    def __init__(self, ckpt: Any, fit_ids: torch.Tensor, judge_ids: torch.Tensor, batch_size: int,
                 device: torch.device | None, label: str):  # fmt: skip
        n = fit_ids.shape[0]
        bs = max(1, min(batch_size, n))
        while n % bs:
            bs -= 1
        super().__init__(ckpt, torch.cat([fit_ids, judge_ids.to(fit_ids.dtype)]), bs, device, label)
        self.fit_batches = n // bs

    def moe_inputs(self, layer: torch.nn.Module) -> list[torch.Tensor]:
        return super().moe_inputs(layer)[: self.fit_batches]

    def observes(self, i: int) -> bool:
        return i < self.fit_batches

    @torch.no_grad()
    def forward(self, ctx: LayerContext, observers: list) -> None:
        """The engine's forward; when a transform left the layer's written experts in ``ctx.extra[JUDGE_EXPERTS]``
        (``(gate_up [E, 2I, H], down [E, H, I])``: the block itself stays as the fitting batches need it), the judge
        batches are run again through the block holding them."""
        judged = ctx.extra.get(JUDGE_EXPERTS) if ctx.is_moe else None
        cache = self.stream.cache
        inputs = {i: cache[i].clone() for i in range(self.fit_batches, len(cache))} if judged is not None else {}
        super().forward(ctx, observers)
        if judged is None:
            return
        ex = ctx.experts
        kept = ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone()
        ex.gate_up_proj.copy_(judged[0])
        ex.down_proj.copy_(judged[1])
        for i, x in inputs.items():
            cache[i] = x
            cache[i] = self.stream.run_layer(ctx.layer, i)
        ex.gate_up_proj.copy_(kept[0])
        ex.down_proj.copy_(kept[1])


def engine_for(job: Any, label: str, judge: torch.Tensor | None) -> Engine:
    """The job's engine, with the judge windows after its own when there are any."""
    if judge is None:
        return job.engine(label)
    return HeldOutEngine(job.ckpt, job.tokens().input_ids, judge, job.batch_size, job.device, label)


class FinalStates:
    """``emit`` hook: after the last decoder layer, the hidden states ([N, S, H], on the engine's device) of the
    judge batches (a ``HeldOutEngine``), else of every calibration batch; ``inner`` (e.g. the writer's add_layer)
    runs first."""

    def __init__(self, engine: Engine, inner: Any = None):
        self.engine, self.inner = engine, inner
        self.last = len(engine.stream.decoder_layers) - 1
        self.states: torch.Tensor | None = None

    def __call__(self, ctx: LayerContext) -> None:
        if self.inner is not None:
            self.inner(ctx)
        if ctx.index == self.last:
            cache = self.engine.cache
            first = getattr(self.engine, "fit_batches", 0)
            self.states = torch.cat([cache[b].to(self.engine.device) for b in range(first, len(cache))]).clone()


def calibration_kl(base: torch.Tensor, states: torch.Tensor, engine: Engine) -> float:
    """Mean per-token KL(source || changed model) on the judge windows (``FinalStates`` of both)."""
    return probe_kl(base, {"plan": states}, engine.stream.head)["plan"]
