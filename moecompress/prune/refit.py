"""Compensation after expert pruning: refit what remains on calibration tokens at the layer's routed output.

``refit_router``: the kept experts' router rows (and bias) by Adam on the layer's routed-output error with the
model's hard top-k routing. ``refit_downs``: then their down projections by least squares, one kept expert at a
time against the rest of the layer (``fit_downs``: explicit per-token targets from the cached expert outputs and
activations; no expert is evaluated again). Same keys and shapes. Pure tensor functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..core.experts import expert_hidden
from .order import RouterSpec, route, router_choice


def dense_weights(w: torch.Tensor, idx: torch.Tensor, E: int) -> torch.Tensor:
    """Top-k weights/indices [T, k] -> dense [T, E] float64 (zeros off the top-k)."""
    return torch.zeros(w.shape[0], E, dtype=torch.float64, device=w.device).scatter_add_(1, idx, w.double())


@torch.enable_grad()
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
    cand = router_choice(lg0, spec, correction).masked_fill(removed, float("-inf")).topk(c, dim=1).indices  # [T, c]
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
    y_new: torch.Tensor | None = None, act: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu,
) -> torch.Tensor:  # fmt: skip
    """Least-squares down projections of the kept experts (``fit_downs``, gate/up evaluated here).

    Args: x [T, H]; gate/up [E, I, H], down [E, H, I] original experts; w_orig, w_new: dense routing weights [T, E]
    of the original and the pruned (refitted) router; y0, y_new: [T, H] routed outputs of the original layer and
    of the pruned one with the original downs when already known (e.g. from cached expert outputs), else computed;
    act: the experts' activation (``experts.act_fn``). Returns [E, H, I] (removed experts' rows unchanged)."""

    def hidden(e: int, rows: torch.Tensor) -> torch.Tensor:  # [n, I] float32
        return expert_hidden(x[rows].float(), gate[e].float(), up[e].float(), act)

    def routed(w: torch.Tensor, experts: list[int]) -> torch.Tensor:
        y = torch.zeros(x.shape[0], down.shape[1], device=x.device)
        for e in experts:
            on = (w[:, e] > 0).nonzero().squeeze(1)
            if on.numel():
                y[on] += w[on, e, None].float() * torch.nn.functional.linear(hidden(e, on), down[e].float())
        return y

    E = gate.shape[0]
    y0 = routed(w_orig, list(range(E))) if y0 is None else y0
    y_cur = routed(w_new, kept) if y_new is None else y_new
    return fit_downs(hidden, down, kept, w_new, y0, y_cur, ridge)[0]


# the default pruning's down refit: an expert is refitted only with at least 2 fit tokens per channel of its width
# (512 calibration tokens on the built-in model: KL 0.042 -> 0.27 without it); no hold-out check by default (every
# 4th token held out cut the built-in model's 25% gain from -19% to -5%: the fits lose a quarter of their tokens)
MIN_ROWS = 2.0
HOLDOUT = 0


def refits_any(w_new: torch.Tensor, kept: list[int], width: int, min_rows: float) -> bool:
    """False when ``fit_downs`` would refit none of ``kept``: no kept expert has as many routed tokens (w_new > 0)
    as its guard needs (``min_rows`` x ``width``, and at least one), hold-out or not (fit tokens <= routed ones)."""
    return int((w_new[:, kept] > 0).sum(0).max()) >= max(min_rows * width, 1.0)


def holdout_mask(tokens: int, holdout: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[T] bool: the tokens :func:`fit_downs` holds out of its fits to check them (every ``holdout``-th, if > 1)."""
    check = torch.zeros(tokens, dtype=torch.bool, device=device)
    if holdout > 1:
        check[::holdout] = True
    return check


def enough_fit_tokens(n: int, min_rows: float, width: int) -> bool:
    """Whether :func:`fit_downs` refits an expert of width I with ``n`` fit tokens (some, and ``min_rows`` x I)."""
    return n > 0 and n >= min_rows * width


def refittable(w_new: torch.Tensor, kept: list[int], holdout: int, min_rows: float, width: int) -> list[int]:
    """Positions in ``kept`` of the experts :func:`fit_downs` would refit (enough fit tokens; its hold-out check may
    still keep the old down): the others it leaves as they are, and no other fit sees them."""
    check = holdout_mask(w_new.shape[0], holdout, w_new.device)
    n_fit = ((w_new[:, kept] > 0) & ~check[:, None]).sum(0).tolist()  # [K] fit tokens of each kept expert
    return [j for j, n in enumerate(n_fit) if enough_fit_tokens(n, min_rows, width)]


def fit_downs(
    hidden: Callable[[int, torch.Tensor], torch.Tensor], down: torch.Tensor, kept: list[int], w_new: torch.Tensor,
    y0: torch.Tensor, y_new: torch.Tensor | None, ridge: float = 1e-3, kept_only: bool = False, holdout: int = 0,
    min_rows: float = 0.0, resid: torch.Tensor | None = None, kept_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Down projections of the kept experts by ridge least squares, one kept expert at a time (Gauss-Seidel: each
    fit sees the others' already refitted outputs).

    For kept expert e on the tokens routed to it (new weight w_e > 0) the target is its share of the original
    output, y0(x) - sum_{j != e} w_j(x) f_j(x), reproduced by w_e(x) W h_e(x):
        W = argmin sum_t ||w_e W h_e - target||^2 + lam ||W - W_old||^2   (lam: ``ridge`` x mean diagonal of the Gram).
    The pruned layer's current output is kept per token and updated after each fit, so each (token, routed expert)
    pair is evaluated about once; each fit is W_old + the ridge step on the residual y0 - y_current (``ridge_step``).
    With ``holdout`` > 1 every holdout-th token is left out of the fits and checks them: an expert keeps its down
    projection unless its refit lowers the error on its held-out tokens. An expert with fewer fit tokens than
    ``min_rows`` x its width I is not refitted at all (each output row has I unknowns: with few calibration tokens
    a refit fits noise; 512 tokens on the built-in model, ~0.5 per unknown, took KL 0.042 to 0.27, and to 0.078
    with the hold-out check alone).
    Args: hidden(e, rows) -> h_e on those token rows [n, I] float32 (e.g. ``ExpertOutputs.hidden_of``); down [E, H, I];
    w_new [T, E] dense routing weights of the pruned layer; y0, y_new [T, H] routed outputs of the original layer and of
    the pruned one with the original downs. Returns ([E, H, I] in down's dtype, removed experts' rows unchanged, or with
    ``kept_only`` [len(kept), H, I] in ``kept_dtype`` in the order of ``kept`` (a layer held in bf16 needs no float32
    copy of every down projection); the pruned layer's routed output with the new downs [T, H] float32). ``resid``: y0 -
    y_new [T, H] float32 computed by the caller (then ``y_new`` is None), which may so let go of y_new during the fit;
    it is updated in place and becomes the returned output. ``kept_dtype``: with ``kept_only``, the dtype the kept downs
    are returned in, each rounded once when its fit is done (the fits and their checks use the float32 values, so the
    result is the float32 one rounded, bit for bit; a bf16 layer's kept downs held in bf16: half the bytes)."""
    if resid is None:
        assert y_new is not None
        resid = y0.float() - y_new.float()  # [T, H] what the pruned layer misses, updated after each fit
    if kept_only:
        cur = torch.empty((len(kept), *down.shape[1:]), dtype=kept_dtype, device=down.device)  # [k, H, I]
    else:
        cur = down.clone()
    routed = (w_new > 0).T  # [E, T]
    check = holdout_mask(w_new.shape[0], holdout, w_new.device)  # [T] held-out tokens
    for j, e in enumerate(kept):
        i = j if kept_only else e
        if kept_only:
            cur[i] = down[e]
        on = routed[e].nonzero().squeeze(1)
        fit = ~check[on]
        if not enough_fit_tokens(int(fit.sum()), min_rows, down.shape[2]):
            continue
        a = w_new[on, e, None].float() * hidden(e, on)  # [t, I] the weighted activations
        old = cur[i].float()
        if bool(fit.all()):  # (no copies of a and of the residual's rows when every routed token fits: the same values)
            step = ridge_step(a, resid if on.numel() == resid.shape[0] else resid[on], ridge)
        else:
            step = ridge_step(a[fit], resid[on[fit]], ridge)
        new = (old + step.T).to(torch.float32 if kept_only else cur.dtype)  # [H, I]
        del step
        change = a @ (new.float() - old).T  # [t, H] the expert's output change on its tokens
        if holdout > 1:
            r = resid[on[~fit]]  # [n, H] held-out residuals
            if not float((r - change[~fit]).double().pow(2).sum()) < float(r.double().pow(2).sum()):
                continue
        cur[i] = new
        resid.index_add_(0, on, change, alpha=-1.0)
    return cur, resid.neg_().add_(y0.float())  # y0 - resid, bit for bit, in place


def ridge_step(a: torch.Tensor, resid: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The change D [I, H] of a projection that minimizes ||a D - resid||^2 + lam ||D||^2, lam = ``ridge`` x the mean
    diagonal of a^T a: D = (a^T a + lam)^-1 a^T resid, or a^T (a a^T + lam)^-1 resid (the same) when a has fewer
    rows than columns. a [t, I], resid [t, H]; products in float32, the inverse by Cholesky in float64."""
    t, width = a.shape
    few = t < width
    k = a @ a.T if few else a.T @ a  # [t, t] or [I, I]
    lam = ridge * max(float(k.diagonal().sum()) / width, 1e-12)
    k = k.double()
    k.diagonal().add_(lam)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(k)).float()
    return a.T @ (inv @ resid) if few else inv @ (a.T @ resid)
