"""One MoE layer's merge (pure tensor functions, no I/O; errors are ValueError).

Per MoE layer (DESIGN.md section 5), given the block's calibration inputs x [T, H]:
  1. similarity: mean per-token cosine of expert outputs on sampled tokens (or router-logit similarity), unless a
     profile gives it;
  2. clusters: seeded k-means (``subspace``) or average-linkage hierarchical clustering on mean outputs
     (``average``, HC-SMoE); protected (super) experts stay alone; clusters never cross routing groups;
  3. merge: Sub-MoE shared-SVD merge at rank r (``subspace``) or frequency-weighted average (``average``);
  4. router rows: fitted on x so each merged expert receives its members' combined routing (or averaged).
With ``choose`` (the default), steps 3-4 become a measured choice per cluster (merge/choose.py) over two
clusterings (k-means and the output-error pruning choice), so a merged layer is never worse than pruning it on
held-out calibration tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..core.experts import Act
from ..core.families import MoEWeights
from ..core.limits import expert_chunk
from ..core.memprobe import probe
from ..core.stream import release_freed
from ..prune.order import RouterSpec
from .align import align_cluster
from .choose import Clustering, LayerFit, assemble, choose_clusters, parked, pruning_clustering, wide_experts
from .cluster import MergeTargetError, agglomerative_cluster, kmeans_cluster, labels_to_clusters
from .held import mapped_allocations
from .options import MergeOptions
from .refit import refit_down, routing_weights
from .router import fit_router_rows, merged_router_rows
from .similarity import gram_features, output_similarity, router_logit_similarity
from .subspace import merge_average, merge_subspace, rank_for


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
    *,
    act: Act,
    dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[MoEWeights, dict[str, Any]]:
    """Merge one MoE layer's routed experts into ``n_clusters`` experts.

    Args:
        w: the layer's view (gate/up [E, I, H], down [E, H, I], router [E, H]) in the dtype to write.
        x: [T, H] calibration inputs of the MoE block.
        n_clusters: experts after merging.
        top_k: the router's top-k.
        freqs: [E] routing frequencies (from a profile); None computes them from x.
        similarity: [E, E] expert similarity (from a profile); None computes it from x.
        protected: expert ids never merged with others.
        norm_topk: whether the router renormalizes the top-k weights (used by the down refit).
        n_group: routing groups (experts g*E/n_group.. stay in group g); clusters never cross groups.
        spec: how the router turns logits into top-k weights (needed by ``opts.choose``; default: softmax top-k).
        act: the experts' activation (``experts.act_fn``).
        dtypes: the dtype to write per field of ``w`` when ``w`` holds the same values wider (the engine's float32
            block of a bf16 checkpoint, used without a copy); default: the dtypes of ``w``.

    Returns:
        (merged view with n_clusters experts in ``dtypes``, info for the manifest).

    Raises:
        MergeTargetError: the protected experts leave k-means no room in a group.
    """
    clock = Clock(x.device)
    own = {k: v.dtype for k, v in vars(w).items() if v is not None}
    dtypes = {**own, **(dtypes or {})}
    if not opts.choose and dtypes != own:  # the single-kind merge computes in the dtypes it writes
        w = MoEWeights(**{k: None if v is None else v.to(dtypes[k]) for k, v in vars(w).items()})
    gen = torch.Generator().manual_seed(opts.seed)  # on the CPU: the same draws on every device
    xf = x.to(torch.float32)
    logits = xf @ w.router.to(torch.float32).T  # [T, E]
    if w.router_bias is not None:
        logits = logits + w.router_bias.to(torch.float32)
    if freqs is None:
        scores = logits if w.correction_bias is None else logits.sigmoid() + w.correction_bias.to(torch.float32)
        freqs = routing_frequency(scores, top_k).cpu()  # [E]
    # wide experts: from the similarity on, large temporaries are mapped and leave the process when freed (else the
    # similarity's freed into the C heap 90-250 MB on 16 experts of H 4096, I 1024, held through the searches)
    with mapped_allocations(opts.choose and wide_experts(w, xf.device)):
        clusters, similarity = cluster_layer(
            w, xf, logits, n_clusters, opts, gen, act, similarity, protected, n_group, clock
        )  # fmt: skip
        if opts.choose:
            spec = spec or RouterSpec(top_k=top_k, norm_topk=norm_topk)
            merged, info = choose_layer(
                w, xf, clusters, freqs, similarity, protected or [], n_group, spec, opts, gen, act, clock, dtypes
            )  # fmt: skip
        else:
            merged, info = merge_clusters(w, xf, logits, clusters, freqs, similarity, top_k, norm_topk, opts, gen, act)
            clock.lap("merge")
    info["seconds"] = clock.laps
    return merged, info


class Clock:
    """Seconds per phase of one layer's merge (synchronized on CUDA so a phase owns its kernels)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.laps: dict[str, float] = {}
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 3)
        self.t = now


def cluster_layer(
    w: MoEWeights,
    xf: torch.Tensor,
    logits: torch.Tensor,
    n_clusters: int,
    opts: MergeOptions,
    gen: torch.Generator,
    act: Act,
    similarity: torch.Tensor | None = None,
    protected: list[int] | None = None,
    n_group: int = 1,
    clock: Clock | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """The layer's clusters (old expert ids; k-means on the similarity, or HC-SMoE average linkage on mean outputs),
    never across routing groups, protected experts alone; returns them with the [E, E] similarity used."""
    E = w.num_experts
    sample = xf[torch.randperm(xf.shape[0], generator=gen)[: opts.sim_tokens].to(xf.device)]  # [Ts, H]
    if similarity is None or opts.method == "average":
        measured, mean = output_similarity(sample, w.gate, w.up, w.down, act)  # [E, E], [E, H]
        if similarity is None:
            similarity = measured if opts.similarity == "output" else router_logit_similarity(logits)
        mean_out = F.normalize(mean.double(), dim=-1).cpu()  # [E, H]
    similarity = similarity.cpu()
    if clock is not None:
        clock.lap("similarity")
    probe("merge: similarity")
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
            raise MergeTargetError(f"cannot cluster group {g} of {Eg} experts into {Kg}: {err}", "unprotect") from None
        labels[idx] = local + g * Kg
    if clock is not None:
        clock.lap("clustering")
    probe("merge: clustered")
    return labels_to_clusters(labels), similarity


def merge_clusters(
    w: MoEWeights,
    xf: torch.Tensor,
    logits: torch.Tensor,
    clusters: list[list[int]],
    freqs: torch.Tensor,
    similarity: torch.Tensor,
    top_k: int,
    norm_topk: bool,
    opts: MergeOptions,
    gen: torch.Generator,
    act: Act,
) -> tuple[MoEWeights, dict[str, Any]]:
    """One merge kind for every cluster (``opts.method``, aligned and refitted as asked) and rebuilt router rows."""
    align_x = xf[torch.randperm(xf.shape[0], generator=gen)[: opts.align_tokens].to(xf.device)]  # [Ta, H]
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
            mg, mu, md = align_cluster(align_x, mg, mu, md, int(f.argmax()), act, opts.align_block)
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
            down[-1] = refit_down(xf, route_w, members, w.gate, w.up, w.down, gate[-1], up[-1], down[-1], act_fn=act)

    if opts.router == "fit" and w.correction_bias is None:
        fit_x = xf[torch.randperm(xf.shape[0], generator=gen)[: opts.fit_tokens].to(xf.device)]
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
        "old_to_new": _old_to_new(clusters, w.num_experts),
        "ranks": ranks,
        "frequency": [round(float(v), 6) for v in freqs],
        "cluster_sizes": [len(m) for m in clusters],
        "mean_within_cluster_similarity": round(sum(within) / len(within), 4) if within else None,
    }
    return merged, info


def _old_to_new(clusters: list[list[int]], n_experts: int) -> list[int]:
    """labels [E]: the new expert each old expert went into."""
    labels = [0] * n_experts
    for j, m in enumerate(clusters):
        for e in m:
            labels[e] = j
    return labels


def choose_layer(
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
    act: Act,
    clock: Clock | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[MoEWeights, dict[str, Any]]:
    """Measured per-cluster choice over two clusterings (merge/choose.py); returns the best layer (in ``dtypes``,
    default those of ``w``) and its info."""
    clock = clock or Clock(xf.device)
    perm = torch.randperm(xf.shape[0], generator=gen).to(xf.device)
    n_eval = min(opts.eval_tokens, xf.shape[0] // 3)
    # disjoint; the fit rows are picked before they are copied (not a [T - n_eval, H] copy sliced to fit_tokens:
    # 56 MB at 32k tokens of H 512, 2 GB at 262k tokens of H 2048, held until ``fit.x`` replaced it); the fit rows,
    # then the measure rows, gathered at once: LayerFit holds that tensor as ``fit.x`` (no second [Tc, H] copy)
    x_all = xf[torch.cat([perm[n_eval:][: opts.fit_tokens], perm[:n_eval]])]
    n_fit = x_all.shape[0] - n_eval
    x_fit, x_eval = x_all[:n_fit], x_all[n_fit:]
    del x_all
    fit = LayerFit(w, x_fit, x_eval, spec, act, dtypes)
    x_fit = fit.x[: fit.n_fit]  # the same values: the copies made above are not held beside ``fit.x``
    del x_eval
    clock.lap("layer outputs")
    probe("merge: layer outputs")
    dominant = [m[int(freqs[m].argmax())] for m in clusters]
    options = [Clustering("k-means", clusters, dominant)]
    options.append(pruning_clustering(fit, len(clusters), protected, similarity, n_group))
    clock.lap("pruning order")
    probe("merge: pruning order")

    def rank_fn(m: torch.Tensor) -> int:
        return rank_for(m.shape[1], m.shape[2], m.shape[0], opts.rank, opts.rank_fraction)

    tried: list[tuple[float, Clustering, float]] = []  # (error, clustering, error at start)
    # the best so far (only its candidates are held): (error, clustering, candidates, per-token errors [n_M])
    kept: tuple[float, Clustering, Callable[[], list[Any]], torch.Tensor] | None = None
    x_align = x_fit[: opts.align_tokens]
    cache = cached_clusters(w, len(clusters), opts, fit.dtypes["gate"], xf.device)
    order = list(reversed(options))  # the pruning choice first: another clustering must be clearly better
    if {"subspace", "subspace+refit", "average", "average+refit"} & set(opts.candidates):
        fit.fit_router_rows(order)  # before the starts: the router fit's factor is not read during the searches
        probe("merge: router rows")
    starts: list[Any] = []
    if "keep+refit" in opts.candidates:  # every search starts from the pruning refit, which needs no expert outputs:
        # every clustering starts now (in the same order, so from the same cache), and the cached original outputs
        # ([T, k+1, H] float32, 302 MB on the Qwen3-30B-shaped layer) are not held through the searches
        starts = [fit.start(c, outputs=False) for c in order]
        fit.src = None
        for _, state in starts[1:]:  # each waits through the searches before its own
            state.park()
        probe("merge: starts")
    for i, c in enumerate(order):
        chosen, start, err, d2 = choose_clusters(
            fit, c, freqs, x_align, opts.candidates, opts.aligned, rank_fn, align_block=opts.align_block, clock=clock,
            cache=cache, min_gain_se=opts.min_gain_se, last=i == len(order) - 1,
            begun=starts.pop(0) if starts else None,
        )  # fmt: skip
        tried.append((err, c, start))
        if kept is None or kept[0] - err > opts.min_gain_se * _paired_se(d2 - kept[3], fit.norm):
            # the best so far waits through the next searches (if any) in files: its own refitted downs and merges
            kept = (err, c, parked(chosen, w, wait=i < len(order) - 1), d2)
        del chosen
        if fit.trim:
            release_freed()
        probe(f"merge: searched {c.name}")
    assert kept is not None
    err, best, back, _ = kept
    chosen = back()
    err_all = None
    if opts.final_refit and any(c.kind.endswith("+refit") for c in chosen):
        err_all = fit.routed(chosen).refit_all(chosen)
        clock.lap("final refit")
    probe("merge: final refit")
    dtypes, n_fit = fit.dtypes, x_fit.shape[0]
    # the tokens, y and the router fit go before the merged layer is built beside the old one (x_align, x_fit: views
    # of fit.x): at DeepSeek-V3 dims, 2 x [4,096, 7,168] float32 and more, held while 0.7 GB of merged experts are made
    del fit, x_fit, x_align, kept, back
    merged = assemble(chosen, w, dtypes)
    within = [float(similarity[m][:, m].mean()) for m in best.clusters if len(m) > 1]
    info = {
        "clusters": best.clusters,
        "old_to_new": _old_to_new(best.clusters, w.num_experts),
        "clustering": best.name,
        "kept_as_is": best.dominant,
        "choices": [c.kind for c in chosen],
        "ranks": [
            _ranks(w, len(m), opts) if c.kind.startswith("subspace") else None
            for m, c in zip(best.clusters, chosen, strict=True)
        ],
        "output_error": round(err, 6),
        "output_error_pruning": round(next(t[2] for t in tried if t[1].name == "pruning"), 6),
        "output_error_by_clustering": {t[1].name: round(t[0], 6) for t in tried},
        "output_error_after_final_refit": None if err_all is None else round(err_all, 6),
        "eval_tokens": n_eval,
        "fit_tokens": n_fit,
        "frequency": [round(float(v), 6) for v in freqs],
        "cluster_sizes": [len(m) for m in best.clusters],
        "mean_within_cluster_similarity": round(sum(within) / len(within), 4) if within else None,
    }
    return merged, info


def _paired_se(delta: torch.Tensor, norm: float) -> float:
    """Standard error of the mean squared-error change over the measure tokens (per-token changes ``delta``),
    on the scale of the relative error (sum / ``norm``)."""
    n = delta.shape[0]
    if n < 2:
        return 0.0
    return float(delta.std()) * n**0.5 / norm


# merge candidates kept between sweeps: at most this fraction of the layer's experts (0: one cluster's; the others are
# merged again in the next sweep, the same tensors: on the Qwen3-30B-shaped layer 0.5 held ~0.6 GB at the peak)
STATE_LAYER_FRACTION = 0.0


def cached_clusters(
    w: MoEWeights, n_clusters: int, opts: MergeOptions, dtype: torch.dtype, device: torch.device | None = None
) -> int:
    """Clusters whose merge candidates are kept from one sweep to the next (``choose_clusters``' cache; the others
    are merged again): ``core.limits.expert_chunk`` of one cluster's candidates (a quarter of ``--max-memory``,
    else of the free memory) and at most ``STATE_LAYER_FRACTION`` of the layer's experts in ``dtype``. One
    cluster's candidates: gate, up, down of the subspace merge, and of the average when the rank is truncated."""
    E, I, H = w.gate.shape
    expert = 3 * I * H * torch.empty(0, dtype=dtype).element_size()  # bytes of one merged expert
    per = expert * (1 if opts.rank is None and opts.rank_fraction is None else 2)
    return max(1, min(expert_chunk(n_clusters, per, device), int(STATE_LAYER_FRACTION * E * expert) // per))


def _ranks(w: MoEWeights, n: int, opts: MergeOptions) -> dict[str, int]:
    I, H = w.gate.shape[1], w.gate.shape[2]
    return {
        "gate": rank_for(I, H, n, opts.rank, opts.rank_fraction),
        "up": rank_for(I, H, n, opts.rank, opts.rank_fraction),
        "down": rank_for(H, I, n, opts.rank, opts.rank_fraction),
    }
