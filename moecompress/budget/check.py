"""The quantize-only guard: a joint plan is written only when it beats the plan without removal or cuts.

The joint program's feasible set contains the quantize-only plan (every expert at full width, bits chosen by the
same costs as quant's LP plan), so its predicted cost is never worse; but predictions of removal and channel cuts
transfer less well than those of bits (layers interact). So when the two plans differ, both are applied to the model
and their KL to the source is measured on JUDGE windows: calibration windows held out from every fit
(``judge_windows``: the windows of the calibration text that share no token with a fitting window, laid end to end,
every one of them up to 8 per fitting window; never from the evaluation split). Sixteen windows drawn at another
seed judged a joint plan on the built-in model at 50% of bf16 15% worse (1.08e-4 vs 9.18e-5) that measured 3% better
on the evaluation windows: a small judge is noise. They ride the measuring pass and both write passes as extra
batches after the fitting windows (``HeldOutEngine``): the layers run over them, but no transform sees them (no
Hessian, no channel statistic, no refit, no measured error), so the plans are fitted exactly as without them and
their KL is not the optimistic one of the windows GPTQ fitted (on the built-in model that one judged a joint plan 5%
worse that measured 1.2% better on the evaluation windows). ``FinalStates`` keeps the judge batches' final hidden
states of each pass; the source's come from the measuring pass. The lower KL is written; plan.json records both and
the rule. A plan written without propagation (quantize's LP plan is written as quantize writes it: later layers
calibrated on the source's layer inputs) leaves the block unquantized for the fitting batches; its quantize stage
leaves the quantized experts in ``ctx.extra[JUDGE_EXPERTS]`` and the judge batches run through the block holding
them (``HeldOutEngine.forward``: once, in the layer's own forward), so the judged model is the written one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..calibration.sets import encode_text, load_texts, load_tokenizer
from ..core import dist
from ..core.engine import Engine, LayerContext
from ..core.errors import UserError
from ..quant.transform import probe_kl
from .execute import JUDGE_EXPERTS

MIN_JUDGE = 16
JUDGE_PER_FIT = 8  # judge windows: every unused calibration window, at most 8 per fitting window (module docstring)
# and at most this many bytes of their float32 hidden states (three copies live: the activation cache, the source's
# final states, a write pass's final states): 128 windows of 256 tokens at H 2048 (Qwen3-30B), no cap on the built-in
JUDGE_STATE_BYTES = 256 * 2**20


def fitting_starts(ids: dict[str, torch.Tensor], fit: torch.Tensor, seed: int) -> dict[str, list[int]] | None:
    """Where each fitting window starts in its domain's token ids (``calibration_set``'s seeded draw, replayed and
    checked window for window against ``fit [N, S]``); None when they are not that draw."""
    N, S = fit.shape
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[int]] = {}
    rows = []
    names = sorted(ids)
    for i, d in enumerate(names):
        n = N // len(names) + (1 if i < N % len(names) else 0)
        if n == 0 or len(ids[d]) < S:
            out[d] = []
            continue
        out[d] = torch.randint(0, len(ids[d]) - S + 1, (n,), generator=g).tolist()
        rows += [ids[d][s : s + S] for s in out[d]]
    if len(rows) != N or not torch.equal(torch.stack(rows), fit.to(torch.long)):
        return None
    return out


def judge_windows(
    tokens: Any, tokenizer_path: Any, limit: int | None = None, hidden: int | None = None
) -> torch.Tensor | None:
    """``[R, S]`` calibration windows held out from the fit (module docstring): the non-overlapping windows of the
    calibration text that share no token position with a fitting window, evenly spread over each domain's text and
    over the domains, at most ``limit`` (default max(MIN_JUDGE, JUDGE_PER_FIT x the fitting windows): the judge
    forwards cost a few plain forwards of the calibration set, small next to the measuring pass's quantizations; with
    ``hidden`` (the model's H) also at most JUDGE_STATE_BYTES of float32 hidden states, never below MIN_JUDGE);
    None when they cannot be found (the fitting windows are not a seeded calibration draw, or nothing is left: the
    guard then judges on the fitting windows, plan.json says so) or under torchrun (one process decides)."""
    if dist.world() > 1:
        return None
    fit = tokens.input_ids
    S = fit.shape[1]
    n = limit or max(MIN_JUDGE, JUDGE_PER_FIT * fit.shape[0])
    if hidden:
        n = min(n, max(MIN_JUDGE, JUDGE_STATE_BYTES // (4 * S * hidden)))
    try:
        tok = load_tokenizer(tokenizer_path)
        ids = {d: encode_text(tok, t) for d, t in load_texts(tokens.name, "calib").items()}
    except (UserError, OSError, ValueError):
        return None
    starts = fitting_starts(ids, fit, tokens.seed or 0)
    if starts is None:
        return None
    free = {d: [k * S for k in range(len(v) // S) if all(abs(k * S - s) >= S for s in starts[d])]
            for d, v in ids.items()}  # fmt: skip
    quota = {d: 0 for d in free}
    while sum(quota.values()) < n and any(quota[d] < len(free[d]) for d in free):  # equal shares, then what is left
        for d in sorted(free):
            if quota[d] < len(free[d]) and sum(quota.values()) < n:
                quota[d] += 1
    rows = []
    for d in sorted(free):
        if quota[d]:
            pick = torch.linspace(0, len(free[d]) - 1, quota[d]).round().long().tolist()
            rows += [ids[d][free[d][i] : free[d][i] + S] for i in pick]
    return torch.stack(rows).to(fit.dtype) if rows else None


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
        batches run through the block holding them instead (swapped in for those batches only, then back)."""
        judged = ctx.extra.get(JUDGE_EXPERTS) if ctx.is_moe else None
        if judged is None:
            return super().forward(ctx, observers)
        ex, stream, fit = ctx.experts, self.stream, self.fit_batches
        own = ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone()
        state = {"judged": False}

        def use(weights: tuple[torch.Tensor, torch.Tensor], judged_now: bool) -> None:
            ex.gate_up_proj.copy_(weights[0])
            ex.down_proj.copy_(weights[1])
            state["judged"] = judged_now

        def run_layer(layer: torch.nn.Module, i: int) -> torch.Tensor:
            if (i >= fit) != state["judged"]:
                use(judged if i >= fit else own, i >= fit)
            return type(stream).run_layer(stream, layer, i)

        stream.run_layer = run_layer  # type: ignore[method-assign]
        try:
            super().forward(ctx, observers)
        finally:
            del stream.run_layer
            if state["judged"]:
                use(own, False)


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
