"""Atomic (neuron-level) pruning of routed experts with HEAPr scores: the library entry point.

    atomic_prune(model, output, ratio, hessian="full", layout="uniform", profile=None, ...)

1. ``Job.prepare``: checkpoint, guarded output, calibration tokens (a given profile's own windows);
2. the profile (given, or measured first: one engine pass) supplies m_{e,j} (channel second moments) and the
   super experts;
3. HEAPr: the gradient pass (atomic/gradstream.py: an engine pass forward, then one backward of the LM loss layer
   by layer) yields G_e per MoE layer and the scores s_{e,j} = m_{e,j} w_j^T G_e w_j (or m alone with
   score="magnitude", no gradient pass);
4. selection (needs every layer's scores first): uniform layout: every routed expert keeps its own top-K channels,
   K one multiple of 16 for the whole model; exact layout: the globally lowest channels go, experts keep unequal
   widths (loaded by moecompress.load);
5. one engine pass with ``AtomTransform`` (atomic/transform.py): each MoE layer is sliced and (default) its kept
   down_proj columns refitted on its inputs from the already-pruned earlier layers, and written by ``Output``
   as the pass goes: a normal HF folder + moecompress.json (one "atom" stage section).

Scaling: one decoder layer's weights in memory at a time in every pass; the gradient pass also keeps every
layer's inputs ((L + 1) x N x S x H floats, spilled to disk past a bound) and one layer's G accumulators (full G:
E x H^2 floats; diag: E x H; lowrank: E x H(2r+1)), scored as soon as the layer's G is complete.
``gradient_pass`` (whole model in memory) remains for small models and benchmarks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..core import dist
from ..core.checkpoint import Checkpoint
from ..core.engine import Engine
from ..core.errors import UserError
from ..core.job import Job
from ..core.manifest import Manifest
from ..core.output import Output
from ..core.progress import progress_bar
from ..prune.order import RouterSpec
from .compensate import Compensation
from .gradstats import KINDS, LayerGradStats, bytes_per_expert, collect_grad_stats
from .gradstream import streamed_grad_stats
from .heapr import heapr_scores, select_channels, uniform_width
from .shared import checkpoint_padding
from .transform import AtomTransform, Refit, width_key

LAYOUTS = ("uniform", "exact")
SCORES = ("heapr", "magnitude")
WIDTH_MULTIPLE = 16
COMMAND = "prune --granularity atom"

__all__ = ["atomic_prune", "width_key", "write_atomic"]


def check_args(ratio: float, hessian: str, layout: str, score: str, rank: int) -> None:
    """Refuse bad options before any work."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio} must be between 0 and 1 (the fraction of routed-expert channels removed)")
    if hessian not in KINDS:
        raise UserError(f"--hessian {hessian!r} is not one of {', '.join(KINDS)}")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if score not in SCORES:
        raise UserError(f"--method {score!r} is not an atom score: use one of {', '.join(SCORES)}")
    if rank < 1:
        raise UserError(f"--rank {rank} must be at least 1")


def load_model(path: Path, device: torch.device | None = None) -> torch.nn.Module:
    """The whole model in float32 for the gradient pass (eager experts: exact per-expert math, any width)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    return model.to(device or "cpu").eval()


def experts_of(model: torch.nn.Module, fam: Any, layer: int) -> torch.nn.Module:
    block = getattr(model.model.layers[layer], fam.module_block)
    return getattr(block, fam.experts)


def _gate_up(mod: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    I = mod.down_proj.shape[-1]
    return mod.gate_up_proj[:, :I], mod.gate_up_proj[:, I:]  # [E, I, H] each


def gradient_pass(
    model: torch.nn.Module,
    fam: Any,
    layers: list[int],
    input_ids: torch.Tensor,
    hessian: str,
    rank: int = 32,
    batch_size: int = 8,
    layer_groups: int = 1,
    with_moments: bool = False,
) -> dict[int, LayerGradStats]:
    """G_e (and optionally m) for every MoE layer of a model in memory; ``layer_groups`` > 1 repeats the pass per
    group of layers (benchmarks; the command streams the layers: ``streamed_scores``)."""
    groups = [layers[i::layer_groups] for i in range(layer_groups)]
    batches = list(input_ids.split(batch_size))
    out: dict[int, LayerGradStats] = {}
    with progress_bar() as bar:
        task = bar.add_task(f"gradient pass ({hessian} G)", total=len(batches) * len(groups))
        for group in groups:
            mods = {l: experts_of(model, fam, l) for l in group}
            out.update(
                collect_grad_stats(
                    model,
                    mods,
                    batches,
                    kind=hessian,
                    rank=rank,
                    gate_up_fn=_gate_up if with_moments else None,
                    progress=lambda _: bar.advance(task),
                )  # fmt: skip
            )
    return out


def streamed_scores(
    ckpt: Checkpoint,
    m: dict[int, torch.Tensor],
    input_ids: torch.Tensor,
    hessian: str,
    rank: int = 32,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """HEAPr scores [E, I] per MoE layer from the layer-streamed gradient pass; each layer's G is dropped once
    scored."""

    def score(l: int, st: LayerGradStats, experts: torch.nn.Module) -> torch.Tensor:
        E = m[l].shape[0]  # under torchrun each rank scores its share of the experts, then all rows are shared
        down = experts.down_proj.detach()  # [E, H, I] as held, where held (upcast per expert, on G's device)
        s = heapr_scores(m[l], down, st.G, dist.share(E))  # [E, I]
        return dist.fill_rows_(s, E)

    return streamed_grad_stats(ckpt, input_ids, hessian, rank, batch_size, device, on_layer=score, split_experts=True)


def channel_scores(
    ckpt: Checkpoint,
    m: dict[int, torch.Tensor],
    score: str,
    input_ids: torch.Tensor,
    hessian: str,
    rank: int = 32,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """Per MoE layer [E, I] scores (float64): HEAPr from the streamed gradient pass, or m alone ("magnitude")."""
    if score == "magnitude":
        return {l: m[l].double() for l in ckpt.moe_layers}
    return streamed_scores(ckpt, m, input_ids, hessian, rank, batch_size, device)


def uniform_k(I: int, ratio: float) -> int:
    """The one kept width of the uniform layout (a multiple of 16), or a UserError when none fits."""
    try:
        K = uniform_width(I, ratio, WIDTH_MULTIPLE)
    except ValueError as err:
        raise UserError(f"{err}: use --layout exact") from None
    if K >= I:
        raise UserError(
            f"--ratio {ratio} removes less than one block of {WIDTH_MULTIPLE} channels per expert (width {I}): "
            "raise --ratio or use --layout exact"
        )
    return K


def check_layout(ckpt: Checkpoint, layout: str, ratio: float, instead: str = "use --layout exact") -> int | None:
    """Refuse a layout the model cannot take before any pass; the uniform layout's width (None for exact).
    ``instead``: what the refusal tells the user to do. Shared experts sized from the width key (DeepSeek-style
    ``moe_intermediate_size * n_shared_experts``) are zero-padded to the narrower width (atomic/shared.py); a module
    no config key keeps exact (a dense or shared MLP sized by the width key itself) is refused here."""
    if layout != "uniform":
        return None
    key = width_key(ckpt.config)
    K = uniform_k(int(getattr(ckpt.config, key)), ratio)
    other = checkpoint_padding(ckpt, key, K).refusal
    if other is not None:
        try:
            ckpt.check_layout("exact")
        except UserError:  # Llama-4, multimodal wrappers: no exact layout either, so do not suggest it
            instead = "channel pruning is not available for this model type (its exact layout is refused too); use "
            instead += "expert pruning (moecompress prune --ratio R)"
        else:
            instead += " (loads with moecompress.load)"
        raise UserError(
            f"{ckpt.family.name} sizes more than its routed experts from {key} ({other} too, and no config key "
            f"widens it back), so a narrower uniform width would resize it: {instead}"
        )
    return K


def score_channels(
    job: Job, prof: Any, score: str, hessian: str = "full", rank: int = 32
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Per MoE layer [E, I] scores of the source model (HEAPr: the gradient pass over the job's tokens) and the
    method facts for the manifest section."""
    ckpt, H = job.ckpt, job.ckpt.config.hidden_size
    m = {l: prof.layer(l, "channel_sq_mean").float() for l in ckpt.moe_layers}  # [E, I]
    scores = channel_scores(ckpt, m, score, job.tokens().input_ids, hessian, rank, job.batch_size, job.device)
    heapr = score == "heapr"
    return scores, {
        "method": "heapr" if heapr else "activation_magnitude",
        "score": "m_ej * w_j^T G_e w_j" if heapr else "m_ej",
        "hessian": hessian if heapr else None,
        "hessian_rank": rank if heapr and hessian == "lowrank" else None,
        "hessian_bytes_per_expert": bytes_per_expert(hessian, H, rank) if heapr else None,
        "calibration_fingerprint": (prof.meta.get("calibration") or {}).get("fingerprint"),
        "scored_on": "the source model, in passes before the pruning pass: the profile's channel moments"
        + (" and the HEAPr gradient pass (an engine forward, then a backward layer by layer)" if heapr else ""),
    }


def atom_transform(
    ckpt: Checkpoint,
    scores: dict[int, torch.Tensor],
    ratio: float,
    layout: str,
    supers: list[tuple[int, int]],
    info: dict[str, Any],
    compensation: Compensation | None = None,
) -> AtomTransform:
    """The channels every expert keeps (from per-layer scores [E, I], ranked globally for the exact layout) as a
    ready ``AtomTransform`` (refitting the kept down_proj columns with ``compensation``)."""
    fam, layers, E = ckpt.family, ckpt.moe_layers, ckpt.num_experts
    K = uniform_k(scores[layers[0]].shape[1], ratio) if layout == "uniform" else None
    protected = {l: torch.tensor([(l, e) in supers for e in range(E)]) for l in layers}
    try:
        keep = select_channels(scores, ratio, K, protected, ckpt.top_k, fam.n_group(ckpt.config))
    except ValueError as err:
        raise UserError(f"{err}: lower --ratio, pass --no-protect-super or use --layout uniform") from None
    warnings = list(info.get("warnings", []))
    if layout == "uniform" and supers:
        shown = [list(x) for x in supers]
        warnings.append(f"uniform layout: protected experts {shown} keep only their top-{K} channels")
    info = {
        **info,
        "ratio": ratio,
        "width_key": width_key(ckpt.config),
        "protected": [list(x) for x in supers],
        "protection": "whole" if layout == "exact" else "top-K channels only (uniform width)",
        "compensation": compensation.describe() if compensation is not None else None,
        "warnings": warnings,
    }
    refit = compensation.refit if compensation is not None else None
    seq = compensation.sequential if compensation is not None else True
    spec = RouterSpec.from_config(fam, ckpt.config)
    return AtomTransform(spec, keep=keep, layout=layout, refit=refit, sequential=seq, info=info)


def job_profile(job: Job) -> Any:
    """The given profile, or one measured now on the job's tokens (an engine pass, kept in memory)."""
    prof = job.profile()
    if prof is not None:
        return prof
    from ..profile.run import build_profile, collect

    t0 = time.time()
    tokens = job.tokens()
    return build_profile(job.ckpt, tokens, collect(job.ckpt, tokens, job.batch_size, job.device), time.time() - t0)


def atomic_prune(
    model: str | Path | None,
    output: str | Path,
    ratio: float,
    hessian: str = "full",
    layout: str = "uniform",
    score: str = "heapr",
    profile: str | Path | None = None,
    calib: str = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    rank: int = 32,
    protect_super: bool = True,
    device: torch.device | None = None,
    overwrite: bool = False,
    refit: bool = True,
    sequential: bool = True,
) -> dict[str, Any]:
    """Remove `ratio` of the routed experts' intermediate channels; write an HF folder to `output`.

    hessian: full | diag | lowrank (rank `rank`) approximation of G_e; layout: uniform (one width per model, a
    multiple of 16, loads in transformers) | exact (per-expert widths, loads with moecompress.load);
    score: heapr | magnitude (m_{e,j} alone, no gradient pass); refit: least-squares refit of the kept down_proj
    columns on the calibration tokens (``sequential``: on the already-pruned earlier layers).
    Returns the manifest written to moecompress.json as one flat dict (common fields + the "atom" section).
    """
    check_args(ratio, hessian, layout, score, rank)
    job = Job.prepare(
        model, output, calib=calib, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
        device=device, overwrite=overwrite, profile_dir=profile, op="atom", settings={"hessian": hessian},
    )  # fmt: skip
    job.profile()  # a given profile is checked against the model before any work
    check_layout(job.ckpt, layout, ratio)
    job.ckpt.family.check_routing(job.ckpt.config, "the down_proj refit", False, bool(refit), "use --refit none")
    tokens = job.tokens()
    prof = job_profile(job)
    scores, info = score_channels(job, prof, score, hessian, rank)
    supers = [tuple(x) for x in prof.super_experts] if protect_super else []
    comp = Compensation(tokens.input_ids, sequential, batch_size=batch_size, device=job.device) if refit else None
    assert job.out is not None
    return write_atomic(
        job.ckpt, job.out, scores, ratio, layout, supers, info, overwrite, job.started,
        [Path(profile)] if profile is not None else [], comp, tokens.input_ids, tokens.describe(),
    )  # fmt: skip


def write_atomic(
    ckpt: Checkpoint,
    out: Path,
    scores: dict[int, torch.Tensor],
    ratio: float,
    layout: str,
    supers: list[tuple[int, int]],
    info: dict[str, Any],
    overwrite: bool = False,
    t0: float | None = None,
    report_inputs: list[Path] | None = None,
    compensation: Compensation | None = None,
    input_ids: torch.Tensor | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Select channels from per-layer scores [E, I] and write the pruned folder in one engine pass; returns the
    manifest (flat: common fields + the "atom" section).

    info: method facts for the section (method, score, hessian, ...). compensation: refit the kept down_proj
    columns (atomic/compensate.py); None: plain slicing. input_ids [N, S]: the calibration windows the pass runs
    over (default: ``compensation.input_ids``; without a refit nothing reads the activations and one window, or one
    token when none is given, runs).
    """
    t0 = time.time() if t0 is None else t0
    t = atom_transform(ckpt, scores, ratio, layout, supers, info, compensation)
    ids = input_ids if input_ids is not None else compensation.input_ids if compensation is not None else None
    if not t.wants_inputs:  # nothing reads the activations: the pass runs over one window (one token if none given)
        ids = ids[:1] if ids is not None else torch.zeros(1, 1, dtype=torch.long)
    elif ids is None:
        raise ValueError("write_atomic needs the calibration windows (input_ids) to refit on")
    batch_size = compensation.batch_size if compensation is not None else 8
    device = compensation.device if compensation is not None else None
    engine = Engine(ckpt, ids, batch_size, device, "atomic prune")
    with Output(out, overwrite) as o:
        o.add_globals(ckpt, [t])
        engine.run([t], emit=o.add_layer)
        config = ckpt.config.to_dict()
        t.config(config)
        section = t.section()
        warnings = section.pop("warnings")
        man = Manifest(
            command=COMMAND, layout=section["layout"],
            load_with="transformers" if layout == "uniform" else "moecompress.load",
            source_model=str(ckpt.path), source_fingerprint=ckpt.fingerprint, calibration=calibration,
            params_before=ckpt.num_params, bytes_before=ckpt.bytes_on_disk, warnings=warnings,
        )  # fmt: skip
        man.add("atom", section)
        o.finish(
            ckpt, config, man, extra_json={"atomic_channels.json": t.channels}, report_inputs=report_inputs or [],
            elapsed=time.time() - t0,
        )  # fmt: skip
    flat = {k: v for k, v in man.to_dict().items() if k != "stages"}
    return {**flat, **section}


def transform_for_recipe(job: Any, options: dict[str, Any], profile: Any) -> AtomTransform:
    """An ``atom: {ratio: R, score: heapr|magnitude, refit: down|none}`` recipe stage (compress): the uniform layout
    (one width, a multiple of 16, for every routed expert), the single command's defaults (HEAPr with full G,
    down_proj refit). Scores come from the source model before the compression pass (``profile``'s m; HEAPr adds
    its gradient pass); each expert keeps its own top-K channels by its source expert's scores (an earlier stage
    that removes experts says which remain in ``ctx.extra["expert_ids"]``; experts without that map, e.g. merged
    ones, are ranked by moments measured on the block as it is, with a warning in the section)."""
    ratio, score = float(options["ratio"]), str(options.get("score", "heapr"))
    refit = Refit() if options.get("refit", "down") != "none" else None
    ckpt = job.ckpt
    instead = "an atom stage writes one uniform width, so run `moecompress prune --granularity atom --layout exact`"
    K = check_layout(ckpt, "uniform", ratio, instead)
    ckpt.family.check_routing(ckpt.config, "the atom stage's refit", False, refit is not None, "give it refit: none")
    scores, info = score_channels(job, profile if profile is not None else job_profile(job), score)
    info = {
        **info, "ratio": ratio, "width_key": width_key(ckpt.config), "protected": [],
        "protection": "none (uniform width)", "compensation": refit.describe() if refit is not None else None,
    }  # fmt: skip
    spec = RouterSpec.from_config(ckpt.family, ckpt.config)
    return AtomTransform(spec, scores=scores, width=K, refit=refit, info=info)
