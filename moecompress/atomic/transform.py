"""Atomic (channel) pruning as an engine transform: select, slice and refit each MoE layer's expert channels.

    t = AtomTransform(spec, keep=keep, layout="uniform", refit=Refit())   # channels chosen before the pass
    t = AtomTransform(spec, width=96)                                     # chained: choose on the block as it is
    engine.run([..., t, ...], emit=out.add_layer)

Per MoE layer (``moe_layer``) the transform works on the block as the earlier transforms left it (its own tensors,
no copy: the routed experts in the checkpoint's dtype when the stream holds them narrow, upcast one expert at a time
where read; maybe fewer experts: ``ctx.extra["expert_ids"]`` then lists the source expert id of each expert now in
the block, set by the transform that removed experts):
  1. the kept channels of every expert: given (``keep``, per source expert, e.g. the global HEAPr ranking of
     ``atomic.run``), or each expert's top ``width`` by ``scores`` [E_src, I] (per source expert), or, with
     neither, by the channel second moments m_{e,j} measured on ``ctx.inputs`` with the block's own routing;
  2. with ``refit``, each expert's kept down_proj columns are refitted on the layer's inputs (atomic/compensate);
  3. the block is left narrowed (exact layout: zero-padded to one width per layer, which computes exactly the
     same), so the engine's forward feeds the next layer with the pruned layer's outputs; the hub tensors of the
     pruned experts and router are ``ctx.replace``-d, cast to the checkpoint's dtypes.
``config`` sets the width key (uniform layout); ``section`` is the manifest's "atom" stage section.
Uniform layout on a family that sizes its shared experts from the same key (DeepSeek-style
``moe_intermediate_size * n_shared_experts``): ``rewrite`` zero-pads them to the next multiple of the kept width and
``config`` sets the shared count to match (atomic/shared.py: their output is exactly unchanged).
The exact layout (per-expert widths, loaded by ``moecompress.load``) must be the last stage that writes the
routed experts: a later stage would see (and write) the zero-padded block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from ..core import dist
from ..core.engine import LayerContext, Transform
from ..core.errors import UserError
from ..core.experts import expert_hidden
from ..core.families import MoEWeights
from ..prune.load import block_view, set_block_experts
from .apply import ExactLayer, fused_gate_up, fused_halves, pad_exact, padded_width
from .compensate import (
    ERROR_TOKENS,
    Refit,
    dense_routing,
    iter_refit_downs,
    refit_dtype,
    refit_expert_downs,
    relative_error,
    routed_output,
    slice_layer,
)
from .heapr import top_channels
from .shared import SharedPadding, checkpoint_padding

EXPERTS = "expert_ids"  # ctx.extra key: source expert id of each expert in the block (absent: 0..E-1)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def width_key(config: Any) -> str:
    """config key holding the routed experts' intermediate width."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return "moe_intermediate_size" if get("moe_intermediate_size") else "intermediate_size"


def current_weights(ctx: LayerContext) -> MoEWeights:
    """The MoE block's routed experts and router as they are now, in float32 on the CPU (the block's own tensors
    where they are float32 CPU tensors already, else float32 copies)."""
    w = block_view(ctx.block, ctx.engine.fam)
    return MoEWeights(*(None if t is None else t.detach().float().cpu() for t in (
        w.gate, w.up, w.down, w.router, w.router_bias, w.correction_bias)))  # fmt: skip


def held_weights(ctx: LayerContext) -> MoEWeights:
    """The MoE block's routed experts and router as the stream holds them, on the CPU: the block's own tensors (no
    copy on the CPU), the routed experts possibly narrow (the checkpoint's bf16: every reader upcasts per expert)."""
    w = block_view(ctx.block, ctx.engine.fam)
    return MoEWeights(*(None if t is None else t.detach().cpu() for t in (
        w.gate, w.up, w.down, w.router, w.router_bias, w.correction_bias)))  # fmt: skip


def channel_moments(x: torch.Tensor, weights: torch.Tensor, w: MoEWeights, act: Any) -> torch.Tensor:
    """m_{e,j} = mean h_j(x)^2 over the tokens routed to e (x [T, H], weights [T, E] dense routing) -> [E, I]
    (weights upcast one expert at a time to x's dtype)."""
    m = torch.zeros(w.gate.shape[0], w.gate.shape[1], dtype=torch.float64)
    for e in range(w.gate.shape[0]):
        on = weights[:, e] > 0
        if bool(on.any()):
            m[e] = expert_hidden(x[on], w.gate[e].to(x.dtype), w.up[e].to(x.dtype), act).double().square().mean(0)
    return m


def split_refit(
    x: torch.Tensor,
    weights: torch.Tensor,
    w: MoEWeights,
    keep: list[torch.Tensor],
    act: Any,
    ridge: float,
    holdout: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(expert, refitted down [H, K_e]) for every expert in order (``iter_refit_downs``), with the experts split
    across torchrun ranks (dist.share), then every rank gets every expert's refitted columns (exact); one process
    refits them all, one expert at a time."""
    E = len(keep)
    if dist.world() == 1:
        yield from iter_refit_downs(x, weights, w, keep, act, ridge, holdout)
        return
    mine = dist.share(E)
    downs = refit_expert_downs(x, weights, w, keep, act, ridge, holdout, experts=mine)
    widths = [int(k.numel()) for k in keep]
    buf = torch.zeros(E, w.down.shape[1], max(widths, default=0), dtype=refit_dtype(w.down.dtype))  # [E, H, K_max]
    for e in mine:
        buf[e, :, : widths[e]] = downs[e]
    del downs
    dist.fill_rows_(buf, E)
    for e in range(E):
        yield e, buf[e, :, : widths[e]]


class _SlicedDowns:
    """Every expert's kept down columns, indexable like the sliced [E, H, K] tensor: ``[e]`` is expert e's [H, K_e]
    (a copy made when read; ``routed_forward`` reads only ``down[e]``)."""

    def __init__(self, down: torch.Tensor, keep: list[torch.Tensor]):
        self.down, self.keep = down, keep

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.down[e].index_select(1, self.keep[e].long())


class AtomTransform(Transform):
    """Channel pruning of every MoE layer's routed experts (see the module docstring).

    spec: the router's ``prune.order.RouterSpec`` (dense routing weights for the refit and the measured moments).
    keep: {layer: [kept channel indices per source expert]} or None; scores: {layer: [E_src, I]} or None;
    width: the one kept width of the uniform layout (needed without ``keep``); layout: uniform | exact;
    refit: None for plain slicing; sequential: False leaves the block unpruned for the forward (the next layers
    see the unpruned model's activations; not chainable); info: method facts copied into the section.
    shared: the shared-expert padding of the uniform width (None: found in ``start`` from the checkpoint).
    """

    name = "atom"
    reads_narrow = True  # expert weights are upcast per expert where read; refitted downs are held in float32

    def __init__(
        self,
        spec: Any,
        *,
        keep: dict[int, list[torch.Tensor]] | None = None,
        scores: dict[int, torch.Tensor] | None = None,
        width: int | None = None,
        layout: str = "uniform",
        refit: Refit | None = None,
        sequential: bool = True,
        info: dict[str, Any] | None = None,
        shared: SharedPadding | None = None,
    ):
        if layout not in ("uniform", "exact"):
            raise ValueError(f"layout {layout!r} is not uniform or exact")
        if keep is None and width is None:
            raise ValueError("without kept channels, the uniform width to keep is needed")
        if keep is None and layout == "exact":
            raise ValueError("the exact layout needs its channels chosen before the pass (a global ranking)")
        self.spec, self.keep, self.scores, self.width = spec, keep, scores, width
        self.atom_layout, self.refit, self.sequential, self.info = layout, refit, sequential, dict(info or {})
        self.layout = "uniform" if layout == "uniform" else "atomic_exact"  # the manifest's layout name
        self.warnings: list[str] = []
        self.wants_inputs = refit is not None or (keep is None and scores is None)
        self.layers: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, list[list[int]]] = {}
        self.errors: dict[str, dict[str, float]] = {}
        self.removed_experts: dict[str, list[int]] = {}
        self.totals = {"channels": 0, "removed": 0, "params_removed": 0, "original_width": 0}
        self._dtypes: dict[str, str] = {}
        self._params = 0
        self.shared = shared
        self._module_key: Any = lambda key: key  # a checkpoint key -> transformers' module name (start)
        self._forward_only: tuple[Any, Any] | None = None  # the block's pruned experts until layer_done

    def start(self, engine: Any) -> None:
        self._dtypes = {k: v["dtype"] for k, v in engine.ckpt.tensor_info().items()}
        self._params = engine.ckpt.num_params
        self._module_key = engine.fam.disk_to_module  # Hunyuan-V3 shared_mlp, Kimi-Linear block_sparse_moe on disk
        K = self.kept_width
        if self.shared is None and K is not None:
            self.shared = checkpoint_padding(engine.ckpt, width_key(engine.ckpt.config), K)
        if self.shared is not None and self.shared.refusal is not None:
            raise UserError(
                f"{engine.fam.name} sizes {self.shared.refusal} from {self.shared.key} too, and no config key "
                f"widens it back, so a uniform width of {K} would resize it: use the exact layout"
            )

    def rewrite(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if self.shared is None or not self.shared.active:
            return None
        padded = self.shared.pad(self._module_key(key), tensor)  # its shapes are named as transformers' modules
        return {key: padded} if padded is not None else None

    def _kept(self, ctx: LayerContext, w: MoEWeights, x: torch.Tensor | None) -> list[torch.Tensor]:
        """Kept channels [K_e] per expert of the block as it is now."""
        E, l = w.num_experts, ctx.index
        src = ctx.extra.get(EXPERTS)

        def of_block(per_source: Any, what: str) -> Any:
            if len(per_source) == E and src is None:
                return per_source
            if src is None or len(src) != E:
                raise ValueError(
                    f"layer {l}: the block has {E} experts, the {what} {len(per_source)}, and no ctx.extra"
                    f"[{EXPERTS!r}] maps them"
                )
            return [per_source[s] for s in src] if isinstance(per_source, list) else per_source[torch.tensor(src)]

        if self.keep is not None:
            return [k.long() for k in of_block(self.keep[l], "kept channels list")]
        assert self.width is not None
        unmapped = self.scores is not None and src is None and self.scores[l].shape[0] != E
        if self.scores is not None and not unmapped:
            s = of_block(self.scores[l], "scores")
        else:
            if unmapped:  # e.g. an earlier stage merged experts: source scores do not apply to them
                self.warnings.append(
                    f"layer {l}: its {E} experts are not source experts (no ctx.extra[{EXPERTS!r}]), so their "
                    "channels were ranked by second moments measured on the block as the earlier stages left it"
                )
            if x is None:
                if not ctx.inputs:
                    ctx.inputs = ctx.engine.moe_inputs(ctx.layer)
                x = torch.cat([t.cpu() for t in ctx.inputs]).float()  # [T, H]
            logits = x @ w.router.T + (w.router_bias if w.router_bias is not None else 0.0)  # [T, E]
            s = channel_moments(x, dense_routing(logits, self.spec, w.correction_bias), w, ctx.experts.act_fn)
        return list(top_channels(s, self.width))

    def _cast(self, ctx: LayerContext, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each hub tensor in the dtype the checkpoint stores it in (the layer's routed dtype for a new name)."""
        pat = ctx.engine.fam.routed_key_pattern(ctx.index)
        routed = [d for k, d in self._dtypes.items() if pat.match(k)]
        out = {}
        for k, t in tensors.items():
            d = self._dtypes.get(k) or (routed[0] if routed else "F32")
            out[k] = t.to(_DTYPES[d]) if d in _DTYPES else t
        return out

    def moe_layer(self, ctx: LayerContext) -> None:
        fam, l = ctx.engine.fam, ctx.index
        w = held_weights(ctx)  # [E, I, H] ... the block's own tensors (routed experts maybe bf16: upcast per expert)
        E, I, H = w.gate.shape
        x = None
        if self.wants_inputs:
            x = torch.cat([t.cpu() for t in ctx.inputs]).float()  # [T, H]
            if all(t.dtype == x.dtype and t.device == x.device for t in ctx.inputs):
                # x is their copy: the inputs become views of it (the same values; one [T, H] float32 fewer
                # through the refit: 112 MiB at DeepSeek-V3 dims and 4,096 tokens), as prune's transform does
                ctx.inputs = list(x.split([int(t.shape[0]) for t in ctx.inputs]))
        keep = self._kept(ctx, w, x)
        if self.refit is None:
            pruned = slice_layer(w, keep, self.atom_layout)
        else:
            assert x is not None
            pruned = self._refitted(ctx, w, x, keep)
        del w, x
        self._record(ctx, keep, E, I, H)
        if isinstance(pruned, ExactLayer) and len(pruned.kept_experts) < E:
            src = ctx.extra.get(EXPERTS) or list(range(E))
            ctx.extra[EXPERTS] = [src[e] for e in pruned.kept_experts]
        if self.sequential:
            now = pad_exact(pruned, padded_width(pruned.widths)) if isinstance(pruned, ExactLayer) else pruned
            dev = ctx.engine.device
            ctx.experts.gate_up_proj = ctx.experts.down_proj = None  # the unpruned experts go before the pruned come
            moved = MoEWeights(*(None if t is None else t.to(dev) for t in (
                now.gate, now.up, now.down, now.router, now.router_bias, now.correction_bias)))  # fmt: skip
            set_block_experts(ctx.block, fam, moved, l, gate_up=fused_halves(moved))  # halves: held, not copied
            if not isinstance(pruned, ExactLayer) and dev == pruned.gate.device:  # write the block's own tensors
                gate_up, K = ctx.experts.gate_up_proj.data, pruned.gate.shape[1]
                pruned = replace(pruned, gate=gate_up[:, :K], up=gate_up[:, K:], down=ctx.experts.down_proj.data)
            del now
            self._forward_only = (getattr(ctx.experts, "gate_up_proj", None), ctx.experts.down_proj)  # see layer_done
        ctx.replace(self._cast(ctx, fam.write_layer(pruned, l)))

    def layer_done(self, ctx: LayerContext) -> None:
        """After the forward, the block's pruned experts (refitted downs held in float32) are no longer read: drop
        them before the layer is written (the writer holds the cast copies and views it needs; 30B-shaped layer:
        the 0.56 GiB of float32 downs leave before the shard is serialized). Only tensors this transform set."""
        held, self._forward_only = self._forward_only, None
        if held is None or not self.sequential:
            return
        for name, t in zip(("gate_up_proj", "down_proj"), held, strict=True):
            if t is not None and getattr(ctx.experts, name, None) is t:
                setattr(ctx.experts, name, None)

    def _refitted(self, ctx: LayerContext, w: MoEWeights, x: torch.Tensor, keep: list[torch.Tensor]) -> Any:
        """The sliced layer with each expert's kept down_proj columns refitted (held in float32), filled one expert
        at a time; records the routed-output errors of the sliced and the refitted layer."""
        assert self.refit is not None
        act = ctx.experts.act_fn
        fit = self.refit.fit_tokens
        x = x[:: max(1, x.shape[0] // fit)][:fit]
        logits = x @ w.router.T + (w.router_bias if w.router_bias is not None else 0.0)  # [T, E]
        weights = dense_routing(logits, self.spec, w.correction_bias)
        xe = x[:: max(1, x.shape[0] // ERROR_TOKENS)][:ERROR_TOKENS]  # the diagnostic needs few tokens
        y0 = routed_output(xe, w, self.spec, act)  # [T_e, H] of the unpruned layer
        fused = self._compactable(ctx, w, keep)
        if fused is not None:
            return self._refitted_in_place(ctx, w, x, weights, keep, fused, xe, y0)
        pruned = slice_layer(w, keep, self.atom_layout, refit_dtype(w.down.dtype))
        sliced = relative_error(routed_output(xe, pruned, self.spec, act), y0)
        slot = {e: i for i, e in enumerate(pruned.kept_experts)} if isinstance(pruned, ExactLayer) else None
        for e, down in split_refit(x, weights, w, keep, act, self.refit.ridge, self.refit.holdout):
            if slot is None:
                pruned.down[e] = down
            elif e in slot:
                pruned.down[slot[e]] = down.to(pruned.down[slot[e]].dtype)
        self.errors[str(ctx.index)] = {
            "sliced": round(sliced, 6),
            "refit": round(relative_error(routed_output(xe, pruned, self.spec, act), y0), 6),
        }
        return pruned

    def _compactable(self, ctx: LayerContext, w: MoEWeights, keep: list[torch.Tensor]) -> torch.Tensor | None:
        """The block's own fused gate_up [E, 2I, H] when the uniform slice may be written into its storage, expert by
        expert as the refit goes (sequential pass, one process: the block is replaced right after and nothing
        reads an expert's unpruned rows once its refit is done); else None."""
        fused = getattr(ctx.experts, "gate_up_proj", None)
        if not (self.sequential and self.atom_layout == "uniform" and dist.world() == 1 and torch.is_tensor(fused)):
            return None
        fused = fused.data
        E, I, H = w.gate.shape
        widths = {int(k.numel()) for k in keep}
        if len(widths) != 1 or not 0 < next(iter(widths)) <= I or fused.shape != (E, 2 * I, H):
            return None
        if not (fused.is_contiguous() and fused.dtype == w.gate.dtype == w.up.dtype):
            return None
        if w.gate.data_ptr() != fused.data_ptr() or fused_gate_up(w).data_ptr() != fused.data_ptr():
            return None  # not the block's own halves (e.g. a CPU copy of a GPU block)
        return fused

    def _refitted_in_place(
        self,
        ctx: LayerContext,
        w: MoEWeights,
        x: torch.Tensor,
        weights: torch.Tensor,
        keep: list[torch.Tensor],
        fused: torch.Tensor,
        xe: torch.Tensor,
        y0: torch.Tensor,
    ) -> MoEWeights:
        """``_refitted`` with the sliced gate/up rows written into the block's own gate_up storage (the first
        E * 2K * H elements, as ``slice_uniform`` lays them out) once each expert's refit is done: the layer's
        unpruned and sliced gate_up never coexist. Same tensors, same errors (the sliced error is taken after the
        refit, on the sliced downs of the block's down_proj, upcast per expert as before)."""
        assert self.refit is not None
        act = ctx.experts.act_fn
        E, I, H = w.gate.shape
        K = int(keep[0].numel())
        flat = fused.view(-1)[: E * 2 * K * H].view(E, 2 * K, H)  # [E, 2K, H]: slice_uniform's layout
        down = torch.empty(E, w.down.shape[1], K, dtype=refit_dtype(w.down.dtype))  # [E, H, K]
        for e, d in split_refit(x, weights, w, keep, act, self.refit.ridge, self.refit.holdout):
            down[e] = d
            k = keep[e].long()
            rows = torch.cat([w.gate[e].index_select(0, k), w.up[e].index_select(0, k)])  # [2K, H], a copy
            flat[e] = rows  # overwrites only experts <= e, whose unpruned rows are no longer read
            del rows
        sliced_down: Any = _SlicedDowns(w.down, keep)  # read per expert by routed_forward: no [E, H, K] copy
        pruned = replace(w, gate=flat[:, :K], up=flat[:, K:], down=sliced_down)
        sliced = relative_error(routed_output(xe, pruned, self.spec, act), y0)
        pruned = replace(pruned, down=down)
        self.errors[str(ctx.index)] = {
            "sliced": round(sliced, 6),
            "refit": round(relative_error(routed_output(xe, pruned, self.spec, act), y0), 6),
        }
        return pruned

    def _record(self, ctx: LayerContext, keep: list[torch.Tensor], E: int, I: int, H: int) -> None:
        src = ctx.extra.get(EXPERTS) or list(range(E))
        kept = sum(int(k.numel()) for k in keep)
        gone = [src[e] for e in range(E) if keep[e].numel() == 0]
        self.layers[str(ctx.index)] = {
            "kept_experts": [src[e] for e in range(E) if keep[e].numel() > 0],
            "widths": [int(k.numel()) for k in keep if k.numel() > 0],
        }
        self.channels[str(ctx.index)] = [k.tolist() for k in keep]
        if gone:
            self.removed_experts[str(ctx.index)] = gone
        self.totals["channels"] += E * I
        self.totals["removed"] += E * I - kept
        self.totals["params_removed"] += (E * I - kept) * 3 * H + len(gone) * H  # gate+up rows, down cols, router
        self.totals["original_width"] = max(self.totals["original_width"], I)

    @property
    def kept_width(self) -> int | None:
        """The uniform layout's one width (None for the exact layout)."""
        if self.atom_layout != "uniform":
            return None
        if self.width is not None:
            return self.width
        return len(next(iter(self.keep.values()))[0]) if self.keep else None

    def config(self, cfg: dict[str, Any]) -> None:
        if self.atom_layout == "uniform" and self.kept_width is not None:
            cfg[width_key(cfg)] = self.kept_width
            if self.shared is not None:
                self.shared.config(cfg)

    def section(self) -> dict[str, Any]:
        t = self.totals
        pad_warning = [w for w in [self.shared.warning() if self.shared is not None else None] if w]
        total = max(t["channels"], 1)
        out: dict[str, Any] = {
            **self.info,
            "layout": self.layout,
            "width": self.kept_width,
            "original_width": t["original_width"],
            "routed_channels_total": t["channels"],
            "routed_channels_removed": t["removed"],
            "routed_channels_removed_fraction": t["removed"] / total,
            "params_removed": t["params_removed"],
            "params_removed_fraction_of_all": t["params_removed"] / max(self._params, 1),
            "experts_removed_from_routing": dict(self.removed_experts),
            "shared_padding": self.shared.describe() if self.shared is not None else None,
            "layers": self.layers,
            "compensation": self.info.get("compensation"),
            "warnings": list(self.info.get("warnings", [])) + self.warnings + pad_warning,
        }
        if self.refit is not None:
            out["compensation_output_error"] = self.errors
        return out
