"""Per-cluster choice of the merge that serves the layer output best (pure tensor functions).

A merge that collapses a cluster to "keep one member as it is, with its router row" *is* pruning the other
members, so a merge can always do at least as well as pruning: measure the candidates and keep the best.

For one MoE layer with calibration tokens split into a fit part F and a disjoint measure part M:
  y(x)   = the original layer's routed output;  y'(x) = the merged layer's routed output (new router, new experts);
  error  = sum_{x in M} ||y'(x) - y(x)||^2 / sum_{x in M} ||y(x)||^2.
Each clustering (a list of clusters with a dominant member each) starts with every cluster at "keep the dominant";
then, cluster by cluster (coordinate descent, the others fixed), every candidate is built and measured:
  keep        the dominant member and its router row (what pruning does);
  subspace    aligned Sub-MoE merge (``merge_subspace``) with a router row fitted to the members' log-sum-exp;
  average     frequency-weighted average (HC-SMoE) with the fitted router row;
  +refit      the same with its down projection refitted on F by ridge least squares to the layer-output
              residual  r(x) = y(x) - (the other routed experts' part of y'(x)),  weighted by its routing weight;
and the candidate with the lowest error is kept (the current one stays unless another is strictly better).
The clustering with the lowest final error wins. With the pruning choice among the clusterings (its dominant
members = the experts pruning keeps), the merged layer's error on M is never above pruning's.
Memory: [T, K, H] merged-expert outputs and [T, E, H] original ones for T = |F| + |M| tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moecompress.core.experts import Act
from moecompress.core.families import MoEWeights
from moecompress.merge.align import activations, align_cluster
from moecompress.merge.refit import lstsq_down
from moecompress.merge.router import fit_router_rows
from moecompress.merge.subspace import merge_average, merge_subspace
from moecompress.prune.order import RouterSpec, output_error_order, outputs_by_token, route

KINDS = ("keep", "keep+refit", "subspace", "subspace+refit", "average", "average+refit")
CACHE_BYTES = 1 << 29  # activations and outputs of unrefitted candidates kept for reuse across sweeps (per layer)


def combine(outs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Routed output [T, H] from outs [T, K, H], weights and indices [T, k] (pruning.combine's values, with a
    row gather instead of ``Tensor.gather`` on an expanded index, ~2x faster on the CPU); with ``tokens`` [n]
    (token ids), only those tokens' outputs [n, H] (w, idx: [n, k], rows of those tokens)."""
    T, K, H = outs.shape
    ids = torch.arange(T, device=idx.device) if tokens is None else tokens
    rows = (idx + ids[:, None] * K).reshape(-1)  # [n k]
    picked = outs.reshape(T * K, H).index_select(0, rows).view(idx.shape[0], -1, H)  # [n, k, H]
    return (picked * w[:, :, None]).sum(1)


@dataclass
class Candidate:
    """One cluster's stand-in: an expert (gate/up [I, H], down [H, I]) and its router entries."""

    kind: str
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    row: torch.Tensor  # [H]
    bias: torch.Tensor | None = None  # [] router bias
    corr: torch.Tensor | None = None  # [] correction bias (sigmoid routers)


@dataclass
class Clustering:
    """Clusters (old expert ids) and, for each, the member that ``keep`` keeps."""

    name: str
    clusters: list[list[int]]
    dominant: list[int]


class LayerFit:
    """One layer's calibration state: tokens, the original output, and the merged layer under construction."""

    def __init__(self, w: MoEWeights, x_fit: torch.Tensor, x_eval: torch.Tensor, spec: RouterSpec, act: Act):
        self.w, self.spec, self.act = w, spec, act  # act: the experts' activation
        self.x = torch.cat([x_fit, x_eval]).float()  # [T, H]
        self.n_fit = x_fit.shape[0]
        self.outs0 = outputs_by_token(self.x, w.gate, w.up, w.down, act)  # [T, E, H]
        self.logits0 = self._logits(w.router, w.router_bias)  # [T, E]
        self.y = combine(self.outs0, *route(self.logits0, spec, None, w.correction_bias))  # [T, H]
        self.norm = max(float(self.y[self.n_fit :].double().pow(2).sum()), 1e-30)
        self._cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0

    def computed(self, key: Any, c: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations [T, I], output [T, H]) of candidate ``c``, reused under ``key`` while the cache has room
        (the same candidate recurs in every sweep and, for ``keep``, in both clusterings)."""
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        h = self.activations(c)
        out = (h, self.output(c, h))
        size = h.numel() * h.element_size() + out[1].numel() * out[1].element_size()
        if self._cached_bytes + size <= CACHE_BYTES:
            self._cache[key] = out
            self._cached_bytes += size
        return out

    def _logits(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        logits = self.x @ rows.float().T
        return logits + bias.float() if bias is not None else logits

    def activations(self, c: Candidate) -> torch.Tensor:
        """Intermediate activations [T, I] of one candidate expert (shared by its +refit version)."""
        return activations(self.x, c.gate, c.up, self.act)

    def output(self, c: Candidate, h: torch.Tensor | None = None) -> torch.Tensor:
        """Unweighted output [T, H] of one candidate expert (h: its activations, when known)."""
        return (self.activations(c) if h is None else h) @ c.down.float().T

    def error(self, outs: torch.Tensor, logits: torch.Tensor, corr: torch.Tensor | None) -> float:
        """Relative routed-output error on the measure tokens of a layer given by outs [T, K, H], logits [T, K]."""
        m = slice(self.n_fit, None)
        w, idx = route(logits[m], self.spec, None, corr)
        return float((combine(outs[m], w, idx) - self.y[m]).double().pow(2).sum()) / self.norm

    def refit(
        self,
        c: Candidate,
        j: int,
        outs: torch.Tensor,
        logits: torch.Tensor,
        corr: torch.Tensor | None,
        h: torch.Tensor | None = None,
    ) -> Candidate:
        """``c`` with its down projection refitted (fit tokens) as new expert ``j`` of the layer (outs, logits)."""
        f = slice(0, self.n_fit)
        w, idx = route(logits[f], self.spec, None, corr)  # [t, k]
        mine = idx == j  # [t, k]
        s = (w * mine).sum(1)  # [t] routing weight of expert j
        on = s > 0
        if int(on.sum()) == 0:
            return c
        tok = on.nonzero()[:, 0]  # [n] fit tokens routed to expert j
        others = combine(outs[f], (w * ~mine)[tok], idx[tok], tok)  # [n, H] the other experts' part
        hf = activations(self.x[f][on], c.gate, c.up, self.act) if h is None else h[f][on]
        a = s[on, None] * hf  # [n, I]
        down = lstsq_down(a, self.y[f][on] - others, c.down)
        return Candidate(c.kind + "+refit", c.gate, c.up, down, c.row, c.bias, c.corr)


def keep_candidate(w: MoEWeights, e: int) -> Candidate:
    pick = lambda t: None if t is None else t[e]  # noqa: E731
    return Candidate("keep", w.gate[e], w.up[e], w.down[e], w.router[e], pick(w.router_bias), pick(w.correction_bias))


def merge_candidates(
    w: MoEWeights,
    members: list[int],
    freqs: torch.Tensor,
    x_fit: torch.Tensor,
    ref: int,
    align: bool,
    rank_fn: Any,
    act: Act,
) -> list[Candidate]:
    """Subspace and average merges of a cluster (aligned to member ``ref`` when ``align``) with fitted rows."""
    mg, mu, md = w.gate[members], w.up[members], w.down[members]  # [n, I, H], [n, I, H], [n, H, I]
    f = freqs[members]
    if align:
        mg, mu, md = align_cluster(x_fit[:2048], mg, mu, md, members.index(ref), act)
    if w.correction_bias is None:
        rows, bias = fit_router_rows(x_fit, w.router, [members], bias=w.router_bias)
        row, b, corr = rows[0], None if bias is None else bias[0], None
    else:  # sigmoid routing: frequency-free average row and correction bias (as merged_router_rows does)
        row, b = w.router[members].mean(0), None if w.router_bias is None else w.router_bias[members].mean()
        corr = w.correction_bias[members].double().mean().to(w.correction_bias.dtype)
    out = []
    for kind in ("subspace", "average"):
        if kind == "subspace":
            parts = [merge_subspace(m, f, rank_fn(m)) for m in (mg, mu, md)]
        else:
            parts = [merge_average(m, f) for m in (mg, mu, md)]
        out.append(Candidate(kind, parts[0], parts[1], parts[2], row, b, corr))
    return out


def choose_clusters(
    fit: LayerFit,
    clustering: Clustering,
    freqs: torch.Tensor,
    x_fit: torch.Tensor,
    kinds: tuple[str, ...] = KINDS,
    align: bool = True,
    rank_fn: Any = lambda m: None,
    sweeps: int = 2,
) -> tuple[list[Candidate], float, float]:
    """Coordinate descent over the clusters' candidates. Returns (chosen candidates, error at start, final error)."""
    w = fit.w
    chosen = [keep_candidate(w, d) for d in clustering.dominant]
    outs = torch.stack([fit.outs0[:, d] for d in clustering.dominant], 1)  # [T, K, H]
    rows = torch.stack([c.row for c in chosen])  # [K, H]
    bias = None if w.router_bias is None else torch.stack([c.bias for c in chosen])
    logits = fit._logits(rows, bias)  # [T, K]
    corr = None if w.correction_bias is None else torch.stack([c.corr for c in chosen])
    err = start = fit.error(outs, logits, corr)
    merged_cache: dict[int, list[Candidate]] = {}
    for _ in range(sweeps):
        changed = False
        for j, members in enumerate(clustering.clusters):
            if len(members) == 1 and "keep+refit" not in kinds:
                continue
            base = [keep_candidate(w, clustering.dominant[j])]
            if len(members) > 1 and ({"subspace", "subspace+refit", "average", "average+refit"} & set(kinds)):
                if j not in merged_cache:
                    merged_cache[j] = merge_candidates(
                        w, members, freqs, x_fit, clustering.dominant[j], align, rank_fn, fit.act
                    )
                base += merged_cache[j]
            for cand in base:  # try it in place of column j; restore unless it is strictly better
                is_current = cand.kind == "keep" and chosen[j].kind == "keep"
                if is_current and "keep+refit" not in kinds:
                    continue
                key = (cand.kind, clustering.dominant[j], () if cand.kind == "keep" else tuple(members))
                h, plain = fit.computed(key, cand)  # [T, I], [T, H]
                m = slice(fit.n_fit, None)  # the error reads the measure tokens only; the fit part follows a win
                old_l, old_o = logits[:, j].clone(), outs[m, j].clone()
                old_c = None if corr is None else corr[j].clone()
                logits[:, j] = fit._logits(cand.row[None], None if cand.bias is None else cand.bias[None])[:, 0]
                if corr is not None:
                    corr[j] = cand.corr
                versions = [cand] if cand.kind in kinds and not is_current else []
                if cand.kind + "+refit" in kinds:
                    versions.append(fit.refit(cand, j, outs, logits, corr, h))
                best = None
                for v in versions:
                    outs[m, j] = plain[m] if v is cand else h[m] @ v.down.float().T
                    e = fit.error(outs, logits, corr)
                    if e < err * (1 - 1e-9):
                        err, chosen[j], best, changed = e, v, v, True
                if best is not None:
                    outs[:, j] = plain if best is cand else fit.output(best, h)
                else:
                    logits[:, j], outs[m, j] = old_l, old_o
                    if corr is not None:
                        corr[j] = old_c
        if not changed:
            break
    return chosen, start, err


def pruning_clustering(
    fit: LayerFit, n_keep: int, protected: list[int], similarity: torch.Tensor, n_group: int = 1
) -> Clustering:
    """The pruning choice as a clustering: output-error pruning (on the fit tokens) keeps ``n_keep`` experts; each
    removed expert joins the kept, unprotected expert of its group whose output it resembles most."""
    E = fit.w.num_experts
    f = slice(0, fit.n_fit)
    order = output_error_order(
        fit.outs0[f], fit.logits0[f], fit.spec, set(protected), E - n_keep, fit.w.correction_bias
    )
    removed: list[int] = []
    for step in order:
        if len(removed) >= E - n_keep:
            break
        removed.extend(step.experts)
    kept = [e for e in range(E) if e not in removed]
    Eg = E // n_group
    members: dict[int, list[int]] = {e: [e] for e in kept}
    for r in removed:
        hosts = [e for e in kept if e // Eg == r // Eg and e not in protected] or [
            e for e in kept if e // Eg == r // Eg
        ]
        host = max(hosts, key=lambda e: (float(similarity[r, e]), -e))
        members[host].append(r)
    clusters = [sorted(members[e]) for e in kept]
    return Clustering("pruning", clusters, kept)


def assemble(candidates: list[Candidate], w: MoEWeights) -> MoEWeights:
    """The merged layer view from one candidate per cluster (cluster order = new expert order)."""
    stack = lambda ts: torch.stack([t.to(ref.dtype) for t, ref in ts])  # noqa: E731
    return MoEWeights(
        gate=stack([(c.gate, w.gate) for c in candidates]),
        up=stack([(c.up, w.up) for c in candidates]),
        down=stack([(c.down, w.down) for c in candidates]),
        router=stack([(c.row, w.router) for c in candidates]),
        router_bias=None if w.router_bias is None else stack([(c.bias, w.router_bias) for c in candidates]),
        correction_bias=None if w.correction_bias is None else stack([(c.corr, w.correction_bias) for c in candidates]),
    )
