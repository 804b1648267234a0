"""Expert pruning's pure math (DESIGN.md section 5): which routed experts each MoE layer loses, and in what order.

Every method turns one MoE layer into a *removal order*: a list of steps, each a set of experts removed together
(one expert; one expert per group for group-limited routers such as DeepSeek-V3's ``n_group``) with a cost.
  frequency / routing-mass / reap / random: ascending profile score (normalized to a share of the layer);
  output-error (NAEE-style greedy): on MoE-block inputs, repeatedly make unroutable the expert whose removal (its
    tokens go to their next choice) changes the layer's routed output least; cost = the increase of ||y_R - y||^2
    relative to a scale (the residual stream's energy on the same tokens, so layers compare). Exact and
    incremental: per (token, expert that can change its routing) the error of that removal is kept, and a removal
    recomputes only the tokens whose top-k it can change. Memory: each token's best k+4 expert outputs [T, k+4, H]
    (more on demand, into removed experts' slots) and [T, E] tables, T = error tokens; never [T, E, H].
Selection: ``kept_uniform`` takes the first n experts of every layer's order; ``kept_global`` the cheapest steps
across all layers (costs compared globally), keeping at least the router's minimum in each layer.
Protected experts (super experts) never appear in an order; shared experts are not routed, so never candidates.
Bad arguments raise ``ValueError`` (``NotEnoughRemovable`` when protection leaves too few candidates).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..core.experts import expert_forward, expert_hidden, gated
from ..core.limits import STATE_MEMORY_FRACTION

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
    # softmax: softmax top-k, ranked by logits | sigmoid_group (DeepSeek-V3): scores + correction bias choose,
    # group-limited, scores gathered as weights; ``score`` / ``choice`` vary the second (derived families, verified
    # by core.routing_check: ERNIE-4.5 softmax scores, Kolibri1 chooses by logits + correction, Flint sigmoid alone)
    kind: str = "softmax"
    norm_topk: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    score: str = "sigmoid"  # sigmoid_group: the scores (weights before renormalization): sigmoid | softmax
    choice: str = "score"  # sigmoid_group: the correction bias is added to the scores (score) or the logits (logits)

    @classmethod
    def from_config(cls, fam: Any, cfg: Any) -> RouterSpec:
        groups = dict(n_group=fam.n_group(cfg), topk_group=int(getattr(cfg, "topk_group", 1) or 1))
        if fam.correction_bias:
            return cls(
                top_k=fam.top_k(cfg), kind="sigmoid_group", norm_topk=fam.norm_topk(cfg), **groups,
                scaling=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
            )._variant(fam, cfg)  # fmt: skip
        if groups["n_group"] > 1:  # group-limited softmax (DeepSeek-V2): removal counts per group; ``route`` is
            return cls(top_k=fam.top_k(cfg), norm_topk=fam.norm_topk(cfg), **groups)._variant(fam, cfg)  # unused
        return cls(top_k=fam.top_k(cfg), norm_topk=fam.norm_topk(cfg))._variant(fam, cfg)

    def _variant(self, fam: Any, cfg: Any) -> RouterSpec:
        """This spec with the family's recorded variant (``Family.router_variant``: field -> value pairs, found by
        core.routing_check; ``scaling_key`` names the config key the routed scaling is read from)."""
        var = dict(getattr(fam, "router_variant", ()) or ())
        if not var:
            return self
        key = var.pop("scaling_key", None)
        if key:
            var["scaling"] = float(getattr(cfg, key, 1.0) or 1.0)
        return replace(self, **var)

    def min_keep(self) -> int:
        """Fewest experts a layer may keep and still route (>= top-k; every group >= 2 for group routing)."""
        if self.n_group <= 1:
            return self.top_k
        per_group = max(2, math.ceil(self.top_k / max(self.topk_group, 1)))
        return max(self.top_k, per_group * self.n_group)


# ---- how many -------------------------------------------------------------------------------------------
def possible_ratios(num_experts: int, spec: RouterSpec) -> list[float]:
    """Ratios that remove a whole number of experts from every group and keep the router's minimum."""
    E, g = num_experts, spec.n_group
    return [m / E for m in range(g, E, g) if E - m >= spec.min_keep()]


def removal_count(num_experts: int, ratio: float, spec: RouterSpec) -> tuple[int, str | None]:
    """n experts removed per layer for ``ratio`` (uniform layout); a note when rounded to a multiple of n_group.

    ValueError (starting "ratio ...") when the ratio removes nothing or leaves fewer than the router's minimum."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio {ratio} must be between 0 and 1 (the fraction of routed experts removed)")
    E, g = num_experts, spec.n_group
    n = raw = round(ratio * E)
    note = None
    if g > 1 and n % g:
        m = max(g, round(n / g) * g)
        note = f"ratio {ratio}: {n} of {E} experts is not a multiple of n_group={g}; removing {m} ({m // g} per group)"
        n = m
    if n < 1:
        raise ValueError(f"ratio {ratio} removes no expert of {E}: use a ratio of at least {1 / E:.3f}")
    if E - n < spec.min_keep():
        if g == 1:
            what = f"top-k {spec.top_k}" if spec.kind == "softmax" else f"the router's minimum {spec.min_keep()}"
            raise ValueError(f"ratio {ratio} leaves {E - n} of {E} experts, fewer than {what}: lower the ratio")
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
        raise ValueError(
            f"ratio {ratio}: {asked}, which leaves {E - n}, fewer than the router's minimum {spec.min_keep()} "
            f"({per} per group, top-k {spec.top_k}); {hint}"
        )
    return n, note


# ---- score orders ---------------------------------------------------------------------------------------
def method_scores(profile: Any, layer: int, method: str, seed: int = 0) -> torch.Tensor:
    """[E] importance of each expert (higher = keep), as a share of the layer's total.

    ``profile``: anything with ``layer(l, name) -> [E]`` (``profile.run.Profile``)."""
    if method not in (*PROFILE_KEYS, "random"):
        raise ValueError(f"method {method!r} has no profile score (one of {', '.join([*PROFILE_KEYS, 'random'])})")
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
    if spec.score == "softmax":  # over the routable experts (a removed expert's row is gone)
        scores = torch.softmax(logits if removed is None else logits.masked_fill(removed, float("-inf")), dim=-1)
    else:
        scores = logits.sigmoid()  # [T, E]
    choice = (logits if spec.choice == "logits" else scores) + (correction.float() if correction is not None else 0.0)
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


def outputs_by_token(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Callable = torch.nn.functional.silu
) -> torch.Tensor:
    """Unweighted output of every expert on every token, token-major: x [T, H], gate/up [E, I, H], down [E, H, I]
    -> [T, E, H] (all experts at once, for small problems and tests; ``merge.similarity.expert_outputs`` is the
    expert-major [E, T, H] one)."""
    xf = x.float()
    h = gated(act, torch.einsum("th,eih->tei", xf, gate.float()), torch.einsum("th,eih->tei", xf, up.float()))
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


CACHE_FLOOR_BYTES = 256 * 2**20  # the search's output cache may always take this much (small layers: k+4 slots)
CACHE_LAYER_FRACTION = 0.5  # ... or this share of the layer's routed experts in the checkpoint dtype, if more


def cache_slots(want: int, slot_bytes: int, layer_bytes: int, limit: int | None = None) -> int:
    """How many slots per token ``ExpertOutputs`` caches: ``want``, fewer when ``want`` slots of ``slot_bytes`` each
    (T x (H [+ I]) x 4) exceed max(CACHE_FLOOR_BYTES, CACHE_LAYER_FRACTION x ``layer_bytes``) or a quarter of
    ``limit`` (--max-memory); at least 1. The outputs are the same for any count (pairs not held are computed when
    asked for); fewer slots cost more expert evaluations, not memory: the DeepSeek-V3-dims slice (H 7168, 16 experts
    of width 2048, top-8, 4,096 tokens) holds 4 of 12 wanted (604 MB instead of 1.81 GB)."""
    if want < 1 or slot_bytes < 1 or layer_bytes < 0:
        raise ValueError(f"cache_slots: want {want} and slot bytes {slot_bytes} must be positive")
    budget = max(CACHE_FLOOR_BYTES, int(CACHE_LAYER_FRACTION * layer_bytes))
    if limit is not None:
        budget = min(budget, int(limit * STATE_MEMORY_FRACTION))
    return max(1, min(want, budget // slot_bytes))


class ExpertOutputs:
    """Unweighted outputs f_e(x_t) of (token, expert) pairs without a [T, E, H] tensor.

    Each token's ``c`` best-ranked experts under the original router (the ones its routing can move to as experts
    are removed) are computed once into [T, c, H]; any other pair is computed when asked for (exact either way).
    With ``hidden`` the intermediate activations h_e(x_t) [T, c, I] of the same pairs are kept too (``hidden_of``:
    the down refit reads them instead of recomputing gate/up); f = h down^T bit for bit either way."""

    def __init__(
        self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, rank: torch.Tensor,
        c: int, act: Callable = torch.nn.functional.silu, hidden: bool = False,
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
        self.hcache = torch.empty(T, c, gate.shape[1], device=dev) if hidden else None
        self.owner = top.to(torch.int32)  # [T, c] expert held in each slot (-1: free)
        self.slots = c
        flat = top.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        cache, hcache = self.cache.view(T * c, -1), None if self.hcache is None else self.hcache.view(T * c, -1)
        start = 0
        for e, n in enumerate(counts):
            if n:
                pos = order[start : start + n]  # flat (token, slot) positions held for expert e
                start += n
                xr = x.index_select(0, torch.div(pos, c, rounding_mode="floor"))
                if hcache is None:
                    cache.index_copy_(0, pos, self.apply(e, xr))
                else:
                    h = self.apply_hidden(e, xr)
                    hcache.index_copy_(0, pos, h)
                    cache.index_copy_(0, pos, torch.nn.functional.linear(h, self.down[e].float()))

    def apply_hidden(self, e: int, xr: torch.Tensor) -> torch.Tensor:
        """h_e on rows xr [n, H] -> [n, I] (float32)."""
        return expert_hidden(xr.float(), self.gate[e].float(), self.up[e].float(), self.act)

    def hidden_of(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """h_e on token rows [n] -> [n, I] float32: from the cache where held, computed for the rest."""
        s = self.slot[rows, e]
        if self.hcache is None:
            return self.apply_hidden(e, self.x[rows])
        c = self.hcache.shape[1]
        out = self.hcache.view(-1, self.hcache.shape[-1]).index_select(0, rows * c + s.clamp_min(0))  # [n, I]
        miss = (s < 0).nonzero().squeeze(1)
        if miss.numel():
            out[miss] = self.apply_hidden(e, self.x[rows[miss]])
        return out

    def keep_only(self, keep: list[int], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """The weights of experts ``keep`` only, as [k, ...] copies in that order (the same values): from here on only
        the kept experts' outputs and activations are asked for (the prune's down refit frees the others)."""
        self.gate, self.up, self.down = (_KeptRows(t, keep) for t in (gate, up, down))

    def hidden_only(self) -> None:
        """Free the cached outputs [T, c, H] (only ``hidden_of`` is asked from here on: ``get`` is no longer
        available); the down refit needs the activations alone (the 30B-shaped layer: 403 MB less at its peak)."""
        self.cache = None

    def release(self, e: int) -> None:
        """Expert e was removed: its slots may hold other experts' outputs from now on."""
        rows = (self.slot[:, e] >= 0).nonzero().squeeze(1)
        self.owner[rows, self.slot[rows, e].long()] = -1
        self.slot[rows, e] = -1

    def apply(self, e: int, xr: torch.Tensor) -> torch.Tensor:
        """f_e on rows xr [n, H] -> [n, H] (float32)."""
        return expert_forward(xr.float(), self.gate[e].float(), self.up[e].float(), self.down[e].float(), self.act)

    def get(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[P] token rows, [P, k] experts -> [P, k, H] unweighted outputs."""
        s = self.slot[rows[:, None], idx]  # [P, k]
        P, k = s.shape
        flat = (rows[:, None] * self.cache.shape[1] + s.clamp_min(0)).reshape(-1)  # rows of the [T c, H] view
        out = self.cache.view(-1, self.cache.shape[-1]).index_select(0, flat).view(P, k, -1)  # [P, k, H] (a copy)
        miss = (s < 0).nonzero()
        if miss.numel():
            pr, pk = miss.unbind(1)
            E = self.slot.shape[1]
            keys, inv = (rows[pr] * E + idx[pr, pk]).unique(return_inverse=True)  # sorted by token
            tok, exp = keys // E, keys % E
            vals = torch.empty(keys.numel(), out.shape[-1], device=out.device)
            hs = None if self.hcache is None else torch.empty(keys.numel(), self.hcache.shape[-1], device=out.device)
            for e in exp.unique().tolist():
                sel = exp == e
                if hs is None:
                    vals[sel] = self.apply(e, self.x[tok[sel]])
                else:
                    hs[sel] = self.apply_hidden(e, self.x[tok[sel]])
                    vals[sel] = torch.nn.functional.linear(hs[sel], self.down[e].float())
            step = max(1, (1 << 22) // out.shape[-1])  # (the gathered rows a block at a time: no [misses, H] copy)
            for s in range(0, pr.numel(), step):
                out[pr[s : s + step], pk[s : s + step]] = vals[inv[s : s + step]]
            self._keep(tok, exp, vals, hs)
        return out

    def _keep(self, tok: torch.Tensor, exp: torch.Tensor, vals: torch.Tensor, hs: torch.Tensor | None = None) -> None:
        """Store computed pairs (sorted by token) in their token's free slots, as far as there are any."""
        self._put(self._claim(tok, exp), vals, hs)

    def _claim(self, tok: torch.Tensor, exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``_keep``'s bookkeeping: the pairs (sorted by token) that get a free slot of their token, as (which pairs,
        token, slot); the slots are theirs from now on (their values are ``_put`` next)."""
        _, first, counts = tok.unique_consecutive(return_inverse=True, return_counts=True)
        rank = (
            torch.arange(tok.numel(), device=tok.device) - (counts.cumsum(0) - counts)[first]
        )  # n-th miss of its token
        free = self.owner[tok] < 0  # [U, c]
        pick = (free.cumsum(1) == rank[:, None] + 1) & free
        ok = pick.any(1)
        if not bool(ok.any()):
            return None
        t, e, sl = tok[ok], exp[ok], pick[ok].int().argmax(1)
        self.owner[t, sl] = e.to(torch.int32)
        self.slot[t, e] = sl.to(torch.int32)
        return ok, t, sl

    def _put(
        self, claimed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, vals: torch.Tensor,
        hs: torch.Tensor | None,
    ) -> None:  # fmt: skip
        if claimed is None:
            return
        ok, t, sl = claimed
        self.cache[t, sl] = vals[ok]
        if hs is not None and self.hcache is not None:
            self.hcache[t, sl] = hs[ok]

    def planned(self, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> PlannedGets:
        """A source answering these ``get(rows, idx)`` calls, in this order, exactly as this one would (the same
        values bit for bit, the same pairs kept), with each missed expert's weights upcast once per group of calls
        instead of once per call (see ``PlannedGets``)."""
        return PlannedGets(self, calls)


class _KeptRows:
    """t [k, ...] indexed by source expert: ``self[keep[j]]`` is t[j]."""

    def __init__(self, t: torch.Tensor, keep: list[int]):
        self.t, self.pos = t, {e: j for j, e in enumerate(keep)}

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.t[self.pos[e]]


PLAN_BYTES = 64 * 2**20  # the missed pairs' outputs one group of planned calls computes ahead (PlannedGets)


class PlannedGets:
    """``ExpertOutputs.get`` for a known sequence of calls, with fewer upcasts: the calls are taken in groups whose
    missed pairs' outputs (and activations) stay under PLAN_BYTES; for a group, which pairs each call misses and
    which of them it keeps are settled first (the slot bookkeeping, call by call, as ``get`` would), then each expert
    any of them misses is upcast once and evaluated on each call's rows of it (the same rows in the same order as
    ``get`` computes them: the same values), then every call is answered in turn. A slot a call reads was filled
    before it (slots are only freed by ``release``, between groups), so answering later reads nothing changed.
    A bounded cache (``cache_slots``) misses pairs on every refresh of the search: at DeepSeek-V3 dims a miss call
    upcast up to 16 experts' weights (176 MB each) for a few hundred rows."""

    def __init__(self, src: ExpertOutputs, calls: list[tuple[torch.Tensor, torch.Tensor]]):
        self.src, self.calls, self.pos = src, calls, 0
        self.slots = src.slots
        self.ready: list[dict[str, Any]] = []  # the planned group's calls not answered yet

    def release(self, e: int) -> None:
        raise RuntimeError("PlannedGets answers a fixed sequence of calls: release on the source between them")

    def get(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        c = self._next(rows, idx)
        out = self._answer(c)
        c.clear()
        return out

    def blocks(self, rows: torch.Tensor, idx: torch.Tensor, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The next planned call's answer ``block`` rows at a time, as (first row, [n, k, H]): the same values as
        ``get``'s (its misses were computed for the whole call), without the call's whole [P, k, H] at once."""
        c = self._next(rows, idx)
        for lo in range(0, rows.numel(), block):
            yield lo, self._answer(c, lo, lo + block)
        c.clear()

    def _next(self, rows: torch.Tensor, idx: torch.Tensor) -> dict[str, Any]:
        if not self.ready:
            self._plan()
        if not self.ready:
            raise RuntimeError("PlannedGets: more calls than planned")
        c = self.ready.pop(0)
        r, i = c["rows"], c["idx"]
        if r.shape != rows.shape or i.shape != idx.shape or not torch.equal(r, rows) or not torch.equal(i, idx):
            raise RuntimeError("PlannedGets: a call other than the planned one")
        return c

    def _plan(self) -> None:
        src = self.src
        E, H = src.slot.shape[1], src.cache.shape[-1]
        width = H + (src.hcache.shape[-1] if src.hcache is not None else 0)
        group: list[dict[str, Any]] = []
        held = 0
        while self.pos < len(self.calls) and (not group or held < PLAN_BYTES):
            rows, idx = self.calls[self.pos]
            self.pos += 1
            s = src.slot[rows[:, None], idx]  # [P, k] as get reads it now
            call: dict[str, Any] = {"rows": rows, "idx": idx, "s": s, "tok": None}
            miss = (s < 0).nonzero()
            if miss.numel():
                pr, pk = miss.unbind(1)
                keys, inv = (rows[pr] * E + idx[pr, pk]).unique(return_inverse=True)  # sorted by token
                tok, exp = keys // E, keys % E
                call.update(pr=pr, pk=pk, inv=inv, tok=tok, exp=exp, claimed=src._claim(tok, exp))
                call["vals"] = torch.empty(keys.numel(), H, device=src.cache.device)
                call["hs"] = None if src.hcache is None else torch.empty(keys.numel(), src.hcache.shape[-1],
                                                                        device=src.cache.device)  # fmt: skip
                held += keys.numel() * width * 4
            group.append(call)
        missed = [c for c in group if c["tok"] is not None]
        experts = sorted({e for c in missed for e in c["exp"].unique().tolist()})
        for e in experts:
            g, u, d = src.gate[e].float(), src.up[e].float(), src.down[e].float()
            for c in missed:
                sel = c["exp"] == e
                if not bool(sel.any()):
                    continue
                xr = src.x[c["tok"][sel]]
                if c["hs"] is None:
                    c["vals"][sel] = expert_forward(xr.float(), g, u, d, src.act)
                else:
                    c["hs"][sel] = expert_hidden(xr.float(), g, u, src.act)
                    c["vals"][sel] = torch.nn.functional.linear(c["hs"][sel], d)
            del g, u, d
        for c in missed:
            src._put(c["claimed"], c["vals"], c["hs"])
            c["hs"] = None
        self.ready = group

    def _answer(self, c: dict[str, Any], lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Call ``c``'s answer for its rows lo:hi (all of them without ``hi``)."""
        src, s, rows = self.src, c["s"][lo:hi], c["rows"][lo:hi]
        P, k = s.shape
        flat = (rows[:, None] * src.cache.shape[1] + s.clamp_min(0)).reshape(-1)
        out = src.cache.view(-1, src.cache.shape[-1]).index_select(0, flat).view(P, k, -1)
        if c["tok"] is not None:
            pr, pk, inv = c["pr"], c["pk"], c["inv"]
            if hi is not None:  # (a block of rows: its misses only, counted from lo)
                m = (pr >= lo) & (pr < hi)
                pr, pk, inv = pr[m] - lo, pk[m], inv[m]
            out[pr, pk] = c["vals"][inv]
        return out


ROUTED_CHUNK = 1024  # rows per get of routed_output
ROUTED_BYTES = 64 * 2**20  # ... or fewer: the gathered [chunk, k, H] float32 outputs stay under this (``routed_chunk``)


def routed_chunk(k: int, hidden: int) -> int:
    """Rows per ``get`` for a whole-layer routed output: ROUTED_CHUNK, fewer when [chunk, k, H] float32 passes
    ROUTED_BYTES (DeepSeek-V3 dims, top-8: 292 rows, 67 MB, instead of 1,024 rows, 235 MB)."""
    return max(1, min(ROUTED_CHUNK, ROUTED_BYTES // max(1, k * hidden * 4)))


def routed_output(
    src: Any, rows: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, chunk: int = ROUTED_CHUNK
) -> torch.Tensor:
    """Routed output [P, H] of token rows [P] under weights/indices [P, k], ``chunk`` rows at a time (the gathered
    outputs [chunk, k, H] are the only temporary; each row's weighted sum is the same for any chunk, but a source
    that computes missed pairs per call may round them differently for another chunk: ``layer_output`` keeps the
    calls). The chunks' sums are written into the [P, H] result as they are made (no parts list, no copy)."""
    if rows.numel() <= chunk:
        return _weighted_sum(src.get(rows, idx), w)
    out = None
    for s in range(0, rows.numel(), chunk):
        part = _weighted_sum(src.get(rows[s : s + chunk], idx[s : s + chunk]), w[s : s + chunk])
        if out is None:
            out = part.new_empty(rows.numel(), part.shape[1])
        out[s : s + part.shape[0]] = part
        del part
    return out


def layer_output(src: Any, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``routed_output`` of every token row of ``src`` [T, H] (the same values bit for bit, the same pairs kept in
    the cache) with the gathered outputs in ``routed_chunk`` rows at a time: an ``ExpertOutputs`` answers the same
    ROUTED_CHUNK-row calls (through ``planned``: each call's missed pairs are computed for the whole call, as ``get``
    computes them, since an expert's output on a different number of rows may differ in the last bit), a block of
    rows at a time. DeepSeek-V3 dims, top-8: [292, 8, 7168] float32 (67 MB) gathered at once instead of 235 MB."""
    T = idx.shape[0]
    rows = torch.arange(T, device=idx.device)
    if not hasattr(src, "planned"):
        return routed_output(src, rows, w, idx, ROUTED_CHUNK)
    block = routed_chunk(idx.shape[1], src.x.shape[1])
    calls = routed_gets(rows, idx, ROUTED_CHUNK)
    got = src.planned(calls)
    out = None
    start = 0
    for r, i in calls:
        for lo, f in got.blocks(r, i, block):
            a = start + lo
            part = _weighted_sum(f, w[a : a + f.shape[0]])
            del f
            if out is None:
                out = part.new_empty(T, part.shape[1])
            out[a : a + part.shape[0]] = part
        start += r.numel()
    return out


def routed_gets(rows: torch.Tensor, idx: torch.Tensor, chunk: int = ROUTED_CHUNK) -> list[tuple[torch.Tensor, ...]]:
    """The ``get(rows, idx)`` calls ``routed_output`` makes, in order."""
    if rows.numel() <= chunk:
        return [(rows, idx)]
    return [(rows[s : s + chunk], idx[s : s + chunk]) for s in range(0, rows.numel(), chunk)]


def _weighted_sum(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(f * w[:, :, None]).sum(1)`` bit for bit, multiplying in place when that keeps f's dtype (``get`` returns a
    copy: one [chunk, k, H] temporary less per chunk)."""
    return (f.mul_(w[:, :, None]) if torch.result_type(f, w) == f.dtype else f * w[:, :, None]).sum(1)


def router_choice(logits: torch.Tensor, spec: RouterSpec, correction: torch.Tensor | None) -> torch.Tensor:
    """The score the router ranks experts by: logits (softmax) or scores (or logits, ``spec.choice``) + correction
    bias (softmax scores: over every expert, as before any removal)."""
    if spec.kind == "softmax":
        return logits
    base = logits if spec.choice == "logits" else logits.softmax(-1) if spec.score == "softmax" else logits.sigmoid()
    return base + (correction.float() if correction is not None else 0.0)


def _sets(
    logits: torch.Tensor, spec: RouterSpec, removed: torch.Tensor, idx: torch.Tensor, correction: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For token rows with top-k ``idx``: (affecting [n, E], depends [n, E]) boolean masks.

    affecting: the experts whose removal can change the token's routing (its top-k; with groups also the top-2 of
    every group, which set the group scores). depends: the experts whose removal can change the routing the token
    would get if one more expert went (softmax: its top-(k+1); groups: the top-max(3, k+1) of every group)."""
    n, E = logits.shape
    k = spec.top_k
    choice = router_choice(logits, spec, correction).masked_fill(removed, float("-inf"))
    aff = torch.zeros(n, E, dtype=torch.bool, device=logits.device)
    aff.scatter_(1, idx, True)
    dep = torch.zeros(n, E, dtype=torch.bool, device=logits.device)
    if spec.kind == "softmax":
        dep.scatter_(1, choice.topk(min(k + 1, E), dim=1).indices, True)
        return aff, dep
    if spec.score == "softmax" and (correction is not None or not spec.norm_topk):
        # softmax scores + correction (ERNIE-4.5), or not renormalized: removing any expert rescales every score,
        # which can reorder the choice or changes the weights: every routable expert affects every token
        return ~removed.expand(n, E), torch.ones(n, E, dtype=torch.bool, device=logits.device)
    g, Eg = spec.n_group, E // spec.n_group
    off = (torch.arange(g, device=logits.device) * Eg)[None, :, None]
    grouped = choice.view(n, g, Eg)
    aff.scatter_(1, (grouped.topk(min(2, Eg), dim=-1).indices + off).reshape(n, -1), True)
    dep.scatter_(1, (grouped.topk(min(max(3, k + 1), Eg), dim=-1).indices + off).reshape(n, -1), True)
    return aff, dep | aff


TRIAL_ELEMENTS = 1 << 22  # output_error_order: float32 elements of the trial routings evaluated at once
REFRESH_ELEMENTS = 1 << 23  # ... and of a refresh's part (rows at once)


def output_error_order(
    outs: Any,
    logits: torch.Tensor,
    spec: RouterSpec,
    protected: set[int],
    max_remove: int,
    correction: torch.Tensor | None = None,
    scale: float | None = None,
    y0: torch.Tensor | None = None,
) -> list[Step]:
    """Greedy removal order: each step drops the expert whose removal raises the relative error least.

    outs: [T, E, H] expert outputs, or an object with ``get(rows, idx)`` (``ExpertOutputs``); logits [T, E] router
    logits (+ router bias) on the same tokens. Error of a removed set R: ||y_R - y||^2 / scale summed over tokens
    (y = routed output with every expert; scale defaults to ||y||^2; pass the residual stream's energy on the same
    tokens to compare layers; ``y0`` [T, H]: y when the caller has it already, ``routed_output`` of ``outs`` under the
    unpruned routing). With groups, every group loses one expert per round (the round is one step; its
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
    if y0 is None:
        y0 = layer_output(src, *route(logits, spec, None, correction))
    y0f = y0.float()  # [T, H] float32 (the pair errors' reference)
    H = y0.shape[1]

    def y0d(r: torch.Tensor) -> torch.Tensor:  # rows of y in float64 (no [T, H] float64 copy: 235 MB at H 7168)
        return y0.index_select(0, r).double()

    cr = max(1, (1 << 22) // H)  # rows per 32 MB float64 block
    C = torch.cat([y0[s : s + cr].double().pow(2).sum(1) for s in range(0, T, cr)])  # [T] ||y||^2
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
    # a cache bounded below k+1 slots (``cache_slots``) misses pairs on every refresh; each miss upcasts its expert's
    # weights once per call, so such a source is asked for 4x more rows at once (same values, fewer upcasts)
    slots = getattr(src, "slots", None)
    wide = 4 if slots is not None and slots < spec.top_k + 1 else 1
    chunk = max(1, wide * TRIAL_ELEMENTS // (E + spec.top_k * H))
    delta = torch.zeros(
        E, dtype=torch.float64, device=dev
    )  # fixed modes: summed error increase of removing each expert

    def gain(rows: torch.Tensor) -> torch.Tensor:  # [E] summed error increase of each removal over these rows
        return ((pair[rows] - d2[rows, None]) * aff[rows]).sum(0)

    def refresh(rows: torch.Tensor) -> None:
        """Recompute the routing, error and pair errors of these tokens under the current removed set."""
        step = max(64, wide * REFRESH_ELEMENTS // ((2 * spec.top_k + 1) * H + E))  # rows: ~32 MB of work at once
        parts = [rows[s : s + step] for s in range(0, rows.numel(), step)]
        if spec.kind == "softmax":  # each part's k+1 best experts under the removed set (fixed while refreshing)
            tops = [_top_softmax(r) for r in parts]
            got = src
            if wide > 1 and hasattr(src, "planned"):  # a bounded cache: its misses computed several parts at once
                got = src.planned([(r, J) for r, (_, J) in zip(parts, tops, strict=True)])
        for i, r in enumerate(parts):
            if not nonorm:
                delta.sub_(gain(r))
            if spec.kind == "softmax":
                _refresh_softmax(r, *tops[i], got)
            else:
                _refresh_general(r)
            if not nonorm:
                delta.add_(gain(r))

    def _store(rows: torch.Tensor, y: torch.Tensor) -> None:
        if nonorm:
            A[rows] = y.pow(2).sum(1)
            B[rows] = (y * y0d(rows)).sum(1)
            d2[rows] = A[rows] - 2 * B[rows] + C[rows]
        else:
            d2[rows] = (y - y0d(rows)).pow(2).sum(1)

    def _top_softmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and experts [n, k+1] of each token's k+1 best routable experts."""
        probs = torch.softmax(logits.index_select(0, rows).masked_fill(removed, float("-inf")), dim=-1)  # as route()
        return probs.topk(min(spec.top_k + 1, E), dim=-1)

    def _refresh_softmax(rows: torch.Tensor, pj: torch.Tensor, J: torch.Tensor, got: Any) -> None:
        # every removal from the top-k brings in the same (k+1)-th expert: one gather of k+1 outputs per token
        k = spec.top_k
        f = got.get(rows, J)  # [n, k+1, H]
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
        if nonorm:  # weights are the current probabilities p_j = exp(l_j) / Z, so u = y_trial * Z
            yt, z = yt.double(), Z[rows][:, None]
            pair[rows[:, None], top] = yt.pow(2).sum(-1) * z * z
            ub[rows] = 0.0
            ub[rows[:, None], top] = (yt * y0d(rows)[:, None, :]).sum(-1) * z
        else:  # a difference of outputs: float32 is enough per token; sums over tokens are float64
            pair[rows[:, None], top] = (yt - y0f.index_select(0, rows)[:, None, :]).pow_(2).sum(-1).double()

    def _refresh_general(rows: torch.Tensor) -> None:
        lr = logits[rows]
        w, idx = route(lr, spec, removed, correction)
        a, d = _sets(lr, spec, removed, idx, correction)
        pr, pe = a.nonzero().unbind(1)
        trials = []  # per chunk of (token, removed expert) pairs: the routing with that expert removed too
        for s in range(0, pr.numel(), chunk):
            r, e = pr[s : s + chunk], pe[s : s + chunk]
            trial = removed.expand(r.numel(), E).clone()
            trial[torch.arange(r.numel(), device=dev), e] = True
            trials.append((r, e, *route(lr[r], spec, trial, correction)))
        got = src
        if wide > 1 and hasattr(src, "planned"):  # a bounded cache: its misses computed a group of calls at a time
            calls = routed_gets(rows, idx) + [c for r, _, _, ti in trials for c in routed_gets(rows[r], ti)]
            got = src.planned(calls)
        _store(rows, routed_output(got, rows, w, idx).double())
        aff[rows], dep[rows] = a, d
        pair[rows] = 0.0
        for r, e, tw, ti in trials:
            tok = rows[r]
            yt = routed_output(got, tok, tw, ti).double()  # [P, H]
            if nonorm:
                zp = Z[tok] - el[tok, e]
                pair[tok, e] = yt.pow(2).sum(1) * zp * zp
                ub[tok, e] = (yt * y0d(tok)).sum(1) * zp
            else:
                pair[tok, e] = (yt - y0d(tok)).pow(2).sum(1)

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
class NotEnoughRemovable(ValueError):
    """Protected experts (or the router's minimum) leave fewer removable experts than asked for."""


def kept_uniform(orders: dict[int, list[Step]], n: int, num_experts: int) -> dict[int, list[int]]:
    """Kept experts (ascending) per layer when every layer loses the first ``n`` experts of its order."""
    kept: dict[int, list[int]] = {}
    for l, order in orders.items():
        gone: list[int] = []
        for step in order:
            if len(gone) >= n:
                break
            gone.extend(step.experts)
        if len(gone) < n:
            raise NotEnoughRemovable(
                f"layer {l}: only {len(gone)} experts may be removed (the rest are protected), not {n}"
            )
        kept[l] = [e for e in range(num_experts) if e not in set(gone)]
    return kept


def kept_global(orders: dict[int, list[Step]], total: int, num_experts: int, min_keep: int) -> dict[int, list[int]]:
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
        raise NotEnoughRemovable(
            f"only {removed} of the {total} experts asked for can be removed (protected experts and the router's "
            "minimum per layer)"
        )
    return {l: [e for e in range(num_experts) if e not in set(g)] for l, g in gone.items()}


def rescaled(order: list[Step], factor: float) -> list[Step]:
    """The same steps with every cost multiplied by ``factor``."""
    return [Step(s.experts, s.cost * factor) for s in order]
