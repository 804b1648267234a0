"""`moecompress merge`: cluster each MoE layer's experts and merge every cluster into ONE expert.

Per MoE layer (DESIGN.md section 5):
  1. calibration inputs x of the MoE block, from a layer-streamed pass (one decoder layer in memory);
  2. similarity: mean per-token cosine of expert outputs on sampled tokens (or router-logit similarity),
     from the profile when one is given;
  3. clusters: seeded k-means (``subspace``) or average-linkage hierarchical clustering on mean outputs
     (``average``, HC-SMoE); protected (super) experts stay alone;
  4. merge: Sub-MoE shared-SVD merge at rank r (``subspace``) or frequency-weighted average (``average``);
  5. router rows: fitted on x so each merged expert receives its members' combined routing (or averaged).
With ``choose`` (the default), steps 4-5 become a measured choice per cluster (merge/choose.py): keep the dominant
member with its router row (= pruning), subspace merge or average, each with or without a least-squares refit of
its down projection to the layer output; clusterings are the k-means one and the pruning choice (output-error
pruning's kept experts, each removed expert joining its most similar kept one), so clusters differ in size; the
lowest routed-output error on held-out calibration tokens wins, so a merged layer is never worse than pruning it
on those tokens. With ``sequential`` (the default) every layer is calibrated on the already-merged earlier layers.
The output is a normal HF folder with fewer experts per layer (uniform count) and moecompress.json.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.checkpoint import Checkpoint
from ..core.errors import UserError
from ..core.families import MoEWeights
from ..core.writer import check_output, write_checkpoint
from ..prune.run import RouterSpec
from .align import align_cluster
from .choose import KINDS, Clustering, LayerFit, assemble, choose_clusters, pruning_clustering
from .cluster import agglomerative_cluster, check_merge_target, kmeans_cluster, labels_to_clusters
from .cluster import n_clusters_for as n_clusters_for
from .refit import refit_down, routing_weights
from .router import fit_router_rows, merged_router_rows
from .similarity import expert_outputs, gram_features, output_similarity, router_logit_similarity
from .subspace import merge_average, merge_subspace, rank_for

METHODS = ("subspace", "average")
ROUTER_REBUILDS = ("fit", "average")
SIMILARITIES = ("output", "router")


@dataclass(frozen=True)
class MergeOptions:
    """Everything that decides a merge (recorded in moecompress.json)."""

    ratio: float
    method: str = "subspace"
    rank: int | None = None
    rank_fraction: float | None = None
    router: str = "fit"
    similarity: str = "output"
    protect_super: bool = True
    align: bool | None = None  # neuron alignment before merging; None: on for subspace, off for average (HC-SMoE)
    align_tokens: int = 2048
    refit: bool | None = None  # least-squares refit of merged down projections; None: on for subspace only
    sim_tokens: int = 512
    fit_tokens: int = 8192
    kl_steps: int = 20
    seed: int = 0
    choose: bool = True  # measure keep/subspace/average (+refit) per cluster and keep the best (merge/choose.py)
    candidates: tuple[str, ...] = KINDS
    eval_tokens: int = 4096  # choose: held-out calibration tokens the candidates are measured on
    sequential: bool = True  # calibrate each layer on the already-merged earlier layers

    @property
    def aligned(self) -> bool:
        return self.method == "subspace" if self.align is None else self.align

    @property
    def refitted(self) -> bool:
        return self.method == "subspace" if self.refit is None else self.refit

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} must be between 0 and 1 (the fraction of experts merged away)")
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.router not in ROUTER_REBUILDS:
            raise UserError(f"--router {self.router!r} is not one of {', '.join(ROUTER_REBUILDS)}")
        if self.similarity not in SIMILARITIES:
            raise UserError(f"--similarity {self.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if self.rank is not None and self.rank_fraction is not None:
            raise UserError("give either --rank or --rank-fraction, not both")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"--rank {self.rank} must be at least 1")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise UserError(f"--rank-fraction {self.rank_fraction} must be in (0, 1]")
        if self.method == "average" and (self.rank is not None or self.rank_fraction is not None):
            raise UserError("--rank/--rank-fraction apply to --method subspace only")
        if self.sim_tokens < 2 or self.fit_tokens < 1:
            raise UserError("--sim-tokens must be at least 2 and --fit-tokens at least 1")
        bad = [k for k in self.candidates if k not in KINDS]
        if bad or not self.candidates:
            raise UserError(f"merge candidates {bad or '(none)'} are not among {', '.join(KINDS)}")
        if self.eval_tokens < 1:
            raise UserError(f"eval_tokens {self.eval_tokens} must be at least 1")


def routing_frequency(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """phi_e = |X_e| / (k T) from router logits [T, E] -> [E] (top-k of the logits = top-k of the softmax)."""
    idx = logits.topk(top_k, dim=1).indices  # [T, k]
    counts = torch.bincount(idx.flatten(), minlength=logits.shape[1]).to(torch.float64)
    return counts / max(idx.numel(), 1)


def merge_layer(
    w: MoEWeights,
    x: torch.Tensor,
    n_clusters: int,
    top_k: int,
    opts: MergeOptions,
    freqs: torch.Tensor | None = None,
    similarity: torch.Tensor | None = None,
    protected: list[int] | None = None,
    n_group: int = 1,
    norm_topk: bool = True,
    spec: RouterSpec | None = None,
) -> tuple[MoEWeights, dict[str, Any]]:
    """Merge one MoE layer's routed experts into ``n_clusters`` experts.

    Args:
        w: the layer's view (gate/up [E, I, H], down [E, H, I], router [E, H]); SwiGLU experts.
        x: [T, H] calibration inputs of the MoE block.
        n_clusters: experts after merging.
        top_k: the router's top-k.
        freqs: [E] routing frequencies (from a profile); None computes them from x.
        similarity: [E, E] expert similarity (from a profile); None computes it from x.
        protected: expert ids never merged with others.
        norm_topk: whether the router renormalizes the top-k weights (used by the down refit).
        n_group: routing groups (experts g*E/n_group.. stay in group g); clusters never cross groups.
        spec: how the router turns logits into top-k weights (needed by ``opts.choose``; default: softmax top-k).

    Returns:
        (merged view with n_clusters experts, info for the manifest).
    """
    gen = torch.Generator().manual_seed(opts.seed)
    E = w.num_experts
    xf = x.to(torch.float32)
    logits = xf @ w.router.to(torch.float32).T  # [T, E]
    if w.router_bias is not None:
        logits = logits + w.router_bias.to(torch.float32)
    if freqs is None:
        scores = logits if w.correction_bias is None else logits.sigmoid() + w.correction_bias.to(torch.float32)
        freqs = routing_frequency(scores, top_k)  # [E]
    sample = xf[torch.randperm(xf.shape[0], generator=gen)[: opts.sim_tokens]]  # [Ts, H]
    outputs = expert_outputs(sample, w.gate, w.up, w.down)  # [E, Ts, H]
    if similarity is None:
        similarity = output_similarity(outputs) if opts.similarity == "output" else router_logit_similarity(logits)
    mean_out = F.normalize(outputs.mean(dim=1).double(), dim=-1)  # [E, H]
    # Group-limited routing (DeepSeek): cluster inside each group so new experts stay group-contiguous.
    Eg, Kg = E // n_group, n_clusters // n_group
    labels = torch.empty(E, dtype=torch.long)
    for g in range(n_group):
        idx = torch.arange(g * Eg, (g + 1) * Eg)
        prot = [p - g * Eg for p in protected or () if g * Eg <= p < (g + 1) * Eg]
        try:
            if opts.method == "subspace":
                local = kmeans_cluster(gram_features(similarity[idx][:, idx]), Kg, prot, seed=opts.seed)
            else:  # HC-SMoE: average linkage on the cosine distance of mean expert outputs
                m = mean_out[idx]
                local = agglomerative_cluster(1.0 - m @ m.T, Kg, prot)
        except ValueError as err:
            raise UserError(f"cannot merge: {err}; use a smaller --ratio or --no-protect") from None
        labels[idx] = local + g * Kg
    clusters = labels_to_clusters(labels)
    if opts.choose:
        spec = spec or RouterSpec(top_k=top_k, norm_topk=norm_topk)
        return _choose_layer(w, xf, clusters, freqs, similarity, protected or [], n_group, spec, opts, gen)

    align_x = xf[torch.randperm(xf.shape[0], generator=gen)[: opts.align_tokens]]  # [Ta, H]
    route_w = None
    if opts.refitted and w.correction_bias is None:
        route_w = routing_weights(logits, top_k, norm_topk)  # [T, E]
    gate, up, down, ranks = [], [], [], []
    for members in clusters:
        f = freqs[members]
        if len(members) == 1:
            gate.append(w.gate[members[0]])
            up.append(w.up[members[0]])
            down.append(w.down[members[0]])
            ranks.append(None)
            continue
        r: dict[str, int | None] = {}
        mg, mu, md = w.gate[members], w.up[members], w.down[members]  # [n, I, H], [n, I, H], [n, H, I]
        if opts.aligned:
            mg, mu, md = align_cluster(align_x, mg, mu, md, ref=int(f.argmax()))
        for name, m, dst in (("gate", mg, gate), ("up", mu, up), ("down", md, down)):
            if opts.method == "average":
                dst.append(merge_average(m, f))
                r[name] = None
            else:
                rk = rank_for(m.shape[1], m.shape[2], len(members), opts.rank, opts.rank_fraction)
                dst.append(merge_subspace(m, f, rk))
                r[name] = rk
        ranks.append(r)
        if route_w is not None:
            down[-1] = refit_down(xf, route_w, members, w.gate, w.up, w.down, gate[-1], up[-1], down[-1])

    if opts.router == "fit" and w.correction_bias is None:
        fit_x = xf[torch.randperm(xf.shape[0], generator=gen)[: opts.fit_tokens]]
        rows, bias = fit_router_rows(fit_x, w.router, clusters, bias=w.router_bias, kl_steps=opts.kl_steps)
    else:
        rows, bias = merged_router_rows(w.router, clusters, freqs, bias=w.router_bias)
    corr = None
    if w.correction_bias is not None:
        corr = torch.stack([w.correction_bias[m].double().mean() for m in clusters]).to(w.correction_bias.dtype)
    merged = MoEWeights(
        gate=torch.stack(gate), up=torch.stack(up), down=torch.stack(down), router=rows, router_bias=bias,
        correction_bias=corr,
    )  # fmt: skip
    within = [float(similarity[m][:, m].mean()) for m in clusters if len(m) > 1]
    info = {
        "clusters": clusters,
        "old_to_new": labels.tolist(),
        "ranks": ranks,
        "frequency": [round(float(v), 6) for v in freqs],
        "cluster_sizes": [len(m) for m in clusters],
        "mean_within_cluster_similarity": round(sum(within) / len(within), 4) if within else None,
    }
    return merged, info


def _choose_layer(
    w: MoEWeights,
    xf: torch.Tensor,
    clusters: list[list[int]],
    freqs: torch.Tensor,
    similarity: torch.Tensor,
    protected: list[int],
    n_group: int,
    spec: RouterSpec,
    opts: MergeOptions,
    gen: torch.Generator,
) -> tuple[MoEWeights, dict[str, Any]]:
    """Measured per-cluster choice over two clusterings (merge/choose.py); returns the best layer and its info."""
    perm = torch.randperm(xf.shape[0], generator=gen)
    n_eval = min(opts.eval_tokens, xf.shape[0] // 3)
    x_eval, x_fit = xf[perm[:n_eval]], xf[perm[n_eval:]][: opts.fit_tokens]  # disjoint
    fit = LayerFit(w, x_fit, x_eval, spec)
    dominant = [m[int(freqs[m].argmax())] for m in clusters]
    options = [Clustering("k-means", clusters, dominant)]
    options.append(pruning_clustering(fit, len(clusters), protected, similarity, n_group))

    def rank_fn(m: torch.Tensor) -> int:
        return rank_for(m.shape[1], m.shape[2], m.shape[0], opts.rank, opts.rank_fraction)

    tried = []
    for c in options:
        chosen, start, err = choose_clusters(fit, c, freqs, x_fit, opts.candidates, opts.aligned, rank_fn)
        tried.append((err, c, chosen, start))
    err, best, chosen, _ = min(tried, key=lambda t: t[0])
    merged = assemble(chosen, w)
    labels = torch.empty(w.num_experts, dtype=torch.long)
    for j, m in enumerate(best.clusters):
        labels[m] = j
    within = [float(similarity[m][:, m].mean()) for m in best.clusters if len(m) > 1]
    info = {
        "clusters": best.clusters,
        "old_to_new": labels.tolist(),
        "clustering": best.name,
        "kept_as_is": best.dominant,
        "choices": [c.kind for c in chosen],
        "ranks": [
            _ranks(w, len(m), opts) if c.kind.startswith("subspace") else None
            for m, c in zip(best.clusters, chosen, strict=True)
        ],
        "output_error": round(err, 6),
        "output_error_pruning": round(next(t[3] for t in tried if t[1].name == "pruning"), 6),
        "output_error_by_clustering": {t[1].name: round(t[0], 6) for t in tried},
        "eval_tokens": n_eval,
        "fit_tokens": x_fit.shape[0],
        "frequency": [round(float(v), 6) for v in freqs],
        "cluster_sizes": [len(m) for m in best.clusters],
        "mean_within_cluster_similarity": round(sum(within) / len(within), 4) if within else None,
    }
    return merged, info


def _ranks(w: MoEWeights, n: int, opts: MergeOptions) -> dict[str, int]:
    I, H = w.gate.shape[1], w.gate.shape[2]
    return {
        "gate": rank_for(I, H, n, opts.rank, opts.rank_fraction),
        "up": rank_for(I, H, n, opts.rank, opts.rank_fraction),
        "down": rank_for(H, I, n, opts.rank, opts.rank_fraction),
    }


def _protected_experts(ckpt: Checkpoint, profile: Any | None, opts: MergeOptions) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {l: [] for l in ckpt.moe_layers}
    if profile is not None and opts.protect_super:
        for l, e in profile.super_experts:
            if l in out:
                out[l].append(int(e))
    return out


DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def expected_size(ckpt: Checkpoint, n_clusters: int, unit: str = "bytes") -> int:
    """Tensor bytes (or parameters) of the checkpoint after merging every MoE layer to ``n_clusters`` experts.

    Safetensors headers are excluded: the bytes equal the output index's ``metadata.total_size``.
    """
    E = ckpt.num_experts
    patterns = [ckpt.family.routed_key_pattern(l) for l in ckpt.moe_layers]
    total = 0
    for key, meta in ckpt.tensor_info().items():
        n = 1
        for s in meta["shape"]:
            n *= s
        size = n * (DTYPE_BYTES[meta["dtype"]] if unit == "bytes" else 1)
        if any(p.match(key) for p in patterns):
            hub = re.search(r"\.experts\.(\d+)\.", key)
            if hub:  # one expert's projection: experts 0..K-1 remain
                size = size if int(hub.group(1)) < n_clusters else 0
            else:  # router rows / biases / fused expert tensors: leading dimension E
                size = size // E * n_clusters
        total += size
    return total


def expected_bytes(ckpt: Checkpoint, n_clusters: int) -> int:
    """Tensor bytes after merging (see ``expected_size``)."""
    return expected_size(ckpt, n_clusters, "bytes")


def _as_dtype(w: MoEWeights, dtype: torch.dtype) -> MoEWeights:
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return MoEWeights(
        cast(w.gate), cast(w.up), cast(w.down), cast(w.router), cast(w.router_bias), cast(w.correction_bias)
    )


def _capture_into(store: list[torch.Tensor]) -> Any:
    """A forward pre-hook that appends the MoE block's input tokens [T, H] to ``store``."""

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        store.append(h.detach().reshape(-1, h.shape[-1]).cpu())

    return hook


def merge_model(
    model: str | Path | None,
    output: str | Path,
    opts: MergeOptions,
    profile_dir: str | Path | None = None,
    calib: str = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    tokens: Any | None = None,
) -> dict[str, Any]:
    """Merge a checkpoint's experts and write OUTPUT (HF folder + moecompress.json). Returns the manifest.

    ``tokens`` (a ``data.TokenSet``) replaces ``calib``/``samples``/``seq_len`` when given (API use, tests).
    """
    from ..calibration.sets import calibration_set, check_seq_len, load_tokenizer
    from ..core.progress import console, progress_bar
    from ..core.stream import LayerStream, resolve_device
    from ..profile.run import Profile
    from ..prune.load import set_layer_experts

    opts.validate()
    ckpt = Checkpoint(model)
    out = check_output(output, ckpt.path, overwrite)
    cfg = ckpt.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"merge supports SwiGLU experts (hidden_act silu); this model uses {cfg.hidden_act!r}")
    E, top_k, fam = ckpt.num_experts, ckpt.top_k, ckpt.family
    spec = RouterSpec.from_config(fam, cfg)
    K = n_clusters_for(E, opts.ratio)
    n_group = fam.n_group(cfg)
    profile = None
    if profile_dir is not None:
        profile = Profile.load(profile_dir)
        profile.check_model(ckpt)
    protected = _protected_experts(ckpt, profile, opts)
    check_merge_target(E, K, top_k, max((len(v) for v in protected.values()), default=0), n_group)
    if tokens is None:
        check_seq_len(seq_len, cfg)
        tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, seed=opts.seed)
    dev = resolve_device(device)

    t0 = time.time()
    layers_info: dict[str, Any] = {}
    warnings: list[str] = []
    if profile is None and opts.protect_super:
        warnings.append("no --profile: super experts are unknown, so none is protected from merging")
    if opts.router == "fit" and fam.correction_bias:
        warnings.append(f"{fam.name} routes with sigmoid scores: router rows are frequency-weighted averages, not fit")
    manifest: dict[str, Any] = {
        "command": "merge",
        "layout": "uniform",
        "method": opts.method,
        "ratio": opts.ratio,
        "options": asdict(opts),
        "source_model": str(ckpt.path),
        "source_fingerprint": ckpt.fingerprint,
        "profile": str(Path(profile_dir).resolve()) if profile_dir is not None else None,
        "calibration": tokens.describe(),
        "calibration_fingerprint": tokens.fingerprint,
        "experts_before": E,
        "experts_after": K,
        "top_k": top_k,
        "n_group": n_group,
        "protected": sorted([l, e] for l, v in protected.items() for e in v),
        "similarity": f"{opts.similarity} ({'from the profile' if profile is not None else 'measured here'})",
        "router_rebuild": "ridge least squares to log-sum-exp of member logits, then LBFGS on KL"
        if opts.router == "fit"
        else "frequency-weighted average of member rows",
        "neuron_alignment": opts.aligned,
        "down_refit": opts.refitted and not fam.correction_bias,
        "choice": "per cluster, the lowest routed-output error on held-out calibration tokens among "
        f"{', '.join(opts.candidates)}; clusterings: k-means and the output-error pruning choice"
        if opts.choose
        else None,
        "propagation": "every layer is calibrated on the already-merged earlier layers"
        if opts.sequential
        else "every layer is calibrated on the original (unmerged) model's activations",
        "params_before": ckpt.num_params,
        "params_after": expected_size(ckpt, K, "params"),
        "bytes_before": ckpt.bytes_on_disk,
        "expected_tensor_bytes_after": expected_bytes(ckpt, K),
        "warnings": warnings,
        "layers": layers_info,
    }

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        moe = set(ckpt.moe_layers)
        for k in ckpt.keys():
            if not k.startswith("model.layers."):
                yield k, ckpt.get(k)
        stream = LayerStream(ckpt, tokens.input_ids, batch_size=batch_size, device=dev)
        n_layers = len(stream.decoder_layers)
        try:
            with progress_bar() as bar:
                task = bar.add_task("merge", total=n_layers)
                for l, layer in stream.layers():
                    bar.update(task, description=f"merge: layer {l + 1}/{n_layers}")
                    pat = fam.routed_key_pattern(l)
                    for k in ckpt.keys():
                        if k.startswith(f"model.layers.{l}.") and not (l in moe and pat.match(k)):
                            yield k, ckpt.get(k)
                    if l not in moe:
                        stream.forward_layer(layer)
                        bar.advance(task)
                        continue
                    xs: list[torch.Tensor] = []
                    hook = stream.moe_block(layer).register_forward_pre_hook(_capture_into(xs), with_kwargs=True)
                    try:
                        if opts.sequential:  # inputs only; the merged layer makes the next layer's inputs
                            with torch.no_grad():
                                for i in range(len(stream.cache)):
                                    stream.run_layer(layer, i)
                        else:
                            stream.forward_layer(layer)
                    finally:
                        hook.remove()
                    x = torch.cat(xs)  # [T, H]
                    freqs = sim = None
                    if profile is not None:
                        freqs = profile.layer(l, "frequency")
                        sim = profile.layer(l, f"{opts.similarity}_similarity")
                    merged, info = merge_layer(
                        ckpt.moe_weights(l), x, K, top_k, opts, freqs, sim, protected[l], n_group, spec.norm_topk, spec
                    )
                    layers_info[str(l)] = info
                    if opts.sequential:
                        set_layer_experts(stream.model, fam, l, _as_dtype(merged, stream.dtype))
                        stream.forward_layer(layer)
                    if freqs is not None and float(freqs.sum()) > 0:
                        never = [e for e in range(E) if float(freqs[e]) == 0]
                        if never:
                            warnings.append(f"layer {l}: experts {never} were never routed in the profile")
                    if progress:
                        console.print(f"merge: layer {l}: {E} -> {K} experts, cluster sizes {info['cluster_sizes']}")
                    yield from fam.write_layer(merged, l).items()
                    bar.advance(task)
        finally:
            stream.close()

    raw_cfg = json.loads((ckpt.path / "config.json").read_text())
    raw_cfg.update(fam.expert_count_updates(K))
    write_checkpoint(
        out, tensors(), raw_cfg, ckpt.side_files(), manifest, overwrite, started=t0,
        report_inputs=[Path(profile_dir)] if profile_dir is not None else [],
    )  # fmt: skip
    return manifest
