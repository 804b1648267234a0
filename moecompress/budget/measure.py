"""The planner's measuring pass: the predicted cost of every option of every routed expert, in one engine pass.

For MoE layer l with calibration tokens T, expert e's routed tokens X_e and router weights p_e(x) (as the block
applies them), f_e the unchanged expert's output; all errors are MoE-block output errors per calibration token,
the unit of quant's err[e, b] (quant/layer.py), so every kind of option is measured on the same scale:

  removal      err_rm[e]       = sum_x ||y_{-e}(x) - y(x)||^2 / T, y_{-e}: the block with e unroutable (its tokens
                                 go to their next choice, weights renormalized; prune.order.route), on <= error_tokens
                                 sampled tokens;
  channel cut  err_cut[e, w]   = sum_{x in X_e} p_e(x)^2 ||f_e^{w}(x) - f_e(x)||^2 / T, f_e^{w}: e's top-w channels
                                 (second moment x |down column|^2) with the down projection refitted as the atom
                                 stage does (atomic.compensate.refit_expert_downs);
  cut + bits   err[e, w, o]    = the same with the cut expert quantized at option o (gate/up bits, down bits;
                                 quant.layer.quantize_layer, GPTQ on the routed tokens' router-weighted Hessians),
                                 against the UNCHANGED expert. At full width it is quantize_layer's own err[e, o]:
                                 the numbers `quantize --plan lp --granularity expert` measures.

KL calibration (probes, as quant's LP plan): a copy of the first calibration batch runs through the model with one
layer changed, and the mean KL of the final distributions is measured: layer l's experts all at b bits
(b in PROBE_WIDTHS, full width), all cut to each narrower width of the menu (unquantized; one probe per width, so
each width has its own calibration), and its cheapest quarter of removable experts removed. ``budget.plan`` turns
these into KL per unit of error for each kind (and cut width).
It changes nothing: the write pass (budget.run) applies the plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..atomic.compensate import Refit, dense_routing, refit_expert_downs
from ..atomic.heapr import top_channels
from ..atomic.transform import channel_moments, current_weights
from ..core.engine import Engine, LayerContext, Transform
from ..core.experts import fused_hidden
from ..core.families import MoEWeights
from ..prune.load import block_view, set_block_experts
from ..prune.order import RouterSpec, outputs_by_token, route
from ..prune.transform import sample_rows
from ..quant.layer import GPTQOptions, Width, quantize_layer, split_width
from ..quant.plan import PROBE_WIDTHS
from ..quant.rtn import dequantize
from ..quant.transform import capture_layer, probe_kl, scale_dtype_for, weight_dtype_of
from .options import FRACTIONS, PAIRS, cut_width

PROBE_CUT = "cut"
PROBE_REMOVE = "remove"


def cut_key(width: int) -> str:
    """The probe key of a layer's experts all cut to ``width`` channels."""
    return f"{PROBE_CUT}{width}"


def removal_errors(x: torch.Tensor, w: MoEWeights, spec: RouterSpec, act: Any, chunk: int = 512) -> torch.Tensor:
    """err_rm [E] (module docstring) on tokens x [T, H], float64."""
    E = w.gate.shape[0]
    T = x.shape[0]
    err = torch.zeros(E, dtype=torch.float64)
    for s in range(0, T, chunk):
        xs = x[s : s + chunk].float()
        logits = xs @ w.router.float().T + (w.router_bias.float() if w.router_bias is not None else 0.0)
        outs = outputs_by_token(xs, w.gate, w.up, w.down, act)  # [c, E, H]
        w0, i0 = route(logits, spec, None, w.correction_bias)
        y0 = (outs.gather(1, i0[:, :, None].expand(-1, -1, outs.shape[-1])) * w0[:, :, None]).sum(1)
        for e in range(E):
            rows = (i0 == e).any(1) if spec.kind == "softmax" else torch.ones(xs.shape[0], dtype=torch.bool)
            if not bool(rows.any()):
                continue
            removed = torch.zeros(E, dtype=torch.bool)
            removed[e] = True
            w1, i1 = route(logits[rows], spec, removed, w.correction_bias)
            o = outs[rows]
            y1 = (o.gather(1, i1[:, :, None].expand(-1, -1, o.shape[-1])) * w1[:, :, None]).sum(1)
            err[e] += (y1 - y0[rows]).double().pow(2).sum()
    return err / max(T, 1)


def channel_scores(x: torch.Tensor, w: MoEWeights, spec: RouterSpec, act: Any) -> torch.Tensor:
    """[E, I] channel importance: routed second moment m_{e,j} x ||down column j||^2 (the channel's output energy)."""
    logits = x @ w.router.T + (w.router_bias if w.router_bias is not None else 0.0)
    m = channel_moments(x, dense_routing(logits, spec, w.correction_bias), w, act)
    return m * w.down.double().pow(2).sum(1)


class BudgetMeasure(Transform):
    """Measure every option of every routed expert (module docstring). Results by layer: ``err [E, W, O]`` (O:
    ``options``, quantize's per-projection menu by default), ``err_cut [E, W]``, ``err_rm [E]``, ``counts``,
    ``max_abs``, ``used`` (GPTQ or RTN per expert), ``keep`` (kept channels [E, w] per cut width), ``widths``;
    after the pass, ``probe_kl(engine)``: {(layer, probe): KL}, probe = bits, ``cut_key(width)`` or
    "remove"."""

    name = "budget"
    changes_block = False

    def __init__(
        self,
        spec: RouterSpec,
        *,
        fractions: tuple[float, ...] = FRACTIONS,
        options: tuple[Width, ...] = PAIRS,
        method: str = "gptq",
        min_tokens: int = 32,
        error_tokens: int = 4096,
        refit: Refit | None = None,
        protected: dict[int, set[int]] | None = None,
        probes: bool = True,
    ):
        self.spec, self.fractions, self.options, self.method = spec, tuple(fractions), tuple(options), method
        self.min_tokens, self.error_tokens = min_tokens, error_tokens
        self.refit = refit or Refit()
        self.protected = protected or {}
        self.probes = probes
        self.final: torch.Tensor | None = None  # set by budget.run.measure_budget: the source's last hidden states
        self.judge: torch.Tensor | None = None  # and the guard's held-out judge windows [R, S] (budget/check.py)
        self.opts = GPTQOptions()
        self.err: dict[int, np.ndarray] = {}
        self.err_cut: dict[int, np.ndarray] = {}
        self.err_rm: dict[int, np.ndarray] = {}
        self.counts: dict[int, np.ndarray] = {}
        self.max_abs: dict[int, np.ndarray] = {}
        self.used: dict[int, list[str]] = {}
        self.keep: dict[int, dict[int, torch.Tensor]] = {}  # layer -> width -> kept channels [E, width]
        self.widths: dict[int, list[int]] = {}
        self.removal_probe: dict[int, list[int]] = {}  # layer -> experts removed by its removal probe
        self._probe: dict[Any, MoEWeights] = {}
        self._base: torch.Tensor | None = None
        self._states: dict[tuple[int, Any], torch.Tensor] = {}

    def start(self, engine: Engine) -> None:
        self.scale_dtype = scale_dtype_for(engine.ckpt.config)
        self.weight_dtype = weight_dtype_of(engine)
        if self.probes and len(engine.cache):
            self._base = engine.cache[0].to(engine.device).clone()

    @torch.no_grad()
    def moe_layer(self, ctx: LayerContext) -> None:
        l, act = ctx.index, ctx.experts.act_fn
        w = current_weights(ctx)  # float32 CPU copies
        E, I, H = w.gate.shape
        cap = capture_layer(ctx, False, self.opts.weighted)
        x = sample_rows([t.cpu() for t in ctx.inputs], self.error_tokens).float()  # [T_s, H]
        self.err_rm[l] = removal_errors(x, w, self.spec, act).numpy()
        scores = channel_scores(x, w, self.spec, act)
        fit = x[:: max(1, x.shape[0] // self.refit.fit_tokens)][: self.refit.fit_tokens]
        logits = fit @ w.router.T + (w.router_bias if w.router_bias is not None else 0.0)
        routing = dense_routing(logits, self.spec, w.correction_bias)
        widths = sorted({cut_width(I, f) for f in self.fractions}, reverse=True)
        O, Wn = len(self.options), len(widths)
        err = np.zeros((E, Wn, O))
        err_cut = np.zeros((E, Wn))
        routed = [tuple(t.cpu().float() for t in cap.routed(e)) for e in range(E)]  # the weights' device (CPU)
        refs = [torch.nn.functional.linear(fused_hidden(xe, torch.cat([w.gate[e], w.up[e]]), act), w.down[e])
                for e, (xe, _) in enumerate(routed)]  # fmt: skip
        self.keep[l] = {}
        probe_q: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cut_probes: dict[int, MoEWeights] = {}
        pairs = [split_width(o) for o in self.options]
        T = max(cap.tokens, 1)
        for wi, width in enumerate(widths):
            if width == I:
                gate, up, down = w.gate, w.up, w.down
            else:
                keep = top_channels(scores, width)  # [E, width]
                self.keep[l][width] = keep
                gate = torch.stack([w.gate[e][keep[e]] for e in range(E)])
                up = torch.stack([w.up[e][keep[e]] for e in range(E)])
                downs = refit_expert_downs(fit, routing, w, list(keep), act, self.refit.ridge, self.refit.holdout)
                down = torch.stack([d.float() for d in downs])  # [E, H, width]
                if self._base is not None:
                    cut_probes[width] = _padded(w, keep, gate, up, down)
            gu = torch.cat([gate, up], dim=1)  # [E, 2w, H]
            full = width == I  # quantize_layer's own error against the unchanged expert: quant's LP numbers
            codes, used, q_err = quantize_layer(
                gu, down, act, self.options, self.method, cap, self.min_tokens, self.scale_dtype, self.weight_dtype,
                self.opts, full,
            )  # fmt: skip
            if full:
                assert q_err is not None
                full_err, full_wi = q_err.numpy(), wi  # already per calibration token
                self.used[l] = used
            for e in range(E):
                xe, pe = routed[e]
                if xe.shape[0] == 0 or full:
                    continue
                p2 = pe.double().pow(2)
                f = torch.nn.functional.linear(fused_hidden(xe, gu[e], act), down[e])
                err_cut[e, wi] = float((p2 * (f - refs[e]).double().pow(2).sum(-1)).sum())
                hidden_q: dict[int, torch.Tensor] = {}  # the quantized gate/up's hidden, once per gate/up width
                for oi, o in enumerate(self.options):
                    qe, (bg, _) = codes[o], pairs[oi]
                    if bg not in hidden_q:
                        gq = dequantize(qe.gate_up_q[e], qe.gate_up_s[e], qe.g_h, self.weight_dtype).float()
                        hidden_q[bg] = fused_hidden(xe, gq, act)
                    dq = dequantize(qe.down_q[e], qe.down_s[e], qe.g_i, self.weight_dtype).float()
                    f = torch.nn.functional.linear(hidden_q[bg], dq)
                    err[e, wi, oi] = float((p2 * (f - refs[e]).double().pow(2).sum(-1)).sum())
            if full and self._base is not None:
                for b in PROBE_WIDTHS:
                    o = next((o for o in self.options if split_width(o) == (b, b)), None)
                    if o is not None:
                        probe_q[b] = codes[o].dequantized(torch.float32)
        err /= T
        err[:, full_wi] = full_err
        self.err[l], self.err_cut[l] = err, err_cut / T
        self.counts[l], self.max_abs[l] = cap.counts.numpy(), cap.max_abs.numpy()
        self.widths[l] = widths
        if self._base is not None:
            self._probe = {b: MoEWeights(gq[:, :I], gq[:, I:], dq, w.router, w.router_bias, w.correction_bias)
                           for b, (gq, dq) in probe_q.items()}  # fmt: skip
            for width, pw in cut_probes.items():
                self._probe[cut_key(width)] = pw
            removed = self._removal_probe(l, E)
            if removed:
                self.removal_probe[l] = removed
                self._probe[PROBE_REMOVE] = w.select([e for e in range(E) if e not in removed])

    def _removal_probe(self, l: int, E: int) -> list[int]:
        """The cheapest quarter of the removable experts (equal per group for group routers)."""
        spec, prot = self.spec, self.protected.get(l, set())
        g = max(spec.n_group, 1)
        n = min(max(E // 4, 1), E - spec.min_keep())
        n -= n % g
        if n <= 0:
            return []
        order = [e for e in np.argsort(self.err_rm[l], kind="stable").tolist() if e not in prot]
        if g == 1:
            return sorted(order[:n])
        per = E // g
        out = []
        for grp in range(g):
            members = [e for e in order if e // per == grp]
            if len(members) < n // g:
                return []
            out += members[: n // g]
        return sorted(out)

    @torch.no_grad()
    def probe_layer(self, ctx: LayerContext) -> None:
        """``emit`` of the measuring pass: the probe batch and its copies go through this layer; for a MoE layer,
        new copies start with the layer changed as each probe says."""
        if self._base is None:
            return
        kwargs = ctx.engine.stream.layer_kwargs(ctx.index, 0)

        def run(h: torch.Tensor) -> torch.Tensor:
            out = ctx.layer(h, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        new = {}
        if ctx.is_moe and self._probe:
            fam, dev = ctx.engine.fam, ctx.engine.device
            orig = block_view(ctx.block, fam)
            orig = _mapped(orig, lambda t: t.clone())
            for key, pw in self._probe.items():
                set_block_experts(ctx.block, fam, _mapped(pw, lambda t: t.to(dev, orig.gate.dtype)), ctx.index)
                new[(ctx.index, key)] = run(self._base)
            set_block_experts(ctx.block, fam, orig, ctx.index)
            self._probe = {}
        self._base = run(self._base)
        self._states = {k: run(h) for k, h in self._states.items()}
        self._states.update(new)

    def probe_kl(self, engine: Engine) -> dict[tuple[int, Any], float]:
        """Mean per-token KL(base || probe) of the final distributions (after the pass)."""
        if self._base is None:
            return {}
        return probe_kl(self._base, self._states, engine.stream.head)


def _mapped(w: MoEWeights, fn: Any) -> MoEWeights:
    return MoEWeights(*(None if t is None else fn(t) for t in (
        w.gate, w.up, w.down, w.router, w.router_bias, w.correction_bias)))  # fmt: skip


def _padded(w: MoEWeights, keep: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> MoEWeights:
    """The cut layer at the source width: dropped channels have zero gate, up and down (computes the same)."""
    E, I, H = w.gate.shape
    g, u, d = torch.zeros(E, I, H), torch.zeros(E, I, H), torch.zeros(E, H, I)
    for e in range(E):
        g[e, keep[e]], u[e, keep[e]], d[e][:, keep[e]] = gate[e], up[e], down[e]
    return MoEWeights(g, u, d, w.router, w.router_bias, w.correction_bias)
