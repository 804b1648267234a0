"""Merging as an engine transform: each MoE layer's experts clustered and merged into fewer experts.

    t = MergeTransform(MergeOptions(ratio=0.25), profile=prof, protected={3: [7]})
    engine.run([t, QuantTransform(...)], emit=out.add_layer)   # merge, then quantize, in one pass
    t.config(cfg); manifest.add("merge", t.section())

``moe_layer`` reads the block as the engine (or an earlier stage) left it, merges it (``layer.merge_layer``: cluster,
merge or choose, refit, router rebuild; the math runs on the block's device (the job's ``--device``) on weights in
the checkpoint's dtypes, as the single command always did), leaves the block merged (with ``sequential``) so the
layer's forward feeds the next layer with the merged layer's outputs, and ``ctx.replace``s the layer's
routed-expert and router tensors.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from ..core.engine import Engine, LayerContext, Transform
from ..core.errors import UserError
from ..core.families import MoEWeights
from ..core.job import Job
from ..core.memprobe import probe
from ..prune.load import block_view, set_block_experts
from ..prune.order import RouterSpec
from .cluster import MergeTargetError, check_merge_target, n_clusters_for
from .layer import merge_layer
from .options import MergeOptions

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class MergeTransform(Transform):
    """Merge every MoE layer's routed experts to ``n_clusters_for(E, opts.ratio)`` experts (E: the layer's count
    as the transform finds it). ``profile`` (a ``profile.run.Profile`` of the source model, optional) gives routing
    frequencies and similarities; ``protected[l]`` (source expert ids) are never merged. When an earlier stage
    changed a layer's expert count, the profile's per-expert statistics apply only through
    ``ctx.extra["expert_ids"]`` (the source id of each current expert); without it they are not used (a warning).
    After the layer, ``ctx.extra["expert_ids"]`` is dropped and ``ctx.extra["merged_from"]`` lists each new
    expert's source ids. With ``opts.sequential`` False the block is left unmerged (the next layer sees the
    original activations): the single command's ``--no-sequential`` mode, which cannot chain."""

    name = "merge"
    wants_inputs = True
    changes_block = True
    reads_narrow = True  # expert weights are upcast per expert (or per cluster) where read

    def __init__(self, opts: MergeOptions, profile: Any | None = None, protected: dict[int, list[int]] | None = None):
        self.opts, self.profile = opts, profile
        self.protected = protected or {}
        self.layers: dict[str, dict[str, Any]] = {}  # str(layer) -> merge_layer's info
        self.counts: dict[int, tuple[int, int]] = {}  # layer -> (experts before, after)
        self.warnings: list[str] = []

    def start(self, engine: Engine) -> None:
        self.fam, cfg = engine.fam, engine.ckpt.config
        if self.fam.fused_disk:
            raise UserError(
                f"{self.fam.name} keeps its routed experts fused on disk"
                f"{' with biases' if self.fam.expert_bias else ''}: merge writes per-expert tensors"
                f"{' and does not carry expert biases' if self.fam.expert_bias else ''}, so it is refused for it; "
                "use `moecompress prune` to remove experts instead"
            )
        self.spec = RouterSpec.from_config(self.fam, cfg)
        self.n_group = self.fam.n_group(cfg)
        self.source_experts = engine.ckpt.num_experts
        self._info = engine.ckpt.tensor_info()
        if self.opts.router == "fit" and self.fam.correction_bias:
            self.warnings.append(
                f"{self.fam.name} routes with sigmoid scores: router rows are frequency-weighted averages, not fit"
            )

    def _dtypes(self, l: int) -> dict[str, torch.dtype]:
        """The checkpoint's dtype of each part of layer l's view (what the single command always merged in)."""
        fam, info = self.fam, self._info

        def of(key: str | None, default: torch.dtype) -> torch.dtype:
            meta = info.get(key) if key else None
            return _DTYPES.get(meta["dtype"], default) if meta else default

        ex = of(fam.expert_key(l, 0, 0), torch.float32)
        router = of(fam.router_key(l), ex)
        return {
            "gate": ex,
            "up": of(fam.expert_key(l, 0, 1), ex),
            "down": of(fam.expert_key(l, 0, 2), ex),
            "router": router,
            "router_bias": of(fam.router_key(l, "bias"), router),
            "correction_bias": of(fam.correction_key(l), router),
        }

    def _stats(
        self, l: int, E: int, ids: list[int] | None
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """(protected experts, profile frequencies [E], profile similarity [E, E]) in the layer's current numbering."""
        prot = self.protected.get(l, [])
        if ids is None:
            if E == self.source_experts:
                ids = list(range(E))
            else:
                self.warnings.append(
                    f"layer {l}: an earlier stage left {E} of {self.source_experts} experts without saying which: "
                    "the profile's statistics and protected experts are not used"
                )
                return [], None, None
        pos = {src: i for i, src in enumerate(ids)}
        protected = [pos[p] for p in prot if p in pos]  # in the order given (as the single command had it)
        if self.profile is None:
            return protected, None, None
        idx = torch.as_tensor(ids)
        freqs = self.profile.layer(l, "frequency")[idx]
        sim = self.profile.layer(l, f"{self.opts.similarity}_similarity")[idx][:, idx]
        if float(freqs.sum()) > 0:
            never = [e for e in range(E) if float(freqs[e]) == 0]
            if never:
                self.warnings.append(f"layer {l}: experts {never} were never routed in the profile")
        return protected, freqs, sim

    def moe_layer(self, ctx: LayerContext) -> None:
        l, eng = ctx.index, ctx.engine
        dt = self._dtypes(l)
        cur = block_view(ctx.block, self.fam)  # [E, ...] as the block is now (routed experts maybe held narrow)
        held = (ctx.experts.gate_up_proj.dtype, ctx.experts.down_proj.dtype)
        # the block's own tensors, no copy: merge_layer rounds what it builds to the checkpoint's dtypes ``dt``
        w = MoEWeights(**{k: None if getattr(cur, k) is None else getattr(cur, k).detach() for k in dt})
        E = w.num_experts
        K = n_clusters_for(E, self.opts.ratio)
        ids = ctx.extra.pop("expert_ids", None)
        protected, freqs, sim = self._stats(l, E, ids)
        check_merge_target(E, K, self.spec.top_k, len(protected), self.n_group)
        probe(f"merge {l}: inputs")
        x = torch.cat([b.to(eng.device) for b in ctx.inputs])  # [T, H]
        if all(b.device == x.device for b in ctx.inputs):  # the batches become views of x (the same values): one
            # [T, H] copy of the calibration inputs held through the merge, not two (64 MB at 32k tokens of H 512)
            ctx.inputs = list(x.split([b.shape[0] for b in ctx.inputs]))
        merged, info = merge_layer(
            w, x, K, self.spec.top_k, self.opts, freqs, sim, protected, self.n_group, self.spec.norm_topk, self.spec,
            act=ctx.experts.act_fn, dtypes={k: v for k, v in dt.items() if getattr(w, k) is not None},
        )  # fmt: skip
        probe(f"merge {l}: merged")
        del x, w, cur  # the block's old experts go when set_block_experts replaces them (no other reference)
        merged = MoEWeights(**{k: None if v is None else v.cpu() for k, v in vars(merged).items()})
        self.layers[str(l)] = info
        self.counts[l] = (E, K)
        src = ids if ids is not None else list(range(E))
        ctx.extra["merged_from"] = [[src[e] for e in c] for c in info["clusters"]]
        if self.opts.sequential:  # the merged layer makes the next layer's inputs (experts held as they were)
            m = _as(merged, eng.stream.dtype, eng.device, held)
            # choose.assemble makes gate and up the halves of one [K, 2I, H] tensor: the block holds it as it is
            # (set_block_experts checks it; otherwise it concatenates)
            set_block_experts(ctx.block, self.fam, m, l, gate_up=m.gate._base)
            del m
        ctx.replace(self.fam.write_layer(merged, l))
        probe(f"merge {l}: applied")

    @property
    def experts_after(self) -> int:
        """The one expert count every merged layer has (ValueError when an earlier stage left them unequal)."""
        after = {k for _, k in self.counts.values()}
        if len(after) != 1:
            raise ValueError(f"merged layers have expert counts {sorted(after)}: merge needs one count per model")
        return after.pop()

    def config(self, cfg: dict[str, Any]) -> None:
        cfg.update(self.fam.expert_count_updates(self.experts_after))

    def section(self) -> dict[str, Any]:
        opts, before = self.opts, {e for e, _ in self.counts.values()}
        return {
            "method": opts.method,
            "ratio": opts.ratio,
            "options": asdict(opts),
            "experts_before": before.pop() if len(before) == 1 else sorted(before),
            "experts_after": self.experts_after,
            "top_k": self.spec.top_k,
            "n_group": self.n_group,
            "protected": sorted([l, e] for l, v in self.protected.items() for e in v),
            "similarity": f"{opts.similarity} ({'from the profile' if self.profile is not None else 'measured here'})",
            "router_rebuild": "ridge least squares to log-sum-exp of member logits, then LBFGS on KL"
            if opts.router == "fit"
            else "frequency-weighted average of member rows",
            "neuron_alignment": opts.aligned,
            "down_refit": opts.refitted and not self.fam.correction_bias,
            "choice": "from the default pruning (output error + guarded down refit), per cluster the routed-output "
            f"error on held-out calibration tokens among {', '.join(opts.candidates)}, switching only when lower by "
            f"> {opts.min_gain_se:g} standard errors; clusterings: the output-error pruning choice and k-means"
            if opts.choose
            else None,
            "propagation": "every layer is calibrated on the already-merged earlier layers"
            if opts.sequential
            else "every layer is calibrated on the original (unmerged) model's activations",
            "layers": self.layers,
            "warnings": list(self.warnings),  # the command moves them to the manifest's common warnings
        }


def protected_experts(moe_layers: list[int], profile: Any | None, protect_super: bool) -> dict[int, list[int]]:
    """The profile's super experts per MoE layer (none without a profile or with ``protect_super`` off)."""
    out: dict[int, list[int]] = {l: [] for l in moe_layers}
    if profile is not None and protect_super:
        for l, e in profile.super_experts:
            if l in out:
                out[l].append(int(e))
    return out


def transform_for_recipe(job: Job, options: dict[str, Any], profile: Any | None) -> MergeTransform:
    """A ``merge: {ratio: R}`` recipe stage (compress): the merge command's defaults, seeded by the job, the
    profile's super experts protected; the ratio is checked against the checkpoint's expert count (a stage after an
    expert-removing one is checked per layer, during the pass)."""
    opts = MergeOptions(seed=job.seed, **options)
    opts.validate()
    ckpt = job.ckpt
    ckpt.family.check_routing(ckpt.config, "the merge stage", True, True, "use a prune stage with method: frequency")
    protected = protected_experts(ckpt.moe_layers, profile, opts.protect_super)
    n_prot = max((len(v) for v in protected.values()), default=0)
    try:
        check_merge_target(
            ckpt.num_experts, n_clusters_for(ckpt.num_experts, opts.ratio), ckpt.top_k, n_prot,
            ckpt.family.n_group(ckpt.config),
        )  # fmt: skip
    except MergeTargetError as err:
        raise UserError(f"merge stage: {err}; choose another ratio") from None
    return MergeTransform(opts, profile, protected)


def _as(
    w: MoEWeights, dtype: torch.dtype, device: torch.device, experts: tuple[torch.dtype, torch.dtype] | None = None
) -> MoEWeights:
    """``w`` on ``device`` in ``dtype``; the routed experts (gate/up, down) in ``experts`` dtypes when given (the
    stream's narrow dtype: the merged experts' bf16 values are held as they are, upcast per expert where used)."""
    gu, dn = experts or (dtype, dtype)
    cast = lambda t, d=dtype: None if t is None else t.to(device, d)  # noqa: E731
    return MoEWeights(
        cast(w.gate, gu), cast(w.up, gu), cast(w.down, dn), cast(w.router), cast(w.router_bias),
        cast(w.correction_bias),
    )  # fmt: skip
