"""Expert pruning (DESIGN.md section 5): pure scoring and selection of the routed experts to drop.

Every method turns one MoE layer into a *removal order*: a list of steps, each a set of experts removed together
(one expert; one expert per group for group-limited routers such as DeepSeek-V3's ``n_group``) with a cost.
  frequency / routing-mass / reap / random: ascending profile score (normalized to a share of the layer);
  output-error (NAEE-style greedy): on cached MoE-block inputs (of the already-pruned earlier layers by default),
    repeatedly make unroutable the expert whose removal (its tokens go to their next choice) changes the layer's
    routed output least; cost = the increase of ||y_R - y||^2 relative to the residual stream's energy on the same
    tokens (so layers compare). Exact and incremental: per (token, expert that can change its routing) the error
    of that removal is kept, and a removal recomputes only the tokens whose top-k it can change. Memory: each
    token's best k+2 expert outputs [T, k+2, H] (more on demand, into removed experts' slots) and [T, E] tables,
    T = error_tokens; never [T, E, H].
Compensation (``refit``, after the experts are chosen, each layer calibrated on the already-pruned earlier
layers): the kept experts' router rows are refitted by Adam on the layer's routed-output error with the model's
hard top-k routing (``refit_router``), then optionally their down projections by least squares, one expert at a
time against the rest of the layer (``refit_downs``: explicit per-token targets from the cached expert outputs,
``merge.refit.refit_down_to``; ~k expert evaluations per token). Same keys and shapes.
Layouts: ``uniform`` takes the first n = round(ratio E) experts of every layer's order; ``per-layer`` takes the
cheapest steps across all layers (costs compared globally), keeping at least the router's minimum in each layer.
Protected experts (super experts) never appear in an order; shared experts are not routed, so never candidates.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..core.errors import UserError
from ..report import write_report

METHODS = ("reap", "frequency", "routing-mass", "random", "output-error")
LAYOUTS = ("uniform", "per-layer")
PROFILE_KEYS = {"reap": "reap", "frequency": "frequency", "routing-mass": "routing_mass"}


@dataclass(frozen=True)
class Step:
    """Experts removed together, and what removing them costs (comparable across layers)."""

    experts: tuple[int, ...]
    cost: float


@dataclass(frozen=True)
class RouterSpec:
    """How a family's router turns logits into top-k weights (transformers 5.x semantics)."""

    top_k: int
    kind: str = "softmax"  # softmax | sigmoid_group (DeepSeek-V3)
    norm_topk: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0

    @classmethod
    def from_config(cls, fam: Any, cfg: Any) -> RouterSpec:
        if fam.correction_bias:
            return cls(
                top_k=fam.top_k(cfg), kind="sigmoid_group", norm_topk=fam.norm_topk(cfg), n_group=fam.n_group(cfg),
                topk_group=int(getattr(cfg, "topk_group", 1) or 1),
                scaling=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
            )  # fmt: skip
        return cls(top_k=fam.top_k(cfg), norm_topk=fam.norm_topk(cfg))

    def min_keep(self) -> int:
        """Fewest experts a layer may keep and still route (>= top-k; every group >= 2 for group routing)."""
        if self.kind != "sigmoid_group":
            return self.top_k
        per_group = max(2, math.ceil(self.top_k / max(self.topk_group, 1)))
        return max(self.top_k, per_group * self.n_group)


# ---- how many -------------------------------------------------------------------------------------------
def possible_ratios(num_experts: int, spec: RouterSpec) -> list[float]:
    """Ratios that remove a whole number of experts from every group and keep the router's minimum."""
    E, g = num_experts, spec.n_group
    return [m / E for m in range(g, E, g) if E - m >= spec.min_keep()]


def removal_count(num_experts: int, ratio: float, spec: RouterSpec) -> tuple[int, str | None]:
    """n experts removed per layer for ``ratio`` (uniform layout); a note when rounded to a multiple of n_group."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio} must be between 0 and 1 (the fraction of routed experts removed)")
    E, g = num_experts, spec.n_group
    n = raw = round(ratio * E)
    note = None
    if g > 1 and n % g:
        m = max(g, round(n / g) * g)
        note = (
            f"--ratio {ratio}: {n} of {E} experts is not a multiple of n_group={g}; removing {m} ({m // g} per group)"
        )
        n = m
    if n < 1:
        raise UserError(f"--ratio {ratio} removes no expert of {E}: use a ratio of at least {1 / E:.3f}")
    if E - n < spec.min_keep():
        if g == 1:
            what = f"top-k {spec.top_k}" if spec.kind == "softmax" else f"the router's minimum {spec.min_keep()}"
            raise UserError(f"--ratio {ratio} leaves {E - n} of {E} experts, fewer than {what}: lower --ratio")
        per = spec.min_keep() // g
        asked = (
            f"{raw} of {E} experts rounds to {n} (the same number from each of the {g} groups of {E // g})"
            if raw != n
            else f"{n} of {E} experts"
        )
        ok = possible_ratios(E, spec)
        hint = (
            "possible ratios: " + ", ".join(f"{r:g}" for r in ok)
            if ok
            else f"no ratio can remove experts from this model (every group must keep {per})"
        )
        raise UserError(
            f"--ratio {ratio}: {asked}, which leaves {E - n}, fewer than the router's minimum {spec.min_keep()} "
            f"({per} per group, top-k {spec.top_k}); {hint}"
        )
    return n, note


# ---- score orders ---------------------------------------------------------------------------------------
def method_scores(profile: Any, layer: int, method: str, seed: int = 0) -> torch.Tensor:
    """[E] importance of each expert (higher = keep), as a share of the layer's total."""
    if method == "random":
        g = torch.Generator().manual_seed(seed * 1009 + layer)
        n = profile.layer(layer, "frequency").shape[0]
        return torch.rand(n, generator=g, dtype=torch.float64)
    s = profile.layer(layer, PROFILE_KEYS[method]).double().clamp_min(0)  # [E]
    total = float(s.sum())
    return s / total if total > 0 else s


def score_order(scores: torch.Tensor, protected: set[int], n_group: int = 1) -> list[Step]:
    """Removal order by ascending score; with groups, step r removes the r-th weakest expert of every group."""
    E = scores.shape[0]
    Eg = E // n_group
    per_group = []
    for g in range(n_group):
        cand = [e for e in range(g * Eg, (g + 1) * Eg) if e not in protected]
        per_group.append(sorted(cand, key=lambda e: (float(scores[e]), e)))
    rounds = min(len(c) for c in per_group)
    return [
        Step(tuple(sorted(c[r] for c in per_group)), sum(float(scores[c[r]]) for c in per_group)) for r in range(rounds)
    ]


# ---- output-error greedy ---------------------------------------------------------------------------------
def route(logits: torch.Tensor, spec: RouterSpec, removed: torch.Tensor | None = None, correction=None):
    """Top-k weights and indices [T, k] of the router with ``removed`` [E] (bool) experts unroutable.

    Masking a logit to -inf is the same as deleting the router row: softmax renormalizes over the rest, and
    DeepSeek's group scores (top-2 sum of each group) skip the masked experts while a group keeps two."""
    logits = logits.float()  # [T, E]
    if spec.kind == "softmax":
        if removed is not None:
            logits = logits.masked_fill(removed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        w, idx = probs.topk(spec.top_k, dim=-1)
        if spec.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return w, idx
    scores = logits.sigmoid()  # [T, E]
    choice = scores + (correction.float() if correction is not None else 0.0)
    if removed is not None:
        choice = choice.masked_fill(removed, float("-inf"))
    T, E = choice.shape
    g = spec.n_group
    group_scores = choice.view(T, g, E // g).topk(2, dim=-1)[0].sum(-1)  # [T, g]
    gidx = group_scores.topk(spec.topk_group, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(group_scores).scatter_(1, gidx, 1).bool()
    choice = choice.masked_fill(~gmask.repeat_interleave(E // g, dim=1), float("-inf"))
    idx = choice.topk(spec.top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if spec.norm_topk:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * spec.scaling, idx


def expert_outputs(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Callable = torch.nn.functional.silu
) -> torch.Tensor:
    """Unweighted output of every expert on every token: x [T, H], gate/up [E, I, H], down [E, H, I] -> [T, E, H]."""
    xf = x.float()
    h = act(torch.einsum("th,eih->tei", xf, gate.float())) * torch.einsum("th,eih->tei", xf, up.float())
    return torch.einsum("tei,ehi->teh", h, down.float())


def combine(outs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Routed output [T, H] from expert outputs [T, E, H], weights and indices [T, k]."""
    picked = outs.gather(1, idx[:, :, None].expand(-1, -1, outs.shape[-1]))  # [T, k, H]
    return (picked * w[:, :, None]).sum(1)


class DenseOutputs:
    """Expert outputs held as one [T, E, H] tensor (small problems and tests)."""

    def __init__(self, outs: torch.Tensor):
        self.outs = outs

    def get(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[P] token rows, [P, k] experts -> [P, k, H] unweighted outputs."""
        return self.outs[rows[:, None], idx].float()

    def release(self, e: int) -> None:
        pass


class ExpertOutputs:
    """Unweighted outputs f_e(x_t) of (token, expert) pairs without a [T, E, H] tensor.

    Each token's ``c`` best-ranked experts under the original router (the ones its routing can move to as experts
    are removed) are computed once into [T, c, H]; any other pair is computed when asked for (exact either way)."""

    def __init__(
        self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, rank: torch.Tensor,
        c: int, act: Callable = torch.nn.functional.silu,
    ):  # fmt: skip
        T, E = rank.shape
        c = max(1, min(c, E))
        self.x, self.gate, self.up, self.down, self.act = x, gate, up, down, act
        top = rank.topk(c, dim=1).indices  # [T, c]
        dev = x.device
        self.slot = torch.full((T, E), -1, dtype=torch.int32, device=dev)
        top = top.to(dev)
        self.slot.scatter_(1, top, torch.arange(c, dtype=torch.int32, device=dev).expand(T, c).contiguous())
        self.cache = torch.empty(T, c, down.shape[1], device=dev)
        self.owner = top.to(torch.int32)  # [T, c] expert held in each slot (-1: free)
        flat = top.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                pos = order[start : start + n]
                start += n
                self.cache.view(T * c, -1)[pos] = self.apply(e, x[pos // c])

    def release(self, e: int) -> None:
        """Expert e was removed: its slots may hold other experts' outputs from now on."""
        rows = (self.slot[:, e] >= 0).nonzero().squeeze(1)
        self.owner[rows, self.slot[rows, e].long()] = -1
        self.slot[rows, e] = -1

    def apply(self, e: int, xr: torch.Tensor) -> torch.Tensor:
        """f_e on rows xr [n, H] -> [n, H] (float32)."""
        xf = xr.float()
        h = self.act(xf @ self.gate[e].float().T) * (xf @ self.up[e].float().T)
        return h @ self.down[e].float().T

    def get(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[P] token rows, [P, k] experts -> [P, k, H] unweighted outputs."""
        s = self.slot[rows[:, None], idx]  # [P, k]
        out = self.cache[rows[:, None], s.clamp_min(0).long()]  # [P, k, H] (a copy)
        miss = (s < 0).nonzero()
        if miss.numel():
            pr, pk = miss.unbind(1)
            E = self.slot.shape[1]
            keys, inv = (rows[pr] * E + idx[pr, pk]).unique(return_inverse=True)  # sorted by token
            tok, exp = keys // E, keys % E
            vals = torch.empty(keys.numel(), out.shape[-1], device=out.device)
            for e in exp.unique().tolist():
                sel = exp == e
                vals[sel] = self.apply(e, self.x[tok[sel]])
            out[pr, pk] = vals[inv]
            self._keep(tok, exp, vals)
        return out

    def _keep(self, tok: torch.Tensor, exp: torch.Tensor, vals: torch.Tensor) -> None:
        """Store computed pairs (sorted by token) in their token's free slots, as far as there are any."""
        _, first, counts = tok.unique_consecutive(return_inverse=True, return_counts=True)
        rank = (
            torch.arange(tok.numel(), device=tok.device) - (counts.cumsum(0) - counts)[first]
        )  # n-th miss of its token
        free = self.owner[tok] < 0  # [U, c]
        pick = (free.cumsum(1) == rank[:, None] + 1) & free
        ok = pick.any(1)
        if bool(ok.any()):
            t, e, sl = tok[ok], exp[ok], pick[ok].int().argmax(1)
            self.cache[t, sl] = vals[ok]
            self.owner[t, sl] = e.to(torch.int32)
            self.slot[t, e] = sl.to(torch.int32)


def _routed(src: Any, rows: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Routed output [P, H] of token rows [P] under weights/indices [P, k]."""
    return (src.get(rows, idx) * w[:, :, None]).sum(1)


def _choice(logits: torch.Tensor, spec: RouterSpec, correction: torch.Tensor | None) -> torch.Tensor:
    """The score the router ranks experts by: logits (softmax) or sigmoid scores + correction bias."""
    if spec.kind == "softmax":
        return logits
    return logits.sigmoid() + (correction.float() if correction is not None else 0.0)


def _sets(
    logits: torch.Tensor, spec: RouterSpec, removed: torch.Tensor, idx: torch.Tensor, correction: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For token rows with top-k ``idx``: (affecting [n, E], depends [n, E]) boolean masks.

    affecting: the experts whose removal can change the token's routing (its top-k; with groups also the top-2 of
    every group, which set the group scores). depends: the experts whose removal can change the routing the token
    would get if one more expert went (softmax: its top-(k+1); groups: the top-max(3, k+1) of every group)."""
    n, E = logits.shape
    k = spec.top_k
    choice = _choice(logits, spec, correction).masked_fill(removed, float("-inf"))
    aff = torch.zeros(n, E, dtype=torch.bool, device=logits.device)
    aff.scatter_(1, idx, True)
    dep = torch.zeros(n, E, dtype=torch.bool, device=logits.device)
    if spec.kind == "softmax":
        dep.scatter_(1, choice.topk(min(k + 1, E), dim=1).indices, True)
        return aff, dep
    g, Eg = spec.n_group, E // spec.n_group
    off = (torch.arange(g, device=logits.device) * Eg)[None, :, None]
    grouped = choice.view(n, g, Eg)
    aff.scatter_(1, (grouped.topk(min(2, Eg), dim=-1).indices + off).reshape(n, -1), True)
    dep.scatter_(1, (grouped.topk(min(max(3, k + 1), Eg), dim=-1).indices + off).reshape(n, -1), True)
    return aff, dep | aff


def output_error_order(
    outs: Any,
    logits: torch.Tensor,
    spec: RouterSpec,
    protected: set[int],
    max_remove: int,
    correction: torch.Tensor | None = None,
    scale: float | None = None,
) -> list[Step]:
    """Greedy removal order: each step drops the expert whose removal raises the relative error least.

    outs: [T, E, H] expert outputs, or an object with ``get(rows, idx)`` (``ExpertOutputs``); logits [T, E] router
    logits (+ router bias) on the same tokens. Error of a removed set R: ||y_R - y||^2 / scale summed over tokens
    (y = routed output with every expert; scale defaults to ||y||^2; pass the residual stream's energy on the same
    tokens to compare layers). With groups, every group loses one expert per round (the round is one step; its
    cost is the round's error increase).

    Exact and incremental: the error a candidate's removal adds is kept per (token, expert) pair for the experts
    that can change the token's routing (``_sets``); a removal recomputes only the tokens whose routing depends on
    the removed expert. Without top-k renormalization (softmax over all experts) removing any expert rescales every
    token's weights by Z / (Z - exp(l_e)); that part is closed-form from per-token scalars."""
    src = outs if hasattr(outs, "get") else DenseOutputs(outs)
    logits = logits.float()
    T, E = logits.shape
    g, Eg = spec.n_group, E // spec.n_group
    dev = logits.device
    rows_all = torch.arange(T, device=dev)
    y0 = _routed(src, rows_all, *route(logits, spec, None, correction)).double()  # [T, H]
    C = y0.pow(2).sum(1)  # [T] ||y||^2
    denom = max(float(scale if scale is not None else C.sum()), 1e-30)
    nonorm = spec.kind == "softmax" and not spec.norm_topk
    removed = torch.zeros(E, dtype=torch.bool, device=dev)
    blocked = torch.zeros(E, dtype=torch.bool, device=dev)
    blocked[sorted(protected)] = True
    d2 = torch.zeros(T, dtype=torch.float64, device=dev)  # ||y_R - y||^2 per token
    pair = torch.zeros(T, E, dtype=torch.float64, device=dev)  # per (token, affecting expert): new d2, or ||u||^2
    ub = torch.zeros(T, E, dtype=torch.float64, device=dev) if nonorm else None  # nonorm: <u, y>
    aff = torch.zeros(T, E, dtype=torch.bool, device=dev)
    dep = torch.zeros(T, E, dtype=torch.bool, device=dev)
    if nonorm:  # exp(l - max) per token; Z = sum over the experts still routable; A = ||y_R||^2, B = <y_R, y>
        el = (logits - logits.max(1, keepdim=True).values).double().exp()  # [T, E]
        Z = el.sum(1)
        A, B = C.clone(), C.clone()
    chunk = max(1, (1 << 22) // (E + spec.top_k * y0.shape[1]))
    delta = torch.zeros(
        E, dtype=torch.float64, device=dev
    )  # fixed modes: summed error increase of removing each expert

    def gain(rows: torch.Tensor) -> torch.Tensor:  # [E] summed error increase of each removal over these rows
        return ((pair[rows] - d2[rows, None]) * aff[rows]).sum(0)

    def refresh(rows: torch.Tensor) -> None:
        """Recompute the routing, error and pair errors of these tokens under the current removed set."""
        step = max(64, (1 << 23) // ((2 * spec.top_k + 1) * y0.shape[1] + E))  # rows: ~32 MB of work at once
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            if not nonorm:
                delta.sub_(gain(r))
            (_refresh_softmax if spec.kind == "softmax" else _refresh_general)(r)
            if not nonorm:
                delta.add_(gain(r))

    def _store(rows: torch.Tensor, y: torch.Tensor) -> None:
        if nonorm:
            A[rows] = y.pow(2).sum(1)
            B[rows] = (y * y0[rows]).sum(1)
            d2[rows] = A[rows] - 2 * B[rows] + C[rows]
        else:
            d2[rows] = (y - y0[rows]).pow(2).sum(1)

    def _refresh_softmax(rows: torch.Tensor) -> None:
        # every removal from the top-k brings in the same (k+1)-th expert: one gather of k+1 outputs per token
        k = spec.top_k
        probs = torch.softmax(logits[rows].masked_fill(removed, float("-inf")), dim=-1)  # as route() does
        pj, J = probs.topk(min(k + 1, E), dim=-1)  # [n, k+1]
        f = src.get(rows, J)  # [n, k+1, H]
        cur = pj[:, :k] / pj[:, :k].sum(-1, keepdim=True) if spec.norm_topk else pj[:, :k]
        _store(rows, torch.einsum("nk,nkh->nh", cur, f[:, :k]).double())
        n, kk = J.shape
        wt = pj[:, None, :].expand(n, k, kk).clone()  # [n, k (removed slot), k+1]
        ar = torch.arange(k, device=dev)
        wt[:, ar, ar] = 0.0
        if spec.norm_topk:
            wt = wt / wt.sum(-1, keepdim=True).clamp_min(1e-30)
        yt = torch.einsum("nsj,njh->nsh", wt, f)  # [n, k, H]: output with top-k slot s removed
        top = J[:, :k]
        aff[rows], dep[rows] = False, False
        aff[rows[:, None], top] = True
        dep[rows[:, None], J] = True
        pair[rows] = 0.0
        yr = y0[rows][:, None, :]
        if nonorm:  # weights are the current probabilities p_j = exp(l_j) / Z, so u = y_trial * Z
            yt, z = yt.double(), Z[rows][:, None]
            pair[rows[:, None], top] = yt.pow(2).sum(-1) * z * z
            ub[rows] = 0.0
            ub[rows[:, None], top] = (yt * yr).sum(-1) * z
        else:  # a difference of outputs: float32 is enough per token; sums over tokens are float64
            pair[rows[:, None], top] = (yt - yr.float()).pow(2).sum(-1).double()

    def _refresh_general(rows: torch.Tensor) -> None:
        lr = logits[rows]
        w, idx = route(lr, spec, removed, correction)
        _store(rows, _routed(src, rows, w, idx).double())
        a, d = _sets(lr, spec, removed, idx, correction)
        aff[rows], dep[rows] = a, d
        pair[rows] = 0.0
        pr, pe = a.nonzero().unbind(1)
        for s in range(0, pr.numel(), chunk):
            r, e = pr[s : s + chunk], pe[s : s + chunk]
            trial = removed.expand(r.numel(), E).clone()
            trial[torch.arange(r.numel(), device=dev), e] = True
            tok = rows[r]
            yt = _routed(src, tok, *route(lr[r], spec, trial, correction)).double()  # [P, H]
            if nonorm:
                zp = Z[tok] - el[tok, e]
                pair[tok, e] = yt.pow(2).sum(1) * zp * zp
                ub[tok, e] = (yt * y0[tok]).sum(1) * zp
            else:
                pair[tok, e] = (yt - y0[tok]).pow(2).sum(1)

    refresh(rows_all)
    lost = [0] * g
    steps: list[Step] = []
    prev = 0.0
    round_experts: list[int] = []
    round_cost = 0.0
    for _ in range(max_remove):
        least = min(lost)
        cand = ~removed & ~blocked & (torch.tensor(lost, device=dev).repeat_interleave(Eg) == least)
        if not bool(cand.any()):
            break
        if nonorm:
            zp = Z[:, None] - el  # [T, E]
            c = Z[:, None] / zp
            new = (
                torch.where(aff, pair / zp.pow(2) - 2 * ub / zp, c.pow(2) * A[:, None] - 2 * c * B[:, None])
                + C[:, None]
            )
            delta = (new - d2[:, None]).sum(0)
        score = delta.masked_fill(~cand, math.inf)
        best = int(score.argmin())
        err = (float(d2.sum()) + float(score[best])) / denom
        removed[best] = True
        src.release(best)
        if nonorm:  # every token loses exp(l_best) from its normalizer; tokens whose top-k moved are recomputed
            c = Z / (Z - el[:, best])
            A *= c * c
            B *= c
            Z -= el[:, best]
            d2.copy_(A - 2 * B + C)
        refresh(dep[:, best].nonzero().squeeze(1))
        lost[best // Eg] += 1
        round_experts.append(best)
        round_cost += err - prev
        prev = err
        if len(round_experts) == g:
            steps.append(Step(tuple(sorted(round_experts)), round_cost))
            round_experts, round_cost = [], 0.0
    return steps


# ---- selection -------------------------------------------------------------------------------------------
def select_uniform(orders: dict[int, list[Step]], n: int, num_experts: int) -> dict[int, list[int]]:
    """Kept experts (ascending) per layer when every layer loses the first ``n`` experts of its order."""
    kept: dict[int, list[int]] = {}
    for l, order in orders.items():
        gone: list[int] = []
        for step in order:
            if len(gone) >= n:
                break
            gone.extend(step.experts)
        if len(gone) < n:
            raise UserError(
                f"layer {l}: only {len(gone)} experts may be removed (the rest are protected), not {n}: "
                "lower --ratio or pass --no-protect-super"
            )
        kept[l] = [e for e in range(num_experts) if e not in set(gone)]
    return kept


def select_global(orders: dict[int, list[Step]], total: int, num_experts: int, min_keep: int) -> dict[int, list[int]]:
    """Kept experts per layer when the ``total`` cheapest steps across all layers go (each layer keeps >= min_keep).

    Steps of one layer are taken in order; the next step of every layer competes on cost."""
    gone: dict[int, list[int]] = {l: [] for l in orders}
    pos = dict.fromkeys(orders, 0)
    heap = [(o[0].cost, l) for l, o in orders.items() if o]
    heapq.heapify(heap)
    removed = 0
    while heap and removed < total:
        _, l = heapq.heappop(heap)
        step = orders[l][pos[l]]
        if removed + len(step.experts) > total or num_experts - len(gone[l]) - len(step.experts) < min_keep:
            continue  # this layer is done (steps of a layer have one size)
        gone[l].extend(step.experts)
        removed += len(step.experts)
        pos[l] += 1
        if pos[l] < len(orders[l]):
            heapq.heappush(heap, (orders[l][pos[l]].cost, l))
    if removed < total:
        raise UserError(
            f"only {removed} of the {total} experts asked for can be removed (protected experts and the router's "
            "minimum per layer): lower --ratio or pass --no-protect-super"
        )
    return {l: [e for e in range(num_experts) if e not in set(g)] for l, g in gone.items()}


# ---- apply and write ---------------------------------------------------------------------------------------
DEFAULT_METHOD = "output-error"  # lowest KL at 25% and 50% on the built-in model (reports/prune_bench.md)
DEFAULT_REFIT = "none"
REFITS = ("none", "router", "router+down")


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
    refit: str = DEFAULT_REFIT  # after removal, refit on calibration tokens: none | router | router+down

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} must be between 0 and 1 (the fraction of routed experts removed)")
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout!r} is not one of {', '.join(LAYOUTS)} for expert pruning")
        if self.refit not in REFITS:
            raise UserError(f"--refit {self.refit!r} is not one of {', '.join(REFITS)}")
        if self.error_tokens < 1:
            raise UserError(f"--error-tokens {self.error_tokens} must be at least 1")


class _Stop(Exception):
    pass


def _sampled(offset: int, n: int, step: int, limit: int) -> torch.Tensor:
    """Positions inside a batch of n tokens starting at global token ``offset`` that are sampled: global positions
    0, step, 2 step, ... (at most ``limit`` of them)."""
    first = (-offset) % step
    pos = torch.arange(first, n, step)
    return pos[: max(0, limit - (offset + first) // step)]


def _moe_inputs(
    stream: Any, layer: Any, limit: int, propagate: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MoE-block inputs [T, H] of <= limit tokens (every step-th, step = total // limit), kept batch by batch.

    propagate: run the whole layer, replace the stream's cache by its outputs and also return the layer outputs on
    the same tokens [T, H]; otherwise stop each batch at the MoE block (its inputs are all that is needed)."""
    total = sum(int(b.numel()) for b in stream.batches)
    step = max(1, total // limit)
    xs: list[torch.Tensor] = []
    rs: list[torch.Tensor] = []
    offset = 0

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        h = h.detach().reshape(-1, h.shape[-1])
        xs.append(h[_sampled(offset, h.shape[0], step, limit).to(h.device)].clone())
        if not propagate:
            raise _Stop

    handle = stream.moe_block(layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(len(stream.cache)):
                n = int(stream.batches[i].numel())
                try:
                    out = stream.run_layer(layer, i)
                except _Stop:
                    offset += n
                    continue
                flat = out.reshape(-1, out.shape[-1])
                rs.append(flat[_sampled(offset, n, step, limit).to(flat.device)].clone())
                offset += n
                stream.cache[i] = out
    finally:
        handle.remove()
    return torch.cat(xs), (torch.cat(rs) if propagate else None)


def _forward_sampled(stream: Any, layer: Any, limit: int) -> torch.Tensor:
    """Forward the (pruned) layer over the cache like ``stream.forward_layer``; return its outputs on the sampled
    tokens of ``_moe_inputs`` [T, H]."""
    total = sum(int(b.numel()) for b in stream.batches)
    step = max(1, total // limit)
    rs: list[torch.Tensor] = []
    offset = 0
    with torch.no_grad():
        for i in range(len(stream.cache)):
            out = stream.run_layer(layer, i)
            flat = out.reshape(-1, out.shape[-1])
            rs.append(flat[_sampled(offset, flat.shape[0], step, limit).to(flat.device)].clone())
            offset += flat.shape[0]
            stream.cache[i] = out
    return torch.cat(rs)


# ---- compensation: refit what remains on calibration tokens at the layer output ----------------------------------


def _dense(w: torch.Tensor, idx: torch.Tensor, E: int) -> torch.Tensor:
    """Top-k weights/indices [T, k] -> dense [T, E] float64 (zeros off the top-k)."""
    return torch.zeros(w.shape[0], E, dtype=torch.float64, device=w.device).scatter_add_(1, idx, w.double())


def refit_router(
    src: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec,
    removed: torch.Tensor, y0: torch.Tensor, correction: torch.Tensor | None = None, steps: int = 100,
    lr: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:  # fmt: skip
    """Refit the kept experts' router rows (and bias) so the pruned layer's routed output matches the original one.

    Minimizes sum_x ||y_R(x) - y(x)||^2 (y: routed output with every expert, y_R: with ``removed`` [E] unroutable
    and the new rows) by full-batch Adam on the rows, routing exactly as the model does (hard top-k: gradients
    flow through the chosen experts' weights; a row that falls behind lets the next expert in). ``lr`` is the
    step in logit units (scaled by the tokens' mean |x|). Returns (rows [E, H] with removed rows unchanged,
    bias or None, error before, error after); the best iterate is kept, so the error never grows.
    ``src``: expert outputs (``ExpertOutputs`` / ``DenseOutputs``) on the rows of x."""
    T, H = x.shape
    rows_all = torch.arange(T, device=x.device)
    keep = (~removed).nonzero().squeeze(1)
    xf = x.float()
    base_w = weight.float()
    base_b = bias.float() if bias is not None else None
    y0 = y0.float()
    p = base_w[keep].clone().requires_grad_(True)
    params = [p]
    pb = None
    if base_b is not None:
        pb = base_b[keep].clone().requires_grad_(True)
        params.append(pb)
    opt = torch.optim.Adam(params, lr=lr / max(float(xf.abs().mean()) * H**0.5, 1e-12))
    # Each token's error is a quadratic in its k weights: ||sum_s w_s f_s - y||^2 = w^T G w - 2 w^T b + ||y||^2 with
    # G, b over the token's candidate experts (float64): its k+4 best kept ones under the starting router, grown by
    # the experts the refit routes it to (up to 3k+4); a token routed outside a full set is evaluated directly.
    # Per step: [T, k, k] instead of [T, k, H].
    E = weight.shape[0]
    c = min(keep.numel(), spec.top_k + 4)
    cap = min(keep.numel(), c + 2 * spec.top_k)
    lg0 = xf @ base_w.T + (base_b if base_b is not None else 0.0)
    cand = _choice(lg0, spec, correction).masked_fill(removed, float("-inf")).topk(c, dim=1).indices  # [T, c]
    cands = torch.cat([cand, cand[:, :1].expand(T, cap - c)], 1)  # [T, cap]; slots past count[t] are unused
    count = torch.full((T,), c, dtype=torch.long, device=x.device)
    slotmap = torch.full((T, E), -1, dtype=torch.long, device=x.device)
    slotmap.scatter_(1, cand, torch.arange(c, device=x.device).expand(T, c).contiguous())
    gram = torch.empty(T, cap, cap, dtype=torch.float64, device=x.device)
    lin = torch.empty(T, cap, dtype=torch.float64, device=x.device)
    const = y0.double().pow(2).sum(1)  # [T]

    def fill(rows: torch.Tensor) -> None:
        step = max(1, (1 << 22) // (cap * H))
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            f = src.get(r, cands[r]).double()  # [n, cap, H]
            gram[r] = f @ f.transpose(1, 2)
            lin[r] = (f @ y0[r].double()[:, :, None]).squeeze(2)

    def extend(rows: torch.Tensor, idx: torch.Tensor) -> None:
        """Add the experts these tokens are routed to outside their candidates (as far as there is room)."""
        sub = idx[rows]  # [n, k]
        miss = slotmap[rows[:, None], sub] < 0
        slot = count[rows][:, None] + miss.long().cumsum(1) - 1
        ok = miss & (slot < cap)
        grown = ok.any(1)
        if not bool(grown.any()):
            return
        r2, kk = ok.nonzero().unbind(1)
        t, e, sl = rows[r2], sub[r2, kk], slot[r2, kk]
        cands[t, sl] = e
        slotmap[t, e] = sl
        count[rows] += ok.sum(1)
        fill(rows[grown])

    fill(rows_all)

    def loss_fn() -> torch.Tensor:
        w_full = base_w.index_put((keep,), p)
        logits = xf @ w_full.T
        if pb is not None:
            logits = logits + base_b.index_put((keep,), pb)
        w, idx = route(logits, spec, removed, correction)
        pos = slotmap.gather(1, idx)  # [T, k]
        outside = (pos < 0).any(1)
        if bool(outside.any()):
            extend(outside.nonzero().squeeze(1), idx)
            pos = slotmap.gather(1, idx)
        inside = (pos >= 0).all(1)
        q = pos.clamp_min(0)
        g = gram[rows_all[:, None, None], q[:, :, None], q[:, None, :]]  # [T, k, k]
        wd = w.double()
        per = (wd[:, :, None] * g * wd[:, None, :]).sum((1, 2)) - 2 * (wd * lin.gather(1, q)).sum(1) + const
        loss = per[inside].sum()
        out = (~inside).nonzero().squeeze(1)
        if out.numel():
            y = (src.get(out, idx[out]) * w[out, :, None]).sum(1)
            loss = loss + (y - y0[out]).double().pow(2).sum()
        return loss

    best = (math.inf, None, None)
    first = math.inf
    for i in range(steps + 1):
        opt.zero_grad()
        loss = loss_fn()
        val = float(loss.detach())
        if i == 0:
            first = val
        if val < best[0]:
            best = (val, p.detach().clone(), pb.detach().clone() if pb is not None else None)
        if i == steps:
            break
        loss.backward()
        opt.step()
    rows = weight.clone()
    rows[keep] = best[1].to(weight.dtype)
    new_bias = None
    if bias is not None:
        new_bias = bias.clone()
        new_bias[keep] = best[2].to(bias.dtype)
    return rows, new_bias, first, best[0]


def refit_downs(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, kept: list[int],
    w_orig: torch.Tensor | None, w_new: torch.Tensor, ridge: float = 1e-3, y0: torch.Tensor | None = None,
    y_new: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Least-squares down projections of the kept experts (``merge.refit.refit_down_to``, one kept expert at a time,
    Gauss-Seidel: each fit sees the others' already refitted outputs).

    For kept expert e on the tokens routed to it (new weight w_e > 0) the target is its share of the original
    output, y(x) - sum_{j != e} w_j(x) f_j(x), reproduced by w_e(x) W h_e(x). The pruned layer's current output
    is kept per token and updated after each fit, so each (token, routed expert) pair is evaluated about once.
    Args: x [T, H]; gate/up [E, I, H], down [E, H, I] original experts; w_orig, w_new: dense routing weights [T, E]
    of the original and the pruned (refitted) router; y0, y_new: [T, H] routed outputs of the original layer and
    of the pruned one with the original downs when already known (e.g. from cached expert outputs), else computed.
    Returns [E, H, I] (removed experts' rows unchanged)."""
    from ..merge.align import activations
    from ..merge.refit import refit_down_to

    def routed(w: torch.Tensor, experts: list[int]) -> torch.Tensor:
        y = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64, device=x.device)
        for e in experts:
            on = (w[:, e] > 0).nonzero().squeeze(1)
            if on.numel():
                y[on] += w[on, e, None].double() * (activations(x[on], gate[e], up[e]) @ down[e].float().T).double()
        return y

    E = gate.shape[0]
    y0 = routed(w_orig, list(range(E))) if y0 is None else y0.double()
    y_cur = routed(w_new, kept) if y_new is None else y_new.double().clone()
    cur = down.clone()
    for e in kept:
        on = (w_new[:, e] > 0).nonzero().squeeze(1)
        if not on.numel():
            continue
        xs, we = x[on], w_new[on, e].double()
        h = activations(xs, gate[e], up[e])  # [t, I] float32
        old = cur[e].float().clone()  # cur[e] is overwritten below
        mine = we[:, None] * (h @ old.T).double()  # e's current contribution
        new = refit_down_to(xs, y0[on] - y_cur[on] + mine, we, gate[e], up[e], cur[e], ridge, act=h)
        cur[e] = new
        y_cur[on] += we[:, None] * (h @ (new.float() - old).T).double()
    return cur


def calibrated_pass(
    ckpt: Any, tokens: Any, spec: RouterSpec, opts: PruneOptions, batch_size: int, device: torch.device,
    protected: dict[int, set[int]] | None = None, max_remove: int = 0, n: int | None = None,
    kept: dict[int, list[int]] | None = None, refit_dir: Any = None,
) -> tuple[dict[int, list[Step]], dict[int, dict[str, float]]]:  # fmt: skip
    """One layer-streamed pass over the calibration tokens (one decoder layer in memory); per MoE layer:

    - ``kept`` None, ``n`` None: the output-error order on the unpruned model's inputs (nothing is pruned);
    - ``kept`` None, ``n`` given (sequential): the order on the already-pruned earlier layers' outputs, then the
      layer keeps all but its first n experts;
    - ``kept`` given: the layer keeps those experts.
    A pruned layer is refitted (``opts.refit``: router rows, then down projections) against the unpruned layer's
    routed output on the same inputs, written to ``refit_dir/<layer>.safetensors`` (hub dtype), and the pruned
    layer makes the next layer's inputs. Returns (orders, per-layer refit errors relative to ||y||^2)."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from ..core.progress import progress_bar
    from ..core.stream import LayerStream
    from .load import layer_view, set_layer_experts

    fam, moe, E = ckpt.family, set(ckpt.moe_layers), ckpt.num_experts
    dtype = ckpt.moe_weights(ckpt.moe_layers[0]).router.dtype if refit_dir is not None else None
    stream = LayerStream(ckpt, tokens.input_ids, batch_size=batch_size, device=device)
    limit = opts.error_tokens
    orders: dict[int, list[Step]] = {}
    info: dict[int, dict[str, float]] = {}
    try:
        with progress_bar() as bar:
            task = bar.add_task("calibrated pruning pass", total=len(stream.decoder_layers))
            for l, layer in stream.layers():
                if l not in moe:
                    stream.forward_layer(layer)
                    bar.advance(task)
                    continue
                prune_here = kept is not None or n is not None
                x, r = _moe_inputs(stream, layer, limit, propagate=not prune_here)  # [T, H]
                block = stream.moe_block(layer)
                experts, router = getattr(block, fam.experts), getattr(block, fam.router)
                I = experts.down_proj.shape[-1]
                gu = experts.gate_up_proj
                with torch.no_grad():
                    logits = x.float() @ router.weight.float().T  # [T, E]
                    if getattr(router, "bias", None) is not None:
                        logits = logits + router.bias.float()
                    corr = getattr(router, fam.correction_bias) if fam.correction_bias else None
                    c = spec.top_k + 2  # more are computed when asked for, into removed experts' slots
                    src = ExpertOutputs(x, gu[:, :I], gu[:, I:], experts.down_proj, _choice(logits, spec, corr), c,
                                        experts.act_fn)  # fmt: skip
                    rows_all = torch.arange(x.shape[0], device=x.device)
                    y0 = _routed(src, rows_all, *route(logits, spec, None, corr))  # [T, H]
                    y0sq = max(float(y0.double().pow(2).sum()), 1e-30)
                    order = None
                    if kept is None:
                        order = output_error_order(src, logits, spec, protected[l], max_remove, corr, y0sq)
                    if not prune_here:
                        rescale = y0sq / max(float(r.double().pow(2).sum()), 1e-30)
                        orders[l] = _rescaled(order, rescale if opts.error_scale == "residual" else 1.0)
                        bar.advance(task)
                        continue
                    keep = select_uniform({l: order}, n, E)[l] if kept is None else kept[l]
                    removed = torch.ones(E, dtype=torch.bool, device=x.device)
                    removed[keep] = False
                    view = layer_view(stream.model, fam, l)
                    stats: dict[str, float] = {}
                if opts.refit != "none":
                    for e in removed.nonzero().squeeze(1).tolist():
                        src.release(e)  # their slots can hold the outputs the kept experts' routing moves to
                    rows, bias, e0, e1 = refit_router(src, x, view.router, view.router_bias, spec, removed, y0, corr)
                    view = replace(view, router=rows, router_bias=bias)
                    stats = {"error_before": e0 / y0sq, "error_after_router": e1 / y0sq}
                with torch.no_grad():
                    if opts.refit == "router+down":
                        lg = x.float() @ rows.float().T + (bias.float() if bias is not None else 0.0)
                        w_p, idx_p = route(lg, spec, removed, corr)
                        w_new = _dense(w_p, idx_p, E)
                        y_new = _routed(src, rows_all, w_p, idx_p)  # cached outputs: no extra expert evaluation
                        downs = refit_downs(x, view.gate, view.up, view.down, keep, None, w_new, y0=y0, y_new=y_new)
                        view = replace(view, down=downs)
                    sel = view.select(keep)
                    set_layer_experts(stream.model, fam, l, sel)
                    if refit_dir is not None and opts.refit != "none":
                        t = {"router": sel.router.to(dtype).contiguous(), "down": sel.down.to(dtype).contiguous()}
                        if sel.router_bias is not None:
                            t["router_bias"] = sel.router_bias.to(dtype).contiguous()
                        save_file(t, str(refit_dir / f"{l}.safetensors"))
                    if opts.refit == "none":
                        y_p = _routed(src, rows_all, *route(logits, spec, removed, corr))
                    else:  # the pruned layer's own routed output
                        xd = x.to(router.weight.dtype)
                        _, w_p, idx_p = router(xd)
                        y_p = experts(xd, idx_p, w_p).float()
                        if opts.refit == "router+down":
                            stats["error_after_down"] = float((y_p - y0).double().pow(2).sum()) / y0sq
                r_p = _forward_sampled(stream, layer, limit)
                if order is not None:  # costs relative to the unpruned layer's output energy: r = r_p + y - y_p
                    energy = max(float((r_p.float() + y0 - y_p).double().pow(2).sum()), 1e-30)
                    orders[l] = _rescaled(order, y0sq / energy if opts.error_scale == "residual" else 1.0)
                if stats:
                    info[l] = {k: round(v, 6) for k, v in stats.items()}
                bar.advance(task)
    finally:
        stream.close()
    return orders, info


def _rescaled(order: list[Step], factor: float) -> list[Step]:
    return [Step(s.experts, s.cost * factor) for s in order]


def pruned_tensors(ckpt: Any, kept: dict[int, list[int]], totals: dict[str, int], refit_dir: Any = None) -> Any:
    """Output tensors in hub names, one decoder layer at a time; ``totals`` gets params and tensor bytes.

    ``refit_dir/<layer>.safetensors`` (from ``calibrated_pass``), when there, replaces the kept experts' router
    rows, router bias and down projections of that layer."""
    from dataclasses import replace
    from pathlib import Path

    from safetensors.torch import load_file

    fam = ckpt.family

    def emit(key: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        totals["params"] += t.numel()
        totals["tensor_bytes"] += t.numel() * t.element_size()
        return key, t

    layer_keys: dict[int, list[str]] = {}
    for k in ckpt.keys():
        if k.startswith("model.layers."):
            layer_keys.setdefault(int(k.split(".")[2]), []).append(k)
        else:
            yield emit(k, ckpt.get(k))
    for l in sorted(layer_keys):
        pat = fam.routed_key_pattern(l) if l in kept else None
        for k in layer_keys[l]:
            if pat is None or not pat.match(k):
                yield emit(k, ckpt.get(k))
        if pat is not None:
            w = ckpt.moe_weights(l).select(kept[l])
            f = Path(refit_dir) / f"{l}.safetensors" if refit_dir is not None else None
            if f is not None and f.exists():
                r = load_file(str(f))
                w = replace(w, router=r["router"], down=r["down"], router_bias=r.get("router_bias", w.router_bias))
            for k, t in fam.write_layer(w, l).items():
                yield emit(k, t)


def prune_model(
    model: Any,
    output: Any,
    opts: PruneOptions,
    profile_dir: Any = None,
    calib: str = "mixed",
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    device: torch.device | None = None,
    overwrite: bool = False,
    tokens: Any = None,
    command: str = "prune",
) -> dict[str, Any]:
    """Drop routed experts and write OUTPUT (HF folder + moecompress.json [+ report.html]); returns the manifest.

    Everything is validated before the (optional) profiling pass. ``tokens`` (a ``data.TokenSet``) replaces
    ``calib``/``samples``/``seq_len`` for the profiling and output-error passes (API use, tests)."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from ..calibration.sets import calibration_set, check_seq_len, load_tokenizer
    from ..core.checkpoint import Checkpoint
    from ..core.writer import check_output
    from ..profile.run import Profile, build_profile, collect

    t0 = time.time()
    opts.validate()
    ckpt = Checkpoint(model)
    out = check_output(output, ckpt.path, overwrite)
    fam, cfg, E, layers = ckpt.family, ckpt.config, ckpt.num_experts, ckpt.moe_layers
    spec = RouterSpec.from_config(fam, cfg)
    n, note = removal_count(E, opts.ratio, spec)
    if tokens is None and profile_dir is None:  # with --profile, its own windows are reused
        check_seq_len(seq_len, cfg)
    dev = device or torch.device("cpu")
    warnings = [note] if note else []
    needs_tokens = opts.method == "output-error" or opts.refit != "none"

    if profile_dir is not None:
        prof = Profile.load(profile_dir)
        prof.check_model(ckpt)
        cal = prof.meta.get("calibration") or {}
        if tokens is None and needs_tokens and cal.get("name"):
            calib, samples, seq_len = cal["name"], cal["samples"], cal["seq_len"]
            tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, cal.get("seed") or 0)
    else:
        if tokens is None:
            tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, opts.seed)
        prof = build_profile(ckpt, tokens, collect(ckpt, tokens, batch_size, dev), time.time() - t0)
    if tokens is None and needs_tokens:  # a profile that does not name its calibration set
        check_seq_len(seq_len, cfg)
        tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, opts.seed)
    supers = {(int(l), int(e)) for l, e in prof.super_experts} if opts.protect_super else set()
    protected = {l: {e for ll, e in supers if ll == l} for l in layers}
    if not opts.protect_super and prof.super_experts:
        warnings.append(f"--no-protect-super: super experts {sorted(prof.super_experts)} may be removed")

    max_remove = n if opts.layout == "uniform" else E - spec.min_keep()
    scores: dict[int, torch.Tensor] = {}
    refit_dir = Path(tempfile.mkdtemp(prefix="moecompress-refit-")) if opts.refit != "none" else None
    try:
        refit_info: dict[int, dict[str, float]] = {}
        seq = n if opts.method == "output-error" and opts.layout == "uniform" and opts.sequential else None
        if opts.method == "output-error":
            orders, refit_info = calibrated_pass(
                ckpt, tokens, spec, opts, batch_size, dev, protected, max_remove, n=seq, refit_dir=refit_dir
            )
        else:
            scores = {l: method_scores(prof, l, opts.method, opts.seed) for l in layers}
            orders = {l: score_order(scores[l], protected[l], spec.n_group) for l in layers}
        if opts.layout == "uniform":
            kept = select_uniform(orders, n, E)
        else:
            kept = select_global(orders, n * len(layers), E, spec.min_keep())
        if opts.refit != "none" and seq is None:  # refit in a pass of its own, on the already-pruned earlier layers
            _, refit_info = calibrated_pass(ckpt, tokens, spec, opts, batch_size, dev, kept=kept, refit_dir=refit_dir)
        return _write_pruned(
            ckpt, out, opts, prof, profile_dir, tokens, spec, n, kept, orders, scores, supers, warnings, refit_dir,
            refit_info, overwrite, command, t0,
        )  # fmt: skip
    finally:
        if refit_dir is not None:
            shutil.rmtree(refit_dir, ignore_errors=True)


def _write_pruned(
    ckpt: Any, out: Any, opts: PruneOptions, prof: Any, profile_dir: Any, tokens: Any, spec: RouterSpec, n: int,
    kept: dict[int, list[int]], orders: dict[int, list[Step]], scores: dict[int, torch.Tensor], supers: set,
    warnings: list[str], refit_dir: Any, refit_info: dict[int, dict[str, float]], overwrite: bool, command: str,
    t0: float,
) -> dict[str, Any]:  # fmt: skip
    """Manifest + output folder of an expert pruning (``prune_model``)."""
    import json
    import shutil
    import time
    from pathlib import Path

    from .. import __version__
    from ..core.writer import atomic_dir, dir_bytes, write_shards
    from ..profile.run import save_profile

    fam, E, layers = ckpt.family, ckpt.num_experts, ckpt.moe_layers
    counts = {l: len(k) for l, k in kept.items()}

    layer_info: dict[str, Any] = {}
    for l in layers:
        info: dict[str, Any] = {
            "kept": kept[l],
            "removed": [e for e in range(E) if e not in set(kept[l])],
            "old_to_new": {str(e): i for i, e in enumerate(kept[l])},
            "num_experts": counts[l],
            "removal_order": [list(s.experts) for s in orders[l]],
            "removal_costs": [round(s.cost, 8) for s in orders[l]],
        }
        if scores:
            info["scores"] = [round(float(v), 8) for v in scores[l]]
        layer_info[str(l)] = info
    why = [{"layer": l, "expert": e, "why": "super"} for l, e in sorted(supers)]
    if fam.shared:
        why += [{"layer": l, "module": fam.shared, "why": "shared"} for l in layers]
    cal = prof.meta.get("calibration") or {}
    manifest: dict[str, Any] = {
        "command": command,
        "granularity": "expert",
        "layout": "uniform" if opts.layout == "uniform" else "per-layer",
        "load_with": "transformers" if opts.layout == "uniform" else "moecompress.load",
        "source_model": str(ckpt.path),
        "source_fingerprint": ckpt.fingerprint,
        "method": opts.method,
        "ratio": opts.ratio,
        "options": asdict(opts),
        "experts_before": E,
        "experts_after": max(counts.values()) if opts.layout == "per-layer" else E - n,
        "experts_removed_total": sum(E - c for c in counts.values()),
        "top_k": spec.top_k,
        "n_group": spec.n_group,
        "protected": sorted([l, e] for l, e in supers),
        "protected_why": why,
        "profile": str(Path(profile_dir).resolve()) if profile_dir is not None else "profile",
        "calibration": cal,
        "calibration_fingerprint": cal.get("fingerprint"),
        "output_error_calibration": tokens.describe()
        if opts.method == "output-error" or opts.refit != "none"
        else None,
        "refit": opts.refit,
        "refit_inputs": None if opts.refit == "none" else "pruned earlier layers (sequential)",
        "refit_layer_errors": {str(l): v for l, v in sorted(refit_info.items())},
        "output_error_inputs": None
        if opts.method != "output-error"
        else "pruned earlier layers (sequential)"
        if opts.layout == "uniform" and opts.sequential
        else "unpruned model",
        "params_before": ckpt.num_params,
        "bytes_before": ckpt.bytes_on_disk,
        "warnings": warnings,
        "layers": layer_info,
    }
    raw_cfg = json.loads((ckpt.path / "config.json").read_text())
    raw_cfg.update(fam.expert_count_updates(max(counts.values())))
    totals = {"params": 0, "tensor_bytes": 0}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_shards(tmp, pruned_tensors(ckpt, kept, totals, refit_dir))
        (tmp / "config.json").write_text(json.dumps(raw_cfg, indent=2, sort_keys=True) + "\n")
        for f in ckpt.side_files():
            shutil.copy2(f, tmp / f.name)
        if profile_dir is None:
            save_profile(prof, tmp / "profile")
        manifest.update(params_after=totals["params"], bytes_after=dir_bytes(tmp), elapsed_s=round(time.time() - t0, 2))
        manifest = {"tool": "moecompress", "tool_version": __version__, **manifest}
        (tmp / "moecompress.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_report(tmp, [Path(profile_dir)] if profile_dir is not None else [])
    return manifest
