"""Expert pruning as an engine transform: each MoE layer loses its weakest routed experts when the pass reaches it.

    t = PruneTransform(spec, num_experts, PruneOptions(ratio=0.25), protected)        # output-error, sequential
    t = PruneTransform(spec, num_experts, PruneOptions(0.25, method="reap"), protected, scores=scores)
    engine.run([t, QuantTransform(...)], emit=out.add_layer)

Per MoE layer ``moe_layer`` works on the block as the earlier stages left it (``ctx.block``, fp32): it takes every
step-th of the layer's MoE inputs (at most ``error_tokens``), orders the experts (output error on those inputs, or
the profile scores given to the constructor), keeps the block's experts that survive (router rows, biases and the
correction bias follow, renumbered 0..k-1), optionally refits the kept router rows and down projections, and calls
``ctx.replace`` with the layer's routed-expert and router tensors in the checkpoint's dtypes. The engine's forward
then runs the pruned layer, so the next layer is ordered (and refitted) on the pruned earlier layers.

When the experts are chosen: ``uniform`` output-error (the default) decides layer by layer in the same pass;
score methods decide before the pass (``scores``); the ``per-layer`` layout (and ``sequential=False``) ranks every
layer's steps globally, so it first needs a measuring pass (``measure=True``, which prunes nothing and only records
``orders``) and then a second transform built with those ``orders``. A transform that needs no inputs (orders
known, no refit) only slices weights: run it on an engine over zero windows and the pass does no compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..core.engine import Engine, LayerContext, Transform
from ..core.limits import memory_limit
from ..core.memprobe import probe
from ..core.stream import release_freed
from .load import _is_half, block_view, kept_gate_up, select_experts, set_block_experts
from .order import (
    ExpertOutputs,
    RouterSpec,
    Step,
    cache_slots,
    kept_global,
    kept_uniform,
    layer_output,
    method_scores,
    output_error_order,
    removal_count,
    rescaled,
    route,
    router_choice,
    score_order,
)
from .refit import HOLDOUT, MIN_ROWS, dense_weights, fit_downs, refit_router, refits_any

if TYPE_CHECKING:
    from ..core.job import Job

METHODS = ("reap", "frequency", "routing-mass", "random", "output-error")
LAYOUTS = ("uniform", "per-layer")
REFITS = ("none", "router", "down", "router+down")
DEFAULT_METHOD = "output-error"  # lowest KL at 25% and 50% on the built-in model (reports/prune_bench.md)
# with output error, the kept experts' down projections are refitted by default (issue 14 section 4): KL -19% / -42%
# at 25% / 50% on the built-in model, -21% / -25% on the dense-carved stories260k (reports/prune_bench.refit*.md).
# The score methods keep "none": they use the model's own routing and work on every family, a refit does not.
DEFAULT_REFIT = "down"


def default_refit(method: str) -> str:
    """The refit a method gets when none is asked for: ``down`` after output error (it models the routing already),
    ``none`` after the score methods."""
    return DEFAULT_REFIT if method == "output-error" else "none"


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class PruneOptions:
    """Everything that decides an expert pruning (recorded in moecompress.json)."""

    ratio: float
    method: str = DEFAULT_METHOD
    layout: str = "uniform"
    protect_super: bool = True
    seed: int = 0
    error_tokens: int = 4096  # output-error: calibration tokens per layer the greedy search measures on
    error_scale: str = "residual"  # output-error costs relative to: residual (stream energy) | output (routed)
    sequential: bool = True  # output-error, uniform: measure each layer on the already-pruned earlier layers
    refit: str | None = None  # after removal, refit: none | router | down | router+down (None: default_refit(method))
    refit_min_rows: float = MIN_ROWS  # down refit: fit tokens per channel of width an expert needs to be refitted
    refit_holdout: int = HOLDOUT  # down refit: every n-th token checks each expert's refit (0: no check)

    def __post_init__(self) -> None:
        if self.refit is None:
            object.__setattr__(self, "refit", default_refit(self.method))

    def validate(self) -> None:
        """ValueError naming the option (as the CLI flag without its dashes) that is out of range."""
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio {self.ratio} must be between 0 and 1 (the fraction of routed experts removed)")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)} for expert pruning")
        if self.refit not in REFITS:
            raise ValueError(f"refit {self.refit!r} is not one of {', '.join(REFITS)}")
        if self.refit_min_rows < 0:
            raise ValueError(f"refit-min-rows {self.refit_min_rows} must be at least 0")
        if self.refit_holdout < 0:
            raise ValueError(f"refit-holdout {self.refit_holdout} must be at least 0 (0: no check)")
        if self.error_tokens < 1:
            raise ValueError(f"error-tokens {self.error_tokens} must be at least 1")

    @property
    def decides_in_pass(self) -> bool:
        """The experts are chosen layer by layer during the pruning pass (uniform sequential output error)."""
        return self.method == "output-error" and self.layout == "uniform" and self.sequential


def _sampled(offset: int, n: int, step: int, limit: int) -> torch.Tensor:
    """Positions inside a batch of n tokens starting at global token ``offset`` that are sampled: global positions
    0, step, 2 step, ... (at most ``limit`` of them)."""
    first = (-offset) % step
    pos = torch.arange(first, n, step)
    return pos[: max(0, limit - (offset + first) // step)]


def sample_rows(batches: list[torch.Tensor], limit: int) -> torch.Tensor:
    """Every step-th row (step = total // limit, at most ``limit`` rows) of per-batch rows [T_b, H] -> [T, H]."""
    step = max(1, sum(int(b.shape[0]) for b in batches) // limit)
    out, offset = [], 0
    for b in batches:
        out.append(b[_sampled(offset, b.shape[0], step, limit).to(b.device)].clone())
        offset += b.shape[0]
    return torch.cat(out)


def _sq_sum(t: torch.Tensor) -> float:
    """``float(t.double().pow(2).sum())`` with one float64 temporary of at most SQ_ERROR_BLOCK_BYTES (``_sq_error``
    against nothing): one [T, H] float64 copy of the layer's reference output was 235 MB at DeepSeek-V3 dims."""
    return _sq_error(t, None)


SQ_ERROR_BLOCK_BYTES = 64 * 2**20  # float64 rows _sq_error makes at a time


def _sq_error(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """``float((a.double() - b.double()).pow(2).sum())`` (``b`` None: of ``a``) with one float64 temporary of at most
    SQ_ERROR_BLOCK_BYTES: bit for bit up to that size, past it the blocks' sums are added (the same value to ~1e-15
    relative; errors are reported rounded to 6 digits, and the layer's reference energy scales all its candidates
    alike). One [T, H] float64 temporary was 235 MB at the peak of the DeepSeek-V3-dims slice's default prune (four
    of them were 270 MB at the 30B-shaped layer's)."""

    def part(x: torch.Tensor, y: torch.Tensor | None) -> float:
        d = x.to(torch.float64, copy=True)
        return float((d if y is None else d.sub_(y)).pow_(2).sum())

    if a.dim() == 0 or 8 * a.numel() <= SQ_ERROR_BLOCK_BYTES:
        return part(a, b)
    rows = max(1, SQ_ERROR_BLOCK_BYTES // (8 * a[0].numel()))
    return float(sum(part(a[i : i + rows], None if b is None else b[i : i + rows]) for i in range(0, a.shape[0], rows)))


def _boxed(view: Any) -> list[Any]:
    return [view]


def protected_experts(profile: Any, layers: list[int], protect_super: bool = True) -> dict[int, set[int]]:
    """Per MoE layer, the experts never removed: the profile's super experts (none without ``protect_super``)."""
    supers = {(int(l), int(e)) for l, e in profile.super_experts} if protect_super and profile is not None else set()
    return {l: {e for ll, e in supers if ll == l} for l in layers}


class PruneTransform(Transform):
    """Drop ``removal_count(num_experts, opts.ratio)`` routed experts of every MoE layer (see the module docstring).

    Args:
        spec: the router's semantics (``RouterSpec.from_config``); num_experts: the experts each MoE block has
        when this stage reaches it; protected: per layer, experts never removed (indices of that block);
        scores: per layer [E] importance (``order.method_scores`` of a profile) for the score methods;
        orders: per layer removal orders from a measuring pass (the per-layer layout); measure: only order
        the experts (on the unpruned layers) and record ``orders``, pruning nothing.
    After the pass: ``kept`` (per layer, ascending), ``orders`` (costs on the scale ``opts.error_scale`` says),
    ``refit_errors`` (per layer, relative to the unpruned layer's ||y||^2), ``notes`` (e.g. group rounding)."""

    name = "prune"

    reads_narrow = True  # weights upcast per expert where read (core/stream.py); refitted downs are held in float32

    def __init__(
        self,
        spec: RouterSpec,
        num_experts: int,
        opts: PruneOptions,
        protected: dict[int, set[int]] | None = None,
        scores: dict[int, torch.Tensor] | None = None,
        orders: dict[int, list[Step]] | None = None,
        measure: bool = False,
    ):
        opts.validate()
        self.spec, self.E, self.opts, self.measure = spec, num_experts, opts, measure
        self.protected = protected or {}
        self.n, note = removal_count(num_experts, opts.ratio, spec)
        self.notes = [note] if note else []
        self.max_remove = self.n if opts.layout == "uniform" else num_experts - spec.min_keep()
        self.scores = scores or {}
        if opts.method != "output-error" and scores is None and orders is None:
            raise ValueError(f"method {opts.method!r} orders experts by profile scores: pass scores")
        if scores is not None:
            orders = {l: score_order(s, self.protected.get(l, set()), spec.n_group) for l, s in scores.items()}
        self.orders: dict[int, list[Step]] = dict(orders or {})
        self.kept: dict[int, list[int]] = {}
        if orders is not None and not measure:
            self.kept = self._select(self.orders)
        self.wants_inputs = measure or opts.refit != "none" or orders is None
        self.refit_errors: dict[int, dict[str, float]] = {}
        self._pending: tuple[list[Step] | None, float, torch.Tensor | None, torch.Tensor | None] | None = None
        self._fam: Any = None
        self._dtypes: dict[str, str] = {}

    @classmethod
    def from_profile(
        cls, spec: RouterSpec, num_experts: int, opts: PruneOptions, profile: Any, layers: list[int],
        orders: dict[int, list[Step]] | None = None,
    ) -> PruneTransform:  # fmt: skip
        """The transform ``opts`` asks for, protecting ``profile``'s super experts (unless ``protect_super`` is off):
        score methods order by the profile's scores; output error decides in the pass, or from ``orders`` of a
        measuring pass (per-layer layout, ``sequential=False``). ``profile`` may be None for output error."""
        protected = protected_experts(profile, layers, opts.protect_super)
        if opts.method != "output-error":
            if profile is None:
                raise ValueError(f"method {opts.method!r} orders experts by profile scores: give a profile")
            scores = {l: method_scores(profile, l, opts.method, opts.seed) for l in layers}
            return cls(spec, num_experts, opts, protected, scores=scores)
        return cls(spec, num_experts, opts, protected, orders=orders)

    @property
    def layout(self) -> str:
        """The output's layout: uniform (transformers loads it) or per-layer (``moecompress.load``)."""
        return self.opts.layout

    def _select(self, orders: dict[int, list[Step]]) -> dict[int, list[int]]:
        if self.opts.layout == "uniform":
            return kept_uniform(orders, self.n, self.E)
        return kept_global(orders, self.n * len(orders), self.E, self.spec.min_keep())

    def start(self, engine: Engine) -> None:
        self._fam = engine.fam
        self._dtypes = {k: v["dtype"] for k, v in engine.ckpt.tensor_info().items()}

    @torch.no_grad()
    def moe_layer(self, ctx: LayerContext) -> None:
        l, fam, spec, opts = ctx.index, ctx.engine.fam, self.spec, self.opts
        E = ctx.experts.down_proj.shape[0]
        if E != self.E:
            raise ValueError(
                f"layer {l} has {E} routed experts when pruning reaches it; the transform expects {self.E}"
            )
        view = block_view(ctx.block, fam)
        if not self.wants_inputs:  # chosen before the pass, nothing to refit: slice the block
            self._apply(ctx, _boxed(view), self.kept[l])
            return
        probe(f"prune {l}: inputs")
        x = sample_rows(ctx.inputs, opts.error_tokens)  # [T, H]
        sizes = [int(t.shape[0]) for t in ctx.inputs]
        if x.shape[0] == sum(sizes) and all(t.dtype == x.dtype and t.device == x.device for t in ctx.inputs):
            # every input row was sampled (the default 4,096 error tokens of 16 x 256 calibration tokens): x is their
            # copy, so the inputs become views of it (the same values; one [T, H] fewer: 117 MB at DeepSeek-V3 dims)
            ctx.inputs = list(x.split(sizes))
        logits = x.float() @ view.router.float().T  # [T, E]
        if view.router_bias is not None:
            logits = logits + view.router_bias.float()
        corr = view.correction_bias
        # each token's best k+4 expert outputs (k+2 missed often enough that the misses, computed a few rows at a
        # time, cost more than the extra upfront rows: E128 prune pass 13.0 -> 11.6-12.3 CPU s, same order and costs;
        # with the down refit 21.8 -> 20.4-21.3 CPU s); more are computed when asked for, into removed experts' slots
        # (bounded: k+4 slots of T x (H [+ I]) float32 each may exceed the layer itself, see ``cache_slots``)
        hidden = "down" in opts.refit
        slot_bytes = x.shape[0] * (view.down.shape[1] + (view.down.shape[2] if hidden else 0)) * 4
        layer_bytes = sum(t.numel() * t.element_size() for t in (view.gate, view.up, view.down))
        c = cache_slots(spec.top_k + 4, slot_bytes, layer_bytes, memory_limit())
        src = ExpertOutputs(x, view.gate, view.up, view.down, router_choice(logits, spec, corr), c,
                            ctx.experts.act_fn, hidden=hidden)  # fmt: skip
        probe(f"prune {l}: cache filled")
        y0 = layer_output(src, *route(logits, spec, None, corr))  # [T, H] the unpruned routed output
        y0sq = max(_sq_sum(y0), 1e-30)
        order = None
        if l not in self.kept:
            protected = self.protected.get(l, set())
            order = output_error_order(src, logits, spec, protected, self.max_remove, corr, y0sq, y0)
        probe(f"prune {l}: searched")
        if self.measure:
            self._pending = (order, y0sq, None, None)
            return
        keep = self.kept[l] = kept_uniform({l: order}, self.n, E)[l] if order is not None else self.kept[l]
        removed = torch.ones(E, dtype=torch.bool, device=x.device)
        removed[keep] = False
        downs = None
        selected = False
        if opts.refit != "none":
            box = _boxed(view)
            del view  # (_refit may prune the block before the down refit: then this was the unpruned one's last holder)
            view, downs, stats, y_p, selected = self._refit(ctx, src, x, box, removed, keep, y0, y0sq)
            self.refit_errors[l] = {k: round(v, 6) for k, v in stats.items()}
        else:
            y_p = layer_output(src, *route(logits, spec, removed, corr))
        probe(f"prune {l}: refitted")
        del src  # the cached expert outputs ([T, c, H]) go before the kept experts are copied
        box = _boxed(view)
        del view  # _apply holds the only reference: the unpruned block is freed once the pruned one replaces it
        self._apply(ctx, box, keep, downs, selected)
        self._pending = (order, y0sq, y0, y_p) if order is not None else None
        probe(f"prune {l}: applied")

    def _refit(
        self, ctx: LayerContext, src: ExpertOutputs, x: torch.Tensor, box: list[Any], removed: torch.Tensor,
        keep: list[int], y0: torch.Tensor, y0sq: float,
    ) -> tuple[Any, torch.Tensor | None, dict[str, float], torch.Tensor, bool]:  # fmt: skip
        """The kept experts' router rows and/or down projections refitted to the unpruned routed output y0; returns
        the view with the refitted router, the kept experts' refitted down projections ([k, H, I] float32, in the
        order of ``keep``; None without a down refit), the relative errors before/after, and the refitted layer's
        routed output on x [T, H] (from the cached expert outputs and activations: no expert is evaluated again), and
        whether the returned view is already the block's pruned one (``box`` holds the block's view, taken here).

        Before the down refit the block is pruned to the kept experts (``_prune_block``): the refit reads only theirs,
        and the removed experts' weights (half the layer at ratio 0.5: 0.7 GB of bf16 at DeepSeek-V3 dims) are freed
        before its float32 downs and temporaries are made."""
        view = box.pop()
        spec, corr = self.spec, view.correction_bias
        for e in removed.nonzero().squeeze(1).tolist():
            src.release(e)  # their slots can hold the outputs the kept experts' routing moves to
        release_freed()  # (the search's temporaries, freed into the C heap)
        rows, bias = view.router, view.router_bias
        stats: dict[str, float] = {}
        if "router" in self.opts.refit:
            rows, bias, e0, e1 = refit_router(src, x, rows, bias, spec, removed, y0, corr)
            view = replace(view, router=rows, router_bias=bias)
            stats = {"error_before": e0 / y0sq, "error_after_router": e1 / y0sq}
        lg = x.float() @ rows.float().T + (bias.float() if bias is not None else 0.0)
        w_p, idx_p = route(lg, spec, removed, corr)
        y_p = layer_output(src, w_p, idx_p)
        probe("prune: pruned output")
        stats.setdefault("error_before", _sq_error(y_p, y0) / y0sq)
        downs = None
        if "down" in self.opts.refit:
            src.hidden_only()  # the cached outputs are done with: fit_downs reads activations only
            release_freed()
            probe("prune: cached outputs freed")
            w_dense = dense_weights(w_p, idx_p, self.E)
            # when fit_downs would refit no kept expert (too few tokens for every guard), its float32 copy of the
            # kept downs ([k, H, I]: 400 MB on a Qwen3-30B layer) is not made; the output is the same (the synthetic
            # 30B-shaped layer at the default --error-tokens does refit: some kept experts pass the guard)
            if refits_any(w_dense, keep, view.down.shape[2], self.opts.refit_min_rows):
                # fit_downs' own first step, y0 - y_p, formed in y_p's storage when it is a float32 tensor of its
                # own ((-y_p) + y0 is y0 - y_p bit for bit): y_p is not held through the fit, and no third [T, H]
                # float32 tensor meets the kept experts' copy (DeepSeek-V3 dims, 4,096 tokens: 117 MB at the peak)
                resid = y_p.float()
                resid = (resid.neg_() if resid is not y_p or y_p._base is None else -resid).add_(y0.float())
                del y_p
                box.append(view)
                del view
                view = self._prune_block(ctx, src, box, keep)
                probe("prune: down refit")
                downs, y_p = fit_downs(
                    lambda j, r: src.hidden_of(keep[j], r),
                    view.down,
                    list(range(len(keep))),
                    w_dense[:, keep],
                    y0,
                    None,
                    kept_only=True,
                    holdout=self.opts.refit_holdout,
                    min_rows=self.opts.refit_min_rows,
                    resid=resid,
                )
                del resid
                stats["error_after_down"] = _sq_error(y_p, y0) / y0sq
                return view, downs, stats, y_p, True
            y_p = y0.float() - (y0.float() - y_p.float())  # what fit_downs returns when it refits nothing
            stats["error_after_down"] = _sq_error(y_p, y0) / y0sq
        return view, downs, stats, y_p, False

    def _prune_block(self, ctx: LayerContext, src: ExpertOutputs, box: list[Any], keep: list[int]) -> Any:
        """Prune the block to experts ``keep`` of the view in ``box`` (its only holder, emptied here) as ``_apply``
        does, and point ``src``'s expert weights at the kept copies (the same values): the unpruned tensors are
        freed. Returns the block's new view (k experts, in the order of ``keep``)."""
        view = box.pop()
        experts, fam = ctx.experts, ctx.engine.fam
        gu = getattr(experts, "gate_up_proj", None)
        gate_up = None
        if not fam.gateless and gu is not None and _is_half(view.gate, gu.data, 0) and _is_half(view.up, gu.data, 1):
            # in two steps: the kept gate/up rows first, which the block and src then read, so the unpruned gate_up
            # is freed before the kept downs are copied (the unpruned layer and all of the kept copy never coexist)
            gate_up = kept_gate_up(view, keep)
            experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
            I = gate_up.shape[1] // 2
            src.gate = src.up = None  # (no expert is evaluated until keep_only below points them at the kept rows)
            view = replace(view, gate=gate_up[:, :I], up=gate_up[:, I:])
            del gu
            probe("prune: kept gate/up copied")
        sel, gate_up = select_experts(view, keep, gate_up)
        probe("prune: kept experts selected")
        del view
        set_block_experts(ctx.block, fam, sel, ctx.index, gate_up=gate_up)
        src.keep_only(keep, sel.gate, sel.up, sel.down)
        return sel

    def _apply(
        self, ctx: LayerContext, box: list[Any], keep: list[int], downs: torch.Tensor | None = None,
        selected: bool = False,
    ) -> None:  # fmt: skip
        """Leave the block pruned to experts ``keep`` of the view in ``box`` (a one-item list, emptied here: the
        block's view, maybe refitted, whose only reference this is, so that the unpruned tensors are freed before the
        written ones are made: 200 MB less at the 30B-shaped layer's peak; one copy of the
        kept experts, which the block holds and the written tensors view) and write its routed experts and router
        in the checkpoint's dtypes; ``downs`` [k, H, I]: the kept experts' refitted down projections (held as they
        are, float32). ``ctx.extra["expert_ids"]`` names each kept expert's source expert for the stages after
        this one. ``selected``: the view is the block's already pruned to ``keep`` (``_prune_block``), in its order."""
        l, fam = ctx.index, ctx.engine.fam
        view = box.pop()
        source = ctx.extra.get("expert_ids", list(range(self.E)))
        ctx.extra["expert_ids"] = [source[e] for e in keep]
        if downs is not None:
            view = replace(view, down=None)
            # the block takes the refitted downs now: its unpruned ones go before the kept gate/up rows are copied
            # (the 30B-shaped layer: 403 MB of bf16 less at the prune's peak); set_block_experts sets them again
            ctx.experts.down_proj = torch.nn.Parameter(downs, requires_grad=False)
        if selected:
            sel, gate_up = view, ctx.experts.gate_up_proj.data  # (its gate and up are this tensor's halves)
        else:
            sel, gate_up = select_experts(view, keep)
        if downs is not None:
            sel = replace(sel, down=downs)
        del view
        set_block_experts(ctx.block, fam, sel, l, gate_up=gate_up)
        fallback = self._dtypes.get(fam.router_key(l), "F32")
        tensors = fam.write_layer(sel, l)
        ctx.replace({k: t.to("cpu", _DTYPES[self._dtypes.get(k, fallback)]) for k, t in tensors.items()})

    @torch.no_grad()
    def layer_done(self, ctx: LayerContext) -> None:
        """Scale the layer's order costs by its residual stream's energy on the sampled tokens (layers compare)."""
        probe(f"prune {ctx.index}: forward done")
        if self._pending is None:
            return
        order, y0sq, y0, y_p = self._pending
        self._pending = None
        if order is None:
            return
        cache = ctx.engine.cache
        D = y0.shape[-1] if y0 is not None else cache[0].shape[-1]
        # per token [T_b, D]; hyper-connection layers (HY-V4, Qwen4-Exp) carry hc residual streams ([B, S, hc, D] or
        # [B, S, hc D]): their sum stands for the residual the block's output joins (an energy scale only)
        tok = [
            c.reshape(-1, D) if c.dim() <= 3 and c.shape[-1] == D else c.reshape(c.shape[0] * c.shape[1], -1, D).sum(1)
            for c in (cache[i] for i in range(len(cache)))
        ]
        r = sample_rows(tok, self.opts.error_tokens)
        if y0 is not None:  # the unpruned layer's output on the same tokens: r = r_p + y - y_p
            r = r.float() + y0 - y_p
        energy = max(_sq_sum(r), 1e-30)
        self.orders[ctx.index] = rescaled(order, y0sq / energy if self.opts.error_scale == "residual" else 1.0)

    def config(self, cfg: dict[str, Any]) -> None:
        if self.kept:
            cfg.update(self._fam.expert_count_updates(max(len(k) for k in self.kept.values())))
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "mxfp4" and self.kept:
            del cfg["quantization_config"]  # the routed experts (its only MXFP4 tensors) are written dequantized

    def section(self) -> dict[str, Any]:
        opts, E = self.opts, self.E
        counts = {l: len(k) for l, k in self.kept.items()}
        layers: dict[str, Any] = {}
        for l in sorted(self.kept):
            info: dict[str, Any] = {
                "kept": self.kept[l],
                "removed": [e for e in range(E) if e not in set(self.kept[l])],
                "old_to_new": {str(e): i for i, e in enumerate(self.kept[l])},
                "num_experts": counts[l],
                "removal_order": [list(s.experts) for s in self.orders.get(l, [])],
                "removal_costs": [round(s.cost, 8) for s in self.orders.get(l, [])],
            }
            if self.scores:
                info["scores"] = [round(float(v), 8) for v in self.scores[l]]
            layers[str(l)] = info
        protected = sorted([l, e] for l, es in self.protected.items() for e in es)
        why: list[dict[str, Any]] = [{"layer": l, "expert": e, "why": "super"} for l, e in protected]
        if self._fam is not None and self._fam.shared:
            why += [{"layer": l, "module": self._fam.shared, "why": "shared"} for l in sorted(self.kept)]
        seq = "pruned earlier layers (sequential)"
        return {
            "granularity": "expert",
            "method": opts.method,
            "ratio": opts.ratio,
            "options": asdict(opts),
            "experts_before": E,
            "experts_after": (max(counts.values()) if counts else E) if opts.layout == "per-layer" else E - self.n,
            "experts_removed_total": sum(E - c for c in counts.values()),
            "top_k": self.spec.top_k,
            "n_group": self.spec.n_group,
            "protected": protected,
            "protected_why": why,
            "chosen": "layer by layer in the pruning pass"
            if opts.decides_in_pass
            else "before the pruning pass, from profile scores"
            if opts.method != "output-error"
            else "before the pruning pass, from a measuring pass over the unpruned model (global ranking)",
            "refit": opts.refit,
            "refit_inputs": None if opts.refit == "none" else seq,
            "refit_layer_errors": {str(l): v for l, v in sorted(self.refit_errors.items())},
            "output_error_inputs": None
            if opts.method != "output-error"
            else seq
            if opts.decides_in_pass
            else "unpruned model",
            "layers": layers,
            "warnings": list(self.notes),
        }


def transform_for_recipe(job: Job, options: dict[str, Any], profile: Any) -> PruneTransform:
    """The ``prune: {ratio, method, refit, protect_super, error_tokens}`` stage of ``moecompress compress``.

    Uniform layout (the per-layer layout's global ranking needs a measuring pass of its own); output error (the
    default) chooses each layer's experts in the pass, on the compressed earlier layers; score methods use
    ``profile``. The count is the checkpoint's (a prune stage comes before any other expert-removing stage).
    During the pass a layer whose protected experts leave too few to remove raises ``order.NotEnoughRemovable``."""
    from ..core.errors import UserError

    ckpt = job.ckpt
    try:
        opts = PruneOptions(**options)
        ckpt.family.check_routing(
            ckpt.config, "the prune stage", removes_experts=True,
            needs_routing=opts.method == "output-error" or opts.refit != "none",
            hint="give it method: frequency, routing-mass or reap and refit: none",
        )  # fmt: skip
        spec = RouterSpec.from_config(ckpt.family, ckpt.config)
        return PruneTransform.from_profile(spec, ckpt.num_experts, opts, profile, ckpt.moe_layers)
    except (TypeError, ValueError) as err:
        raise UserError(f"prune stage: {err}") from None
