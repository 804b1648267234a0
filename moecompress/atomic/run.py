"""Atomic (neuron-level) pruning of routed experts with HEAPr scores: the library entry point.

    atomic_prune(model, output, ratio, hessian="full", layout="uniform", profile=None, ...)

1. the profile (given, or measured first) supplies m_{e,j} (channel second moments) and the super experts;
2. one forward + backward of the LM loss per calibration batch yields G_e per MoE layer (gradstats);
3. scores s_{e,j} = m_{e,j} w_j^T G_e w_j (or m alone with score="magnitude"), ranked globally;
4. uniform layout: every routed expert keeps its own top-K channels, K one multiple of 16 for the whole model;
   exact layout: the globally lowest channels go, experts keep unequal widths (loaded by moecompress.load);
5. compensation (default on, atomic/compensate.py): each expert's kept down_proj columns are refitted by least
   squares on its routed tokens, layer by layer on the already-pruned earlier layers;
6. the writer puts out a normal HF folder + moecompress.json.

Scaling: the gradient pass is layer-streamed (atomic/gradstream.py): one decoder layer's weights and one layer's
G accumulators in memory at a time (full G: E x H^2 floats for that layer only; diag: E x H; lowrank: E x H(2r+1)),
plus the cached inputs of every layer and one gradient ((L + 1) x N x S x H floats, spilled to disk past a bound
and read back one batch at a time). Scores are computed per layer as soon as its G is complete (G upcast one
expert at a time); the writer slices one pruned layer at a time. `gradient_pass` (whole model in memory) remains
for small models and benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..calibration.sets import calibration_set, check_seq_len
from ..core.checkpoint import Checkpoint
from ..core.errors import UserError
from ..core.families import MoEWeights
from ..core.progress import console, progress_bar
from ..core.writer import check_output, write_checkpoint
from .apply import ExactLayer
from .compensate import Compensation, compensated_downs, slice_layer, with_downs
from .gradstats import KINDS, LayerGradStats, bytes_per_expert, collect_grad_stats
from .gradstream import streamed_grad_stats
from .heapr import heapr_scores, mask_to_indices, select_exact, select_uniform, uniform_width

LAYOUTS = ("uniform", "exact")
SCORES = ("heapr", "magnitude")
WIDTH_MULTIPLE = 16


def width_key(config: Any) -> str:
    """config key holding the routed experts' intermediate width."""
    return "moe_intermediate_size" if getattr(config, "moe_intermediate_size", None) else "intermediate_size"


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
    """G_e (and optionally m) for every MoE layer; `layer_groups` > 1 repeats the pass per group of layers."""
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
                )
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
    """HEAPr scores per MoE layer from the layer-streamed gradient pass; each layer's G is dropped once scored."""
    n_layers = ckpt.config.num_hidden_layers

    def score(l: int, st: LayerGradStats, experts: torch.nn.Module) -> torch.Tensor:
        return heapr_scores(m[l], experts.down_proj.detach().float().cpu(), st.G)  # [E, I]

    with progress_bar() as bar:
        task = bar.add_task(f"gradient pass ({hessian} G)", total=2 * n_layers + 1)
        return streamed_grad_stats(
            ckpt, input_ids, hessian, rank, batch_size, device, on_layer=score, progress=lambda _: bar.advance(task)
        )


def channel_scores(
    ckpt: Checkpoint, m: dict[int, torch.Tensor], stats: dict[int, torch.Tensor] | None, score: str
) -> dict[int, torch.Tensor]:
    """Per MoE layer [E, I] scores (float64): the streamed HEAPr scores, or m alone for score="magnitude"."""
    if score == "magnitude":
        return {l: m[l].double() for l in ckpt.moe_layers}
    assert stats is not None
    return stats


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


def select(
    scores: dict[int, torch.Tensor],
    ratio: float,
    layout: str,
    protected: dict[int, torch.Tensor],
    top_k: int,
    n_group: int = 1,
) -> tuple[dict[int, list[torch.Tensor]], int | None]:
    """Kept channel indices per layer and expert; the common width for the uniform layout."""
    layers = sorted(scores)
    if layout == "uniform":
        K = uniform_k(scores[layers[0]].shape[1], ratio)
        return {l: list(select_uniform(scores[l], K)) for l in layers}, K
    try:
        masks = select_exact([scores[l] for l in layers], ratio, [protected[l] for l in layers])
    except ValueError as err:
        raise UserError(f"{err}: lower --ratio or pass --no-protect-super") from None
    keep = {}
    for l, mask in zip(layers, masks, strict=True):
        alive = int(mask.any(dim=1).sum())
        if alive < top_k:
            raise UserError(
                f"--ratio {ratio} leaves layer {l} with {alive} experts that have channels, fewer than top-k {top_k}: "
                "lower --ratio"
            )
        if n_group > 1 and alive < mask.shape[0]:
            raise UserError(
                f"--ratio {ratio} empties {mask.shape[0] - alive} expert(s) of layer {l}, which a group-limited router "
                f"(n_group={n_group}) cannot lose: lower --ratio or use --layout uniform"
            )
        keep[l] = mask_to_indices(mask)
    return keep, None


def pruned_tensors(
    ckpt: Checkpoint,
    keep: dict[int, list[torch.Tensor]],
    layout: str,
    downs: dict[int, list[torch.Tensor]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """All output tensors (hub names): routed experts/routers of MoE layers sliced, everything else copied.

    downs: refitted down projections per layer and old expert id (``compensated_downs``) replacing the sliced ones.
    Each MoE layer is read and sliced when the writer reaches it and dropped after its tensors are handed out,
    so one pruned layer is in memory at a time.
    """
    fam = ckpt.family
    patterns = [fam.routed_key_pattern(l) for l in keep]

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        for key in ckpt.keys():
            if not any(p.match(key) for p in patterns):
                yield key, ckpt.get(key)
        for l, k in keep.items():
            w = slice_layer(ckpt.moe_weights(l), k, layout)
            if downs is not None:
                w = with_downs(w, downs[l])
            tensors = _layer_tensors(fam, w, l)
            del w
            for name in list(tensors):
                yield name, tensors.pop(name)

    return gen()


def _layer_tensors(fam: Any, w: MoEWeights | ExactLayer, layer: int) -> dict[str, torch.Tensor]:
    return fam.write_layer(w, layer)  # exact layers hold per-expert lists of unequal widths


def _profile(
    ckpt: Checkpoint, calib: str, samples: int, seq_len: int, seed: int, batch_size: int, device: torch.device | None
) -> Any:
    """Profile in memory (no --profile given)."""
    from ..calibration.sets import load_tokenizer
    from ..profile.run import build_profile, collect

    t0 = time.time()
    tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, seed)
    return build_profile(ckpt, tokens, collect(ckpt, tokens, batch_size, device), time.time() - t0)


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
    Returns the manifest written to moecompress.json.
    """
    check_args(ratio, hessian, layout, score, rank)
    t0 = time.time()
    ckpt = Checkpoint(model)
    out = check_output(output, ckpt.path, overwrite)
    prof = None
    if profile is not None:
        from ..profile.run import Profile

        prof = Profile.load(profile)
        prof.check_model(ckpt)
        cal = prof.meta.get("calibration") or {}  # the profile's own tokens, so m and G see the same data
        if cal.get("name"):
            calib, samples, seq_len, seed = cal["name"], cal["samples"], cal["seq_len"], cal["seed"]
    check_seq_len(seq_len, ckpt.config)
    fam, layers, H = ckpt.family, ckpt.moe_layers, ckpt.config.hidden_size
    if (
        layout == "uniform"
        and getattr(ckpt.config, "n_shared_experts", 0)
        and width_key(ckpt.config) == ("moe_intermediate_size")
    ):
        raise UserError(
            f"{fam.name} sizes its shared experts from moe_intermediate_size, so a narrower uniform width would "
            "resize them: use --layout exact (loads with moecompress.load)"
        )
    if layout == "uniform":
        uniform_k(int(getattr(ckpt.config, width_key(ckpt.config))), ratio)  # refuse before any pass
    prof = prof or _profile(ckpt, calib, samples, seq_len, seed, batch_size, device)
    m = {l: prof.layer(l, "channel_sq_mean").float() for l in layers}  # [E, I]
    supers = [tuple(x) for x in prof.super_experts] if protect_super else []

    stats = None
    tokens = None
    if score == "heapr" or refit:
        from ..calibration.sets import load_tokenizer

        tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, seed)
    if score == "heapr":
        assert tokens is not None
        stats = streamed_scores(ckpt, m, tokens.input_ids, hessian, rank, batch_size, device)
    scores = channel_scores(ckpt, m, stats, score)
    info = {
        "method": "heapr" if score == "heapr" else "activation_magnitude",
        "score": "m_ej * w_j^T G_e w_j" if score == "heapr" else "m_ej",
        "hessian": hessian if score == "heapr" else None,
        "hessian_rank": rank if score == "heapr" and hessian == "lowrank" else None,
        "hessian_bytes_per_expert": bytes_per_expert(hessian, H, rank) if score == "heapr" else None,
        "calibration_fingerprint": (prof.meta.get("calibration") or {}).get("fingerprint"),
        "calibration": {"calib": calib, "samples": samples, "seq_len": seq_len, "seed": seed},
    }
    reports = [Path(profile)] if profile is not None else []
    comp = None
    if refit:
        assert tokens is not None
        comp = Compensation(tokens.input_ids, sequential, batch_size=batch_size, device=device)
    return write_atomic(ckpt, out, scores, ratio, layout, supers, info, overwrite, t0, reports, comp)


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
) -> dict[str, Any]:
    """Select channels from per-layer scores [E, I] and write the pruned folder; returns the manifest.

    info: method facts merged into the manifest (method, score, hessian, calibration, ...).
    compensation: refit the kept down_proj columns after selection (atomic/compensate.py); None: plain slicing.
    """
    t0 = time.time() if t0 is None else t0
    fam, layers, E, H = ckpt.family, ckpt.moe_layers, ckpt.num_experts, ckpt.config.hidden_size
    protected = {l: torch.tensor([(l, e) in supers for e in range(E)]) for l in layers}
    keep, K = select(scores, ratio, layout, protected, ckpt.top_k, fam.n_group(ckpt.config))

    I = scores[layers[0]].shape[1]
    total_ch = len(layers) * E * I
    kept_ch = sum(int(k.numel()) for l in layers for k in keep[l])
    removed_experts = {l: [e for e in range(E) if keep[l][e].numel() == 0] for l in layers}
    n_removed_experts = sum(len(v) for v in removed_experts.values())
    params_removed = (total_ch - kept_ch) * 3 * H + n_removed_experts * H  # gate+up rows, down cols, router rows
    config = ckpt.config.to_dict()
    layer_info: dict[str, Any] = {}
    if layout == "uniform":
        config[width_key(ckpt.config)] = K
    for l in layers:
        layer_info[str(l)] = {
            "kept_experts": [e for e in range(E) if keep[l][e].numel() > 0],
            "widths": [int(k.numel()) for k in keep[l] if k.numel() > 0],
        }
    warnings: list[str] = []
    if layout == "uniform" and supers:
        warnings.append(
            f"uniform layout: protected experts {[list(x) for x in supers]} keep only their top-{K} channels"
        )
    manifest: dict[str, Any] = {
        "command": "prune --granularity atom",
        "source_model": str(ckpt.path),
        "source_fingerprint": ckpt.fingerprint,
        **info,
        "ratio": ratio,
        "layout": "uniform" if layout == "uniform" else "atomic_exact",
        "width": K,
        "width_key": width_key(ckpt.config),
        "original_width": I,
        "routed_channels_total": total_ch,
        "routed_channels_removed": total_ch - kept_ch,
        "routed_channels_removed_fraction": (total_ch - kept_ch) / total_ch,
        "params_before": ckpt.num_params,
        "params_after": ckpt.num_params - params_removed,
        "params_removed": params_removed,
        "params_removed_fraction_of_all": params_removed / ckpt.num_params,
        "protected": [list(x) for x in supers],
        "protection": "whole" if layout == "exact" else "top-K channels only (uniform width)",
        "experts_removed_from_routing": {str(l): v for l, v in removed_experts.items() if v},
        "layers": layer_info,
        "load_with": "transformers" if layout == "uniform" else "moecompress.load",
        "compensation": compensation.describe() if compensation is not None else None,
        "bytes_before": ckpt.bytes_on_disk,
        "warnings": warnings,
    }
    downs = None
    if compensation is not None:
        downs, manifest["compensation_output_error"] = compensated_downs(ckpt, keep, layout, compensation)
    tensors = pruned_tensors(ckpt, keep, layout, downs)
    channels = {str(l): [k.tolist() for k in keep[l]] for l in layers}
    write_checkpoint(
        out, tensors, config, ckpt.side_files(), manifest, overwrite,
        extra_json={"atomic_channels.json": channels}, started=t0,
        report_inputs=report_inputs or [],
    )  # fmt: skip
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(
        f"atomic prune ({manifest['method']}, {layout}): removed {manifest['routed_channels_removed_fraction']:.1%} "
        f"of routed channels = {manifest['params_removed_fraction_of_all']:.1%} of all parameters -> {out}"
    )
    return manifest
