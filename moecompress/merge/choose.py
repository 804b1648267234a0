"""Per-cluster choice of the merge that serves the layer output best (pure tensor functions).

A merge that collapses a cluster to "keep one member as it is, with its router row" *is* pruning the other
members, so a merge can always do at least as well as pruning: measure the candidates and keep the best.

For one MoE layer with calibration tokens split into a fit part F and a disjoint measure part M:
  y(x)   = the original layer's routed output;  y'(x) = the merged layer's routed output (new router, new experts);
  error  = sum_{x in M} ||y'(x) - y(x)||^2 / sum_{x in M} ||y(x)||^2.
Each clustering (a list of clusters with a dominant member each) starts from the layer-wide pruning candidate:
every cluster keeps its dominant member and its router row, and their down projections are refitted exactly as the
default pruning refits them (``prune.refit.fit_downs`` on all T tokens with its hold-out check; "keep" alone when
"keep+refit" is not among the kinds). Then, cluster by cluster (coordinate descent, the others fixed), every
candidate is built and measured:
  keep        the dominant member and its router row (pruning without the refit);
  subspace    aligned Sub-MoE merge (``merge_subspace``) with a router row fitted to the members' log-sum-exp;
  average     frequency-weighted average (HC-SMoE) with the fitted router row (an untruncated subspace merge is
              the same average, so it is measured once);
  +refit      the same with its down projection refitted on F by ridge least squares to the layer-output
              residual  r(x) = y(x) - (the other routed experts' part of y'(x)),  weighted by its routing weight;
and a candidate replaces the current one only when it lowers the error by more than ``min_gain_se`` standard
errors of the change (paired over the tokens of M; 0: any decrease). The clusterings are compared the same way,
the pruning choice (its dominant members = the experts output-error pruning keeps on all the layer's tokens) first,
so a merged layer stays the pruned one unless something measurably better was found. Finally
(``LayerFit.routed(...).refit_all``) the down projections refitted on F in the descent are fitted again on all T
tokens, as pruning's refit uses every token.

Cost and memory (T = |F| + |M| tokens, k = top-k, K merged experts): no [T, E, H] or [T, K, H] tensor. The merged
layer is held as its routing [T, k] and the outputs of each token's k routed experts [T, k, H] (``_Routed``); a
candidate for cluster j changes only the tokens j is routed to before or after (and, without top-k
renormalization, every token's scale in closed form), so a trial computes the candidate on ~T k / K tokens and any
expert that enters a changed token's top-k on that token alone; no [n, k, H] tensor of the n changed tokens is
made (their outputs are gathered and summed in row blocks of ``ROW_CHUNK_BYTES``). Everything stays on the tokens'
device. (``malloc_trim`` before each trial was measured and not kept: on E128 it cost 12% CPU for 1% of the peak.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from moecompress.core.experts import Act, expert_forward
from moecompress.core.families import MoEWeights
from moecompress.core.held import Held, park, parks, unpark
from moecompress.core.memprobe import probe
from moecompress.core.stream import release_freed
from moecompress.merge.align import EXACT_BLOCK, activations, align_perms
from moecompress.merge.held import HeldOutputs, state_limit
from moecompress.merge.refit import lstsq_down
from moecompress.merge.router import RouterFitter
from moecompress.merge.subspace import merge_average, merge_subspace
from moecompress.prune.order import RouterSpec, output_error_order, route, routed_output, router_choice
from moecompress.prune.refit import HOLDOUT, MIN_ROWS, dense_weights, fit_downs, refittable

# the trials' [rows, k, H] float32 blocks (gathered expert outputs) are made this many bytes at a time
ROW_CHUNK_BYTES = 1 << 25
# experts of at least this many elements per matrix (I x H) have the C heap trimmed between a search's clusters
TRIM_EXPERT_ELEMENTS = 1 << 22

KINDS = ("keep", "keep+refit", "subspace", "subspace+refit", "average", "average+refit")


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
    prior: torch.Tensor | None = None  # [H, I] a refitted candidate's down projection before its refit
    fit_all: bool = False  # fitted on every calibration token already (the pruning refit): no final refit


@dataclass
class Clustering:
    """Clusters (old expert ids) and, for each, the member that ``keep`` keeps."""

    name: str
    clusters: list[list[int]]
    dominant: list[int]


class LayerFit:
    """One layer's calibration state: tokens, the original routed output, and cached original expert outputs.

    ``src`` holds each token's k+1 best-ranked original experts' outputs ([T, k+1, H]; other pairs are computed
    when asked), which give the original output y, the pruning order and every clustering's starting point."""

    def __init__(
        self,
        w: MoEWeights,
        x_fit: torch.Tensor,
        x_eval: torch.Tensor,
        spec: RouterSpec,
        act: Act,
        dtypes: dict[str, torch.dtype] | None = None,
    ):
        """``w`` may hold wider values than the checkpoint's (the engine's float32 block of a bf16 checkpoint: the
        same values, no copy); ``dtypes`` (per field of ``MoEWeights``) is what every built candidate is rounded to,
        once, so it is measured as it will be written (default: the dtypes of ``w``)."""
        self.w, self.spec, self.act = w, spec, act  # act: the experts' activation
        self.dtypes = dtypes or {k: v.dtype for k, v in vars(w).items() if v is not None}
        self.x = _joined(x_fit, x_eval)  # [T, H]
        self.n_fit = x_fit.shape[0]
        self.router = None
        self.rows: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}  # ``router_row``'s
        if w.correction_bias is None:  # first: its Gram matrix and factor ([H+1, H+1] float64 each, 411 MB at H 7168)
            # are made while none of the outputs below is held
            dts = (self.dtypes["router"], self.dtypes.get("router_bias"))
            self.router = RouterFitter(self.x[: self.n_fit], w.router, w.router_bias, dtypes=dts)
        self.logits0 = self._logits(w.router, w.router_bias)  # [T, E]
        rank = router_choice(self.logits0, spec, w.correction_bias)
        # past ``held.state_limit`` the cache [T, k+1, H] (and each routed state [T, k, H]) is in a file, its pages
        # dropped after each block of work
        E, I, H = w.gate.shape
        # freed pages of the C heap given back (``core.stream.release_freed``) once per cluster of a search and around
        # the pruning refits, for experts this wide: the trials' [I, H]-sized temporaries are freed into a heap that
        # otherwise grew by ~0.8 GB through a search on the DeepSeek-V3-dims slice (nothing accepted, nothing held);
        # below it a cluster's trials are short and the trim would cost a share of their CPU (12% per trial at E128)
        self.trim = wide_experts(w, self.x.device)
        self.held_limit = state_limit(
            E * I * H * sum(torch.empty((), dtype=self.dtypes[k]).element_size() for k in ("gate", "up", "down"))
        )
        self.src = HeldOutputs(self.x, w.gate, w.up, w.down, rank, spec.top_k + 1, act, limit=self.held_limit)
        rows = torch.arange(self.x.shape[0], device=self.x.device)
        w0, idx0 = route(self.logits0, spec, None, w.correction_bias)
        self.y = routed_output(self.src, rows, w0, idx0)  # [T, H] in row blocks: no [T, k, H] temporaries
        self.norm = max(float(self.y[self.n_fit :].double().pow(2).sum()), 1e-30)

    def _logits(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        logits = self.x @ rows.float().T
        return logits + bias.float() if bias is not None else logits

    def router_row(self, members: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged router row [H] (and bias) of cluster ``members`` fitted by ``self.router`` (softmax routing),
        kept: a cluster's row is fitted once per layer (the same call each time, so the same row)."""
        key = tuple(members)
        if key not in self.rows:
            rows, bias = self.router.fit([members])
            self.rows[key] = (rows[0], None if bias is None else bias[0])
        return self.rows[key]

    def fit_router_rows(self, clusterings: list[Clustering]) -> None:
        """Every merged cluster's router row of ``clusterings`` fitted now, then the fitter freed: its factor
        ([H+1, H+1] float64, 411 MB at H 7168, in a file) is not read while a search holds its state."""
        if self.router is None:
            return
        for c in clusterings:
            for m in c.clusters:
                if len(m) > 1:
                    self.router_row(m)
        self.router = None

    def hidden(self, c: Candidate, rows: torch.Tensor) -> torch.Tensor:
        """Intermediate activations [n, I] of candidate ``c`` on token rows [n]."""
        return activations(_take(self.x, rows), c.gate, c.up, self.act)

    def start(self, clustering: Clustering, outputs: bool = True) -> tuple[list[Candidate], _Routed]:
        """Every cluster at "keep its dominant member": the candidates and the merged layer's routed state. Without
        ``outputs`` the state holds no expert outputs ([T, k, H]; gathered, summed and freed here): enough for
        ``pruning_refit``, which reads only the routing and the routed output (one clustering's start kept while
        another is searched costs [T, H], not [T, k, H])."""
        w = self.w
        chosen = [keep_candidate(w, d) for d in clustering.dominant]
        rows = torch.stack([c.row for c in chosen])  # [K, H]
        bias = None if w.router_bias is None else torch.stack([c.bias for c in chosen])
        corr = None if w.correction_bias is None else torch.stack([c.corr for c in chosen])
        logits = self._logits(rows, bias)  # [T, K]
        wts, idx = route(logits, self.spec, None, corr)
        dom = torch.as_tensor(clustering.dominant, device=idx.device)
        all_rows = torch.arange(self.x.shape[0], device=idx.device)
        if outputs:
            outs = self.src.get(all_rows, dom[idx])  # [T, k, H] the dominant experts' original outputs
            return chosen, _Routed(self, logits, corr, wts, idx, outs)
        # the routed output alone: no [T, k, H] copy (192 MB at 12,288 fit + measure tokens of H 512, 805 MB at H 2048)
        return chosen, _Routed(self, logits, corr, wts, idx, None, self._routed_sum(dom[idx], wts))

    def _routed_sum(self, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        """sum_k wts[t, k] f_{idx[t, k]}(x_t) [T, H] from the cached original outputs: what ``_Routed`` sums from
        ``src.get(every row, idx)``, bit for bit, without its [T, k, H] copy. The pairs not cached are computed as
        that call computes (and keeps) them, since an expert's outputs on other row sets may differ in the last bits:
        each expert on all its missed rows at once, in ascending expert order (one ``get`` per expert: the same
        calls, and the same free slots taken, as one ``get`` of every missed pair, without holding all of them
        [M, H] three times over; they are held in a ``Held`` tensor, past ``held.HELD_BYTES`` in a file); the rest
        is gathered and summed in ``_Routed``'s row blocks (each row's sum is the same)."""
        src, (T, k), H = self.src, idx.shape, self.x.shape[1]
        rows = torch.arange(T, device=idx.device)
        slot = src.slot[rows[:, None], idx]  # [T, k] (-1: not cached), read before the misses are kept
        pr, pk = (slot < 0).nonzero().unbind(1)  # sorted by row: each expert's missed rows ascending
        missed = None
        if pr.numel():
            missed = Held.empty((pr.numel(), H), self.x.device)  # [M, H]
            ex = idx[pr, pk]
            for e in ex.unique().tolist():
                sel = (ex == e).nonzero()[:, 0]
                missed.t[sel] = src.get(rows[pr[sel]], torch.full_like(sel, e)[:, None])[:, 0]
                missed.drop()
        at = torch.full_like(slot, -1, dtype=torch.long)  # [T, k] the row of ``missed`` for each missed pair
        at[pr, pk] = torch.arange(pr.numel(), device=at.device)
        cached = src.cache.view(-1, src.cache.shape[-1])  # [T c, H]
        flat = rows[:, None] * src.cache.shape[1] + slot.clamp_min(0)  # [T, k]
        yc = torch.empty(T, H, device=self.x.device)
        step = _row_chunk(k, H)
        for r0 in range(0, T, step):
            r1 = r0 + step
            out = cached.index_select(0, flat[r0:r1].reshape(-1)).view(-1, k, H)  # [c, k, H]
            src.drop()
            if missed is not None:
                r, s = (at[r0:r1] >= 0).nonzero().unbind(1)
                out[r, s] = missed.t[at[r0:r1][r, s]]
                missed.drop()
            yc[r0:r1] = (out * wts[r0:r1, :, None]).sum(1)
        return yc

    def pruning_refit(
        self, clustering: Clustering, chosen: list[Candidate], state: _Routed, holdout: int = HOLDOUT,
        min_rows: float = MIN_ROWS,
    ) -> tuple[list[Candidate], _Routed]:  # fmt: skip
        """The start of ``clustering`` (every dominant member kept as it is: ``chosen``, ``state``) with the down
        projections refitted as the default pruning refits them: ``prune.refit.fit_downs`` on all T tokens (fit
        and measure parts) with its hold-out check (every ``holdout``-th token) and its minimum of fit tokens per
        channel (``min_rows``), one kept member after the other.
        Returns the candidates ("keep+refit" where the refit was kept, marked fitted on every token) and state;
        ``state`` is consumed (its expert outputs [T, k, H] are freed before the new state's are made)."""
        w, dom = self.w, clustering.dominant
        E = w.num_experts
        experts = torch.as_tensor(dom, device=state.idx.device)[state.idx]  # [T, k] original expert ids
        dense = dense_weights(state.wts, experts, E)  # [T, E]

        def hidden(e: int, rows: torch.Tensor) -> torch.Tensor:
            return activations(_take(self.x, rows), w.gate[e], w.up[e], self.act)

        state.outs = None  # the expert outputs [T, k, H] are not read by the refit: not held with its downs
        if self.trim:
            release_freed()
        # fit_downs leaves an expert with too few fit tokens as it is and the others' fits do not see it: only the
        # others are passed (the same fits in the same order; the downs of those alone, not of all K)
        fits = refittable(dense, dom, holdout, min_rows, w.down.shape[2])
        dt = self.dtypes["down"]
        # the residual y - yc formed in yc's storage ((-yc) + y, bit for bit; the start's yc is not read again) and
        # the kept downs held in the checkpoint dtype when the layer is (each the float32 fit rounded once, as below):
        # at DeepSeek-V3 dims 117 MB and 235 MB less beside the fits
        resid = state.yc.neg_().add_(self.y)
        state.yc = None
        downs = fit_downs(
            hidden, w.down, [dom[j] for j in fits], dense, self.y, None, kept_only=True, holdout=holdout,
            min_rows=min_rows, resid=resid, kept_dtype=dt if w.down.dtype == dt else torch.float32,
        )[0]  # fmt: skip
        del resid
        at = dict(zip(fits, range(len(fits)), strict=True))
        out = []
        for j, c in enumerate(chosen):
            if j in at:
                d = downs[at[j]].to(dt)
                refit = not torch.equal(d, c.down.to(dt))
            else:
                d, refit = c.down.float().to(dt), False
            if not refit and c.down.dtype == dt:  # the layer's own tensor, not a copy held through the search
                d = c.down
            kind = "keep+refit" if refit else c.kind
            out.append(Candidate(kind, c.gate, c.up, d, c.row, c.bias, c.corr, prior=c.down, fit_all=True))
        # the fits' downs [K, H, I] (when float32; in the checkpoint dtype the refitted candidates' downs are views of
        # them) and the old state's outputs [T, k, H] go before the new state is built (on the 30B-shaped layer
        # 403 + 268 MB that were held together with the new outputs)
        del downs
        state.outs = state.yc = None
        return out, self.routed(out)

    def routed(self, chosen: list[Candidate]) -> _Routed:
        """The routed state of the merged layer made of ``chosen`` (one candidate per cluster) on all T tokens."""
        rows = torch.stack([c.row.float() for c in chosen])  # [K, H]
        bias = None if chosen[0].bias is None else torch.stack([c.bias.float() for c in chosen])
        corr = None if chosen[0].corr is None else torch.stack([c.corr for c in chosen])
        logits = self._logits(rows, bias)  # [T, K]
        wts, idx = route(logits, self.spec, None, corr)
        held = Held.empty((*idx.shape, self.x.shape[1]), self.x.device, self.held_limit)  # [T, k, H]
        for j, c in enumerate(chosen):
            r, s = (idx == j).nonzero().unbind(1)
            if r.numel():
                held.t[r, s] = torch.nn.functional.linear(self.hidden(c, r), c.down.float())
                held.drop()
        return _Routed(self, logits, corr, wts, idx, held)


def _joined(x_fit: torch.Tensor, x_eval: torch.Tensor) -> torch.Tensor:
    """``torch.cat([x_fit, x_eval]).float()``: without a copy when both are the two consecutive parts of one contiguous
    float32 tensor (``layer.choose_layer`` gathers the fit and measure rows at once), that tensor."""
    base = x_fit._base
    if (
        base is not None and x_eval._base is base and base.dtype == torch.float32 and base.is_contiguous()
        and x_fit.data_ptr() == base.data_ptr() and x_eval.data_ptr() == base.data_ptr() + x_fit.nbytes
        and base.shape[0] == x_fit.shape[0] + x_eval.shape[0]
    ):  # fmt: skip
        return base
    return torch.cat([x_fit, x_eval]).float()


class _Routed:
    """The merged layer under construction on all T tokens: logits [T, K], correction bias [K], routing (wts, idx)
    [T, k], each routed expert's output [T, k, H] (``Held``: past ``held.state_limit`` in a file, worked on a row
    block at a time, each block's pages dropped after it), the routed output [T, H] and its squared error [T] to y."""

    def __init__(self, fit: LayerFit, logits, corr, wts, idx, outs: Held | torch.Tensor | None, yc=None):
        """``outs`` None: a state without expert outputs, its routed output ``yc`` given (``LayerFit.start``)."""
        self.fit, self.logits, self.corr, self.wts, self.idx = fit, logits, corr, wts, idx
        self.outs = outs
        if yc is None:
            outs = self.outs
            yc = torch.empty(outs.shape[0], outs.shape[2], device=outs.device)  # [T, H]
            step = self._chunk()
            for r0 in range(0, outs.shape[0], step):  # no [T, k, H] product (each row's sum is the same)
                yc[r0 : r0 + step] = (outs[r0 : r0 + step] * wts[r0 : r0 + step, :, None]).sum(1)
                self.drop()
        self.yc = yc
        self.d2 = _sq_err(self.yc, fit.y)  # [T]
        m = slice(fit.n_fit, None)
        self.err = float(self.d2[m].sum()) / fit.norm

    @property
    def outs(self) -> torch.Tensor | None:
        return None if self.held is None else self.held.t

    @outs.setter
    def outs(self, outs: Held | torch.Tensor | None) -> None:
        self.held = outs if outs is None or isinstance(outs, Held) else Held(outs)

    def drop(self) -> None:
        """After a block of work on ``outs``: its pages leave the process when it is in a file."""
        if self.held is not None:
            self.held.drop()

    def park(self) -> None:
        """While this state waits unread (a clustering's start while another is searched): its routed output [T, H]
        past ``held.PARK_BYTES`` in a temporary file (117 MB at DeepSeek-V3 dims and 4,096 tokens); ``unpark``
        brings it back, the same values. Only a state without expert outputs (``LayerFit.start(outputs=False)``)."""
        if self.held is not None:
            raise ValueError("a state holding expert outputs is not parked")
        self.yc = park(self.yc)

    def unpark(self) -> None:
        self.yc = unpark(self.yc)  # (a tensor never parked comes back as it is)

    def trial(
        self, j: int, cand: Candidate, chosen: list[Candidate], plain: str | None, refit: str | None
    ) -> list[_Trial]:
        """Cluster j's candidate in place of the current one (the others fixed): its plain version (named ``plain``)
        and/or its down-refitted version (named ``refit``), each with its error on the measure tokens (nothing is
        changed here)."""
        fit, spec = self.fit, self.fit.spec
        col = fit._logits(cand.row[None], None if cand.bias is None else cand.bias[None])[:, 0]  # [T]
        logits = self.logits.clone()
        logits[:, j] = col
        corr = None
        if self.corr is not None:
            corr = self.corr.clone()
            corr[j] = cand.corr
        w2, idx2 = route(logits, spec, None, corr)  # [T, k]
        has_j = idx2 == j  # [T, k]
        changed = (idx2 != self.idx).any(1) | has_j.any(1) | (self.idx == j).any(1)  # [T]
        rows = changed.nonzero()[:, 0]  # [n]
        nonorm = spec.kind == "softmax" and not spec.norm_topk
        # outputs of the changed tokens' new top-k: kept slots (``pos``: the old slot holding the expert), the
        # candidate, experts that entered the top-k (computed here, [m, H]); no [n, k, H] tensor is made: the
        # other routed experts' part is summed ``ROW_CHUNK_BYTES`` at a time (each row's sum is the same)
        i_new, i_old = idx2[rows], self.idx[rows]  # [n, k]
        match = i_new[:, :, None] == i_old[:, None, :]  # [n, k, k]
        pos = match.int().argmax(2)  # [n, k]
        mine = i_new == j  # [n, k]
        enter = ~match.any(2) & ~mine
        new = None
        if bool(enter.any()):
            pr, ps = enter.nonzero().unbind(1)
            ex = i_new[pr, ps]
            ent = torch.empty(pr.shape[0], fit.x.shape[1], device=fit.x.device)  # [m, H]
            for e in ex.unique().tolist():
                sel = ex == e
                c = chosen[e]
                ent[sel] = expert_forward(fit.x[rows[pr[sel]]], c.gate.float(), c.up.float(), c.down.float(), fit.act)
            at = torch.full_like(pos, -1)  # [n, k] the row of ``ent`` for each entered slot
            at[pr, ps] = torch.arange(pr.shape[0], device=at.device)
            new = (at, ent)
        gather = (pos, new)
        w_new = w2[rows]  # [n, k]
        wo = w_new * ~mine  # [n, k] the other routed experts' weights
        others = torch.empty(rows.shape[0], fit.x.shape[1], device=fit.x.device)  # [n, H]
        step = self._chunk()
        for r0 in range(0, rows.shape[0], step):
            r1 = r0 + step
            others[r0:r1] = (self._outs_of(rows, gather, r0, r1) * wo[r0:r1, :, None]).sum(1)
            self.drop()
        jr, js = mine.nonzero().unbind(1)  # the changed rows routed to j, and j's slot there
        h = fit.hidden(cand, rows[jr])  # [nj, I]
        s = w_new[jr, js]  # [nj] j's routing weight
        scale = d2_all = None
        if nonorm:  # every token's weights scale by Z_old / Z_new; unchanged tokens in closed form
            scale = (w2.sum(1) / self.wts.sum(1).clamp_min(1e-30))[:, None]  # [T, 1]
            d2_all = _sq_err(self.yc, fit.y, scale=scale)  # [T] unchanged tokens, rescaled
        versions: list[_Trial] = []
        downs = []
        if plain is not None:
            downs.append((Candidate(plain, *_parts(cand)), cand.down))
        if refit is not None:
            f = rows[jr] < fit.n_fit  # fit rows routed to j
            if bool(f.any()):
                a = s[f, None] * h[f]  # [nf, I]
                target = partial(_residual, fit.y, rows[jr[f]], others, jr[f])  # made a block at a time
                down = lstsq_down(a, target, cand.down, dtype=fit.dtypes["down"])
                del a
                c = Candidate(refit, cand.gate, cand.up, down, cand.row, cand.bias, cand.corr, prior=cand.down)
                downs.append((c, down))
            elif plain is None:  # nothing to refit on: the candidate as it is (as the plain version would be)
                downs.append((cand, cand.down))
        step = _row_chunk(1, fit.x.shape[1])
        for c, down in downs:
            out_j = torch.nn.functional.linear(h, down.float())  # [nj, H]
            # the version's outputs are the gathered ones with j's slots set to out_j: ``accept`` makes out_j again
            # (the same call) and writes both; its routed output, others with j's part added, is made (here and in
            # ``accept``) a block of rows at a time: no version holds an [n, H] of its own
            d2n = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)  # [n]
            for r0 in range(0, rows.shape[0], step):
                yn = _with_j(others, jr, s, out_j, r0, r0 + step)
                d2n[r0 : r0 + step] = _sq_err(yn, fit.y, rows[r0 : r0 + step])
            del out_j
            m = rows >= fit.n_fit
            if d2_all is not None:
                base = float(d2_all[fit.n_fit :].sum()) - float(d2_all[rows[m]].sum())
                delta = d2_all - self.d2  # [T] per-token change of the squared error
                delta[rows] = d2n - self.d2[rows]
                delta = delta[fit.n_fit :]
            else:
                base = float(self.d2[fit.n_fit :].sum()) - float(self.d2[rows[m]].sum())
                delta = d2n[m] - self.d2[rows[m]]  # the other measure tokens' errors are unchanged
            err = (base + float(d2n[m].sum())) / fit.norm
            # standard error of the change of the mean squared error over the measure tokens (paired)
            n_m = self.d2.shape[0] - fit.n_fit
            mean = float(delta.sum()) / n_m
            sd = max(float(delta.pow(2).sum()) / n_m - mean * mean, 0.0) ** 0.5
            se = sd / n_m**0.5 * n_m / fit.norm  # on the scale of ``err``
            versions.append(
                _Trial(c, err, j, logits, corr, w2, idx2, rows, gather, others, s, d2n, scale, se, (jr, js), h)
            )
        return versions

    def refit_all(self, chosen: list[Candidate]) -> float:
        """Refit, on all T tokens (fit and measure parts), the down projection of every chosen candidate that was
        refitted on the fit part, one cluster at a time in cluster order against the rest of the merged layer
        (Gauss-Seidel, as ``prune.refit.fit_downs``; same ridge, around the same prior): the choice is made on
        held-out tokens, the chosen layer is then fitted on every calibration token, as pruning's refit is.
        Updates ``chosen`` and this state; returns the error on the measure tokens after (in-sample now)."""
        fit = self.fit
        for j, c in enumerate(chosen):
            if not c.kind.endswith("+refit") or c.fit_all:
                continue
            jr, js = (self.idx == j).nonzero().unbind(1)  # tokens routed to j, and j's slot there
            if not jr.numel():
                continue
            s = self.wts[jr, js]  # [n]
            h = fit.hidden(c, jr)  # [n, I]
            others = torch.empty(jr.shape[0], fit.x.shape[1], device=fit.x.device)  # [n, H]
            step = _row_chunk(1, fit.x.shape[1])
            for r0 in range(0, jr.shape[0], step):  # a block of rows at a time (the same values)
                r = slice(r0, r0 + step)
                others[r] = self.yc[jr[r]] - s[r, None] * self.outs[jr[r], js[r]]
                self.drop()
            prior = c.down if c.prior is None else c.prior
            every = torch.arange(jr.shape[0], device=jr.device)
            target = partial(_residual, fit.y, jr, others, every)  # made a block of columns at a time
            down = lstsq_down(s[:, None] * h, target, prior, dtype=fit.dtypes["down"])
            out_j = torch.nn.functional.linear(h, down.float())  # [n, H]
            self.outs[jr, js] = out_j
            self.drop()
            self.yc[jr] = others + s[:, None] * out_j
            chosen[j] = Candidate(c.kind, c.gate, c.up, down, c.row, c.bias, c.corr, prior=prior)
        self.d2 = _sq_err(self.yc, fit.y)
        self.err = float(self.d2[fit.n_fit :].sum()) / fit.norm
        return self.err

    def _chunk(self) -> int:
        """Rows of a [rows, k, H] float32 block of about ``ROW_CHUNK_BYTES``."""
        return _row_chunk(*self.outs.shape[1:])

    def _outs_of(self, rows: torch.Tensor, gather: tuple[Any, ...], a: int, b: int) -> torch.Tensor:
        """Rows a:b of a trial's routed expert outputs [b - a, k, H] (a copy): each kept slot from the current
        outputs (``pos``: the old slot of the same expert), each entered expert's from the trial (``new``); the
        candidate's slots hold a kept slot's value (their weight there is zero; ``accept`` sets them)."""
        pos, new = gather
        out = self.outs[rows[a:b, None], pos[a:b]]  # [c, k, H]
        if new is not None:
            at = new[0][a:b]
            r, s = (at >= 0).nonzero().unbind(1)
            if r.numel():
                out[r, s] = new[1][at[r, s]]
        return out

    def accept(self, t: _Trial) -> None:
        """Make trial ``t`` the merged layer's current state."""
        self.logits, self.corr = t.logits, t.corr
        if t.scale is not None:  # no top-k renormalization: every token's weights and output rescaled
            self.wts = t.w2.clone()
            self.yc = self.yc * t.scale  # slot outputs are unweighted: unchanged
        self.wts[t.rows], self.idx[t.rows] = t.w2[t.rows], t.idx2[t.rows]
        step = self._chunk()
        for r0 in range(0, t.rows.shape[0], step):  # a chunk's rows read and write only themselves
            self.outs[t.rows[r0 : r0 + step]] = self._outs_of(t.rows, t.gather, r0, r0 + step)
            self.drop()
        jr, js = t.slots
        out_j = torch.nn.functional.linear(t.h, t.cand.down.float())  # [nj, H] as ``trial`` made it (the same call)
        self.outs[t.rows[jr], js] = out_j
        self.drop()
        for r0 in range(0, t.rows.shape[0], step):  # others with j's part added, a block of rows at a time
            self.yc[t.rows[r0 : r0 + step]] = _with_j(t.others, jr, t.s, out_j, r0, r0 + step)
        self.d2 = _sq_err(self.yc, self.fit.y) if t.scale is not None else self.d2
        self.d2[t.rows] = t.d2n
        self.err = t.err


@dataclass
class _Trial:
    cand: Candidate
    err: float
    j: int
    logits: torch.Tensor
    corr: torch.Tensor | None
    w2: torch.Tensor
    idx2: torch.Tensor
    rows: torch.Tensor
    gather: tuple[Any, ...]  # (pos [n, k], (slot -> entered row [n, k], entered outputs [m, H]) or None)
    others: torch.Tensor  # [n, H] the other routed experts' part of the changed rows' output (every version's)
    s: torch.Tensor  # [nj] j's routing weight on its changed rows: the output is others + s out_j there (``_with_j``)
    d2n: torch.Tensor
    scale: torch.Tensor | None
    se: float = 0.0  # standard error of (err - the current error), from the per-token changes on the measure tokens
    slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows of ``rows``, slot) of j
    h: torch.Tensor | None = None  # [nj, I] the candidate's activations there: out_j = linear(h, cand.down.float())


# the fields of a ``Candidate`` that ``parked`` may move to a file (the router entries are small)
PARKED_FIELDS = ("gate", "up", "down", "prior")


def parked(chosen: list[Candidate], w: MoEWeights, wait: bool = True) -> Callable[[], list[Candidate]]:
    """``chosen`` while it waits unread (the best clustering so far while the next one is searched; none when not
    ``wait``): the tensors of its own (refitted downs, merges; not views of the layer's ``w``), past
    ``held.PARK_BYTES`` in all, each in a temporary file (on the CPU; at DeepSeek-V3 dims eight refitted downs:
    235 MB). The caller drops ``chosen``; the returned call gives the candidates back in memory, bit for bit."""
    layer = {getattr(w, f).untyped_storage().data_ptr() for f in ("gate", "up", "down")}
    own: dict[int, torch.Tensor] = {}  # by id: a tensor in two fields (or two candidates) is parked once
    for c in chosen:
        for f in PARKED_FIELDS:
            t = getattr(c, f)
            if t is not None and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in layer:
                own[id(t)] = t
    if not wait or not parks(sum(t.nbytes for t in own.values())):
        return lambda: chosen
    where = [{f: id(getattr(c, f)) for f in PARKED_FIELDS if id(getattr(c, f)) in own} for c in chosen]
    shells = [replace(c, **dict.fromkeys(fs)) for c, fs in zip(chosen, where, strict=True)]
    held = {k: park(t, 0) for k, t in own.items()}
    del own

    def back() -> list[Candidate]:
        values = {k: unpark(h) for k, h in held.items()}
        return [replace(c, **{f: values[k] for f, k in fs.items()}) for c, fs in zip(shells, where, strict=True)]

    return back


def wide_experts(w: MoEWeights, device: torch.device) -> bool:
    """Experts of at least ``TRIM_EXPERT_ELEMENTS`` per matrix on the CPU: their merge trims the C heap between a
    search's clusters and maps its large allocations (``held.mapped_allocations``)."""
    return device.type == "cpu" and w.gate.shape[1] * w.gate.shape[2] >= TRIM_EXPERT_ELEMENTS


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]``, or ``x`` itself when ``rows`` are all its rows in order (the same values, no [T, H] copy: at
    K = top-k every token is routed to every merged expert)."""
    n = x.shape[0]
    if rows.numel() == n and bool((rows == torch.arange(n, device=rows.device)).all()):
        return x
    return x[rows]


def _with_j(
    others: torch.Tensor, jr: torch.Tensor, s: torch.Tensor, out_j: torch.Tensor, r0: int = 0, r1: int | None = None
) -> torch.Tensor:
    """Rows r0:r1 (default all) of a trial's routed output on its changed rows [n, H]: ``others`` with j's weighted
    output added on rows ``jr`` (ascending, each row once: a block's rows are the same sums as the whole's)."""
    r1 = others.shape[0] if r1 is None else min(r1, others.shape[0])
    lo, hi = torch.searchsorted(jr, torch.tensor([r0, r1], device=jr.device)).tolist()
    yn = others[r0:r1].clone()
    yn.index_add_(0, jr[lo:hi] - r0, s[lo:hi, None] * out_j[lo:hi])
    return yn


def _residual(
    y: torch.Tensor, rows: torch.Tensor, others: torch.Tensor, orows: torch.Tensor, h0: int, h1: int
) -> torch.Tensor:
    """Columns h0:h1 of ``y[rows] - others[orows]`` [n, h1 - h0] (``lstsq_down``'s target, a block at a time: the
    same values, no [n, H] difference nor its gathered operands)."""
    return y[rows, h0:h1] - others[orows, h0:h1]


def _row_chunk(k: int, H: int) -> int:
    """Rows of a [rows, k, H] float32 block of about ``ROW_CHUNK_BYTES``."""
    return max(1, ROW_CHUNK_BYTES // (4 * k * H))


def _sq_err(
    a: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row squared error [n] float64 of a [n, H] (times ``scale`` [n, 1]) to y[rows] (y: [n, H] when ``rows``
    is None), a block of rows at a time: no [n, H] float64 temporaries (each row's sum is the same)."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    step = max(1, ROW_CHUNK_BYTES // (4 * 8 * a.shape[1]))  # float64 blocks of a quarter of ROW_CHUNK_BYTES
    for r0 in range(0, a.shape[0], step):
        r1 = r0 + step
        ar = a[r0:r1] if scale is None else a[r0:r1] * scale[r0:r1]
        out[r0:r1] = (ar - (y[r0:r1] if rows is None else y[rows[r0:r1]])).double().pow(2).sum(1)
    return out


def _parts(c: Candidate) -> tuple[Any, ...]:
    return c.gate, c.up, c.down, c.row, c.bias, c.corr


def keep_candidate(w: MoEWeights, e: int) -> Candidate:
    pick = lambda t: None if t is None else t[e]  # noqa: E731
    return Candidate("keep", w.gate[e], w.up[e], w.down[e], w.router[e], pick(w.router_bias), pick(w.correction_bias))


def merge_candidates(
    fit: LayerFit,
    members: list[int],
    freqs: torch.Tensor,
    x_align: torch.Tensor,
    ref: int,
    align: bool,
    rank_fn: Any,
    align_block: int = EXACT_BLOCK,
) -> list[Candidate]:
    """Subspace and average merges of a cluster (aligned to member ``ref`` on tokens ``x_align`` when ``align``) with
    fitted rows; an untruncated subspace merge equals the average, so then only "subspace" is returned."""
    w = fit.w
    if w.correction_bias is None:  # softmax routing: the row fitted to the members' log-sum-exp (``router_row``)
        row, b = fit.router_row(members)
        corr = None
    else:  # sigmoid routing: frequency-free average row and correction bias (as merged_router_rows does)
        dt = fit.dtypes
        row = w.router[members].to(dt["router"]).mean(0)
        b = None if w.router_bias is None else w.router_bias[members].to(dt["router_bias"]).mean()
        corr = w.correction_bias[members].double().mean().to(dt["correction_bias"])
    f = freqs[members]
    n = len(members)
    perms: list[torch.Tensor | None] = [None] * n
    if align:  # from the layer's own gate/up rows (no copies): the permutations ``align_cluster`` finds
        gu = ([w.gate[e] for e in members], [w.up[e] for e in members])
        perms = align_perms(x_align, *gu, members.index(ref), fit.act, align_block)

    def stacked(name: str) -> torch.Tensor:
        """The aligned members' [n, ., .] of one projection: ``align_cluster``'s result for it (the same values),
        made one projection at a time (n x 29 MB at DeepSeek-V3 dims held, not n x 88 MB)."""
        src = getattr(w, name)
        out = src.new_empty((n, *src.shape[1:]))
        for i, (e, p) in enumerate(zip(members, perms, strict=True)):
            out[i] = src[e] if p is None else src[e][:, p] if name == "down" else src[e][p]
        return out

    names = ("gate", "up", "down")
    shapes = [(n, *getattr(w, k).shape[1:]) for k in names]
    ranks = [rank_fn(torch.empty(sh, device="meta")) for sh in shapes]  # rank_fn reads the members' shape
    full = all(r is None or r >= min(sh[1], sh[0] * sh[2]) for r, sh in zip(ranks, shapes, strict=True))
    parts, avg = [], []
    for k, r in zip(names, ranks, strict=True):
        m = stacked(k)
        parts.append(merge_subspace(m, f, r, fit.dtypes[k]))
        if not full:
            avg.append(merge_average(m, f, fit.dtypes[k]))
        del m
    out = [Candidate("subspace", *parts, row, b, corr)]
    if not full:
        out.append(Candidate("average", *avg, row, b, corr))
    return out


def choose_clusters(
    fit: LayerFit,
    clustering: Clustering,
    freqs: torch.Tensor,
    x_align: torch.Tensor,
    kinds: tuple[str, ...] = KINDS,
    align: bool = True,
    rank_fn: Any = lambda m: None,
    sweeps: int = 2,
    align_block: int = EXACT_BLOCK,
    clock: Any = None,
    cache: int | None = None,
    min_gain_se: float = 0.0,
    holdout: int = HOLDOUT,
    last: bool = False,
    begun: tuple[list[Candidate], _Routed] | None = None,
) -> tuple[list[Candidate], float, float, torch.Tensor]:
    """Coordinate descent over the clusters' candidates. Returns (chosen candidates, error at start, final error,
    the final squared error of each measure token [n_M] float64). With "keep+refit" among ``kinds`` the start is
    the layer-wide pruning candidate: every cluster keeps its dominant member, its down projection refitted on the
    fit tokens where that lowers the error on M, one cluster after the other (what ``prune``'s default down refit
    does with its held-out check); else every dominant member as it is.
    A candidate replaces the current one only when it lowers the error on the measure tokens by more than
    ``min_gain_se`` standard errors of the change (paired over the measure tokens: with few tokens a switch must
    not follow noise).
    ``clock`` (``layer.Clock``, optional) is charged "merge candidates" (alignment, merges, router rows) and
    "candidate trials" (routing, outputs, refits, errors). ``cache``: the clusters whose merge candidates are kept
    for the next sweep (None: all; the others' are built again: the same tensors, so the same choice). ``last``:
    no clustering of this ``fit`` starts after this one (``fit.src`` is freed once this one has started).
    ``begun``: this clustering's ``fit.start`` made earlier (without outputs when "keep+refit" is among ``kinds``:
    ``choose_layer`` starts every clustering before the first search, so the cached original outputs are freed
    before it); it is consumed."""
    w = fit.w
    lap = clock.lap if clock is not None else (lambda name: None)
    chosen, state = begun if begun is not None else fit.start(clustering)
    state.unpark()
    if state.outs is None and "keep+refit" not in kinds:
        raise ValueError("a start without expert outputs serves only a search that starts from the pruning refit")
    if last:  # no clustering starts after this one: the cached original outputs ([T, k+1, H]) are done with
        fit.src = None
    start = state.err
    if "keep+refit" in kinds:  # the default pruning's down refit, on all T tokens with its hold-out check
        chosen, state = fit.pruning_refit(clustering, chosen, state, holdout)
        start = state.err
        probe(f"merge: {clustering.name} pruning refit")
    merged_cache: dict[int, list[Candidate]] = {}
    merging = {"subspace", "subspace+refit", "average", "average+refit"} & set(kinds)
    for _ in range(sweeps):
        changed = False
        for j, members in enumerate(clustering.clusters):
            if len(members) == 1 and "keep+refit" not in kinds:
                continue
            base = [keep_candidate(w, clustering.dominant[j])]
            merges: list[Candidate] = []
            if len(members) > 1 and merging:
                merges = merged_cache.get(j, [])
                if not merges:
                    lap("candidate trials")
                    merges = merge_candidates(
                        fit, members, freqs, x_align, clustering.dominant[j], align, rank_fn, align_block
                    )
                    lap("merge candidates")
                    if cache is None or len(merged_cache) < cache:
                        merged_cache[j] = merges
                base += merges
            if fit.trim:
                release_freed()
            for cand in base:  # try it in place of column j; keep it only if it is clearly better
                is_current = cand.kind == "keep" and chosen[j].kind == "keep"
                # an untruncated subspace merge is the average: one candidate, under the first name asked for
                names = ("subspace", "average") if cand.kind == "subspace" and len(merges) == 1 else (cand.kind,)
                plain = next((n for n in names if n in kinds), None) if not is_current else None
                refit = next((n + "+refit" for n in names if n + "+refit" in kinds), None)
                if plain is None and refit is None:
                    continue
                best = None
                for t in state.trial(j, cand, chosen, plain, refit):
                    gain = state.err * (1 - 1e-9) - t.err
                    if gain > min_gain_se * t.se and (best is None or t.err < best.err * (1 - 1e-9)):
                        best = t
                if best is not None:
                    state.accept(best)
                    chosen[j], changed = best.cand, True
                best = t = None  # no trial's outputs ([n, H]) are held through the next trial
        probe(f"merge: {clustering.name} sweep")
        if not changed:
            break
    lap("candidate trials")
    return chosen, start, state.err, state.d2[fit.n_fit :]


def pruning_clustering(
    fit: LayerFit, n_keep: int, protected: list[int], similarity: torch.Tensor, n_group: int = 1
) -> Clustering:
    """The pruning choice as a clustering: output-error pruning (on all the layer's tokens) keeps ``n_keep``
    experts; each removed expert joins the kept, unprotected expert of its group whose output it resembles most."""
    E = fit.w.num_experts
    # on every calibration token (fit and measure), as pruning chooses: the clusterings' baseline is its choice
    # y0: the original routed output it would compute again from the same cache (the same values: fit.y)
    order = output_error_order(
        fit.src, fit.logits0, fit.spec, set(protected), E - n_keep, fit.w.correction_bias, y0=fit.y
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


def assemble(candidates: list[Candidate], w: MoEWeights, dtypes: dict[str, torch.dtype] | None = None) -> MoEWeights:
    """The merged layer view from one candidate per cluster (cluster order = new expert order), in ``dtypes`` (per
    field; default: the dtypes of ``w``)."""
    dt = dtypes or {k: v.dtype for k, v in vars(w).items() if v is not None}
    parts = dict(down="down", router="row", router_bias="bias", correction_bias="corr")
    out = {
        k: None if getattr(w, k) is None else torch.stack([getattr(c, a).to(dt[k]) for c in candidates])
        for k, a in parts.items()
    }
    if dt["gate"] == dt["up"]:  # gate and up as the halves of one [K, 2I, H] tensor: the block's gate_up_proj as it
        # is (``prune.load.set_block_experts``), not a concatenated copy made while the old layer is still held
        I, H = candidates[0].gate.shape
        gate_up = candidates[0].gate.new_empty(len(candidates), 2 * I, H, dtype=dt["gate"])
        for j, c in enumerate(candidates):
            gate_up[j, :I] = c.gate
            gate_up[j, I:] = c.up
        out |= {"gate": gate_up[:, :I], "up": gate_up[:, I:]}
    else:
        out |= {k: torch.stack([getattr(c, k).to(dt[k]) for c in candidates]) for k in ("gate", "up")}
    return MoEWeights(**out)
