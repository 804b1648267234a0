"""Behavioural routing check: does a family's own MoE block route exactly as moecompress re-implements it?

Operations that re-implement routing (prune's output-error search and refits, merge, budget plans) compute the
router's logits from the router weight (``x @ W^T`` + bias) and turn them into top-k weights with
``prune.order.route(logits, RouterSpec.from_config(fam, cfg), correction=...)``. ``derive`` accepts that for a
derived family when its block and router source equal a hand-written family's; this module accepts it too when the
family's own block code, run on random inputs, passes the same (indices, weights) to its experts.

The block (a deepcopy of derive's meta-device block) is run with:
  its experts module replaced by ``_Capture``, which records the (top_k_index, top_k_weights) the block's own code
    passes and returns a stand-in routed output sum_k w_tk S[idx_tk] x_t ([T, H], S [E] random factors: linear in
    the expert's input and its weight, so a block that scales the inputs or the outputs is seen);
  every other child holding tensors (shared experts, shared gates, latent projections) except the router and the
    correction bias's holder replaced by ``_Stub``: first the identity (their values do not matter to the routing),
    then zeros (a child on the routing path changes the routing then, and the block's output must be the routed
    output alone);
  the router (and correction bias) materialized on CPU in float32 with seeded normal values (correction biases
    large enough to change the choice). Memory: the router's E x H floats and T x H hidden states.
Verified only when, for every seed and both stub kinds, the index sets per token are equal, the weights per (token,
expert) agree within 1e-5 relative, and (zero stubs) the block's output equals the stand-in output of ``route``'s
choice. Group-limited routers (n_group > 1) also get a second run of the block rebuilt with one expert fewer per
group, its router rows the kept rows: it must route as ``route`` does with those experts masked, which is what
removing experts relies on (``removal_verified``). Any exception is a failure with its reason, never a crash.
The RouterSpec is tried from ``candidates``: ``RouterSpec.from_config``'s first, then its variants (score, choice,
renormalization, a config key's routed scaling); the first that passes is returned as ``variant`` and recorded on the
Family (``router_variant``), so later ``from_config`` calls return it; none: the first candidate's difference.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..prune.order import RouterSpec, route

SEEDS = (0, 1)
TOKENS = 256
RTOL = 1e-5


@dataclass(frozen=True)
class RoutingCheck:
    verified: bool  # the block routes as route() on random inputs
    removal_verified: bool  # group-limited routing: removing one expert per group routes as route() masked
    reason: str  # the first difference ("" when verified)
    variant: tuple[tuple[str, Any], ...] = ()  # the RouterSpec variant it routes by (Family.router_variant)


class _Mismatch(Exception):
    """The block's routing differs from route(): ``str(err)`` is the first difference."""


class _Capture(torch.nn.Module):
    """Stands in for the experts module: records (hidden, top_k_index, top_k_weights) of every call and returns
    sum_k w_tk S[idx_tk] x_t in the input's shape."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale  # [E]
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden_states: Any, top_k_index: Any = None, top_k_weights: Any = None, *a: Any, **kw: Any):
        self.calls.append((hidden_states, top_k_index, top_k_weights))
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()  # [T, H]
        idx, w = top_k_index.reshape(x.shape[0], -1).long(), top_k_weights.reshape(x.shape[0], -1).float()
        return _standin(x, w, idx, self.scale).to(hidden_states.dtype).reshape(hidden_states.shape)


def _standin(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * scale[idx[t, k]] * x[t]: [T, H] (scale [E]: one random factor per expert)."""
    return x * (w.float() * scale[idx]).sum(1, keepdim=True)


class _Stub(torch.nn.Module):
    """Stands in for a child module that is not the router: returns its first tensor input, or zeros of its shape."""

    def __init__(self, zero: bool):
        super().__init__()
        self.zero = zero

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if t is None:
            raise TypeError("called without a tensor input")
        return torch.zeros_like(t) if self.zero else t


def _keep_children(fam: Any) -> set[str]:
    """The block children run as they are: the router's owner and the correction bias's holder."""
    keep = {fam.router.split(".")[0]}
    if fam.correction_bias:
        owner = fam.correction_module_key().rpartition(".")[0]
        if owner:
            keep.add(owner.split(".")[0])
    return keep


def _prepared(meta_block: torch.nn.Module, fam: Any, scale: torch.Tensor, zero: bool) -> torch.nn.Module:
    """A CPU float32 copy of the block with experts captured and other tensor-holding children stubbed; its own
    tensors (router, correction bias) left unset (``torch.empty``)."""
    block = copy.deepcopy(meta_block)
    keep = _keep_children(fam)
    for name, child in list(block.named_children()):
        if name == fam.experts:
            setattr(block, name, _Capture(scale))
        elif name not in keep and any(True for _ in [*child.parameters(), *child.buffers()]):
            setattr(block, name, _Stub(zero))
    block = block.to_empty(device="cpu").float().eval()
    return block


def _fill(block: torch.nn.Module, fam: Any, H: int, seed: int) -> None:
    """Seeded normal values for every tensor the block holds: router rows ~ N(0, 1/H) (logits ~ N(0, 1)), router
    bias ~ N(0, 0.25), correction bias ~ N(0, 0.25) (sigmoid scores differ by ~0.2: it changes choices)."""
    g = torch.Generator().manual_seed(1000 + seed)
    corr_key = fam.correction_module_key() if fam.correction_bias else None
    router_w = f"{fam.router}.weight"
    with torch.no_grad():
        for n, t in [*block.named_parameters(), *block.named_buffers()]:
            if n.startswith(f"{fam.experts}."):
                continue
            if not t.is_floating_point():
                t.zero_()
                continue
            std = H**-0.5 if n == router_w else 0.5 if n == corr_key else 0.5
            t.copy_(torch.randn(t.shape, generator=g) * std)


def _run(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts' input [T, H], captured indices [T, k], weights [T, k], block output [T, H]) of one block call."""
    cap = block.get_submodule(_experts_name(block))
    cap.calls.clear()
    with torch.no_grad():
        out = block(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.numel() != x.numel():  # ([1, T, H] or [T, H])
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _Mismatch(f"the block returns {got} for hidden states {tuple(x.shape)}")
    if len(cap.calls) != 1:
        raise _Mismatch(f"the block calls its experts {len(cap.calls)} times (once expected)")
    hid, idx, w = cap.calls[0]
    if not all(isinstance(t, torch.Tensor) for t in (hid, idx, w)):
        raise _Mismatch("the block does not pass (hidden, top_k_index, top_k_weights) tensors to its experts")
    T = x.shape[0] * x.shape[1]
    if hid.numel() != T * x.shape[-1] or idx.shape != w.shape or idx.numel() % T or idx.dim() != 2:
        raise _Mismatch(
            f"the block passes its experts hidden {tuple(hid.shape)}, top_k_index {tuple(idx.shape)} and "
            f"top_k_weights {tuple(w.shape)} for {T} tokens (route(): [T, H], [T, k], [T, k])"
        )
    return hid.reshape(T, -1).float(), idx.reshape(T, -1).long(), w.reshape(T, -1).float(), out.reshape(T, -1)


def _experts_name(block: torch.nn.Module) -> str:
    return next(n for n, c in block.named_children() if isinstance(c, _Capture))


def _compare(idx: torch.Tensor, w: torch.Tensor, ridx: torch.Tensor, rw: torch.Tensor, what: str) -> float:
    """The block's (idx, w) [T, k] equal route()'s as index sets per token and weights per (token, expert), or
    route()'s weights are one constant c times the block's (Beam applies its routed scaling to the experts' output):
    returns c (1.0 when equal)."""
    if idx.shape != ridx.shape:
        raise _Mismatch(f"{what}: the block picks {idx.shape[1]} experts per token, route() {ridx.shape[1]}")
    a, ai = idx.sort(1)
    b, bi = ridx.sort(1)
    rows = (a != b).any(1).nonzero()
    if rows.numel():
        t = int(rows[0])
        raise _Mismatch(f"{what}: token {t} goes to experts {a[t].tolist()}, route() picks {b[t].tolist()}")
    wa, wb = w.gather(1, ai), rw.float().gather(1, bi)
    bad = ((wa - wb).abs() > RTOL * wb.abs() + 1e-7).nonzero()
    c = float(wb.sum() / wa.sum()) if float(wa.sum()) != 0 else 0.0
    if bad.numel() and c > 0 and not ((wa * c - wb).abs() > RTOL * wb.abs() + 1e-7).any():
        return c  # route()'s weights = c x the block's: c must be applied to the experts' output (checked there)
    if bad.numel():
        t, j = (int(v) for v in bad[0])
        raise _Mismatch(
            f"{what}: token {t}'s weight for expert {int(a[t, j])} is {float(wa[t, j]):.6g}, "
            f"route() gives {float(wb[t, j]):.6g}"
        )
    return 1.0


def _logits(block: torch.nn.Module, fam: Any, x: torch.Tensor) -> torch.Tensor:
    """The router logits the pipeline computes (prune.transform / merge.choose): x W^T (+ the router's bias)."""
    router = fam.router_of(block)
    logits = x.float() @ router.weight.float().T  # [T, E]
    if fam.router_bias and getattr(router, "bias", None) is not None:
        logits = logits + router.bias.float()
    return logits


def _check_runs(
    blocks: tuple[torch.nn.Module, torch.nn.Module], fam: Any, spec: RouterSpec, H: int, seed: int,
    keep: torch.Tensor | None = None, full: torch.nn.Module | None = None,
) -> None:  # fmt: skip
    """One seed on the identity-stub and the zero-stub block; with ``keep`` the blocks hold only those experts
    (rows copied from ``full``) and the reference is route() over the full router with the others masked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TOKENS, H, generator=g)  # [1, T, H]
    ref = full if full is not None else blocks[0]
    xf = x.reshape(-1, H)
    logits = _logits(ref, fam, xf)
    removed = None
    if keep is not None:
        removed = torch.ones(logits.shape[1], dtype=torch.bool)
        removed[keep] = False
    rw, ridx = route(logits, spec, removed, fam.correction_of(ref))
    what = f"seed {seed}" + (f", {int(removed.sum())} experts removed" if removed is not None else "")
    for zero, block in zip((False, True), blocks, strict=True):
        hid, idx, w, out = _run(block, x)
        if keep is not None:
            idx = keep[idx]
        c = _compare(idx, w, ridx, rw, what + (", shared parts zero" if zero else ""))
        if zero:  # the output: sum_k w f with route()'s w (a constant c on the experts' output included)
            cap = block.get_submodule(_experts_name(block))
            full_scale = cap.scale if keep is None else full.get_submodule(_experts_name(full)).scale
            want = _standin(xf, rw.float(), ridx, full_scale)
            err = float((out.float() - want).norm() / want.norm().clamp_min(1e-30))
            if not err <= 1e-4 and c != 1.0:
                raise _Mismatch(f"{what}: the block's weights are {1 / c:.6g} x route()'s (a scaling route() lacks)")
            if not err <= 1e-4:
                raise _Mismatch(
                    f"{what}: the block's output is not its experts' routed output under route()'s weights "
                    f"(relative difference {err:.2e}: it scales the experts' inputs or outputs, or adds or applies "
                    "another module)"
                )


def _reduced_block(meta_block: torch.nn.Module, fam: Any, cfg: Any, E2: int, layer: int) -> torch.nn.Module:
    """The block's class built on the meta device from ``cfg`` with E2 routed experts (every count key)."""
    cfg2 = copy.deepcopy(cfg)
    for key in fam.count_keys:
        setattr(cfg2, key, E2)
    errors = []
    with torch.device("meta"):
        for args in ((cfg2,), (cfg2, layer)):
            try:
                return type(meta_block)(*args)
            except Exception as err:  # block constructors differ: (config) or (config, layer_idx)
                errors.append(f"{type(err).__name__}: {err}")
    raise _Mismatch(f"its block class cannot be rebuilt with {E2} experts ({errors[-1][:120]})")


def _copy_kept(src: torch.nn.Module, dst: torch.nn.Module, keep: torch.Tensor, E: int) -> None:
    """dst's tensors from src's of the same name: the kept experts' entries along a dimension of size E."""
    theirs = dict([*src.named_parameters(), *src.named_buffers()])
    with torch.no_grad():
        for n, t in [*dst.named_parameters(), *dst.named_buffers()]:
            s = theirs.get(n)
            if s is None:
                raise _Mismatch(f"the rebuilt block holds {n}, the block does not")
            if s.shape != t.shape:
                dims = [d for d in range(s.dim()) if s.shape[d] == E and t.shape[d] == keep.numel()]
                if len(dims) != 1:
                    raise _Mismatch(f"the rebuilt block's {n} is {list(t.shape)}, the block's {list(s.shape)}")
                s = s.index_select(dims[0], keep)
            t.copy_(s)


SCALING_KEYS = ("router_scaling_factor", "routed_scaling_factor")


def candidates(fam: Any, cfg: Any) -> list[tuple[tuple[tuple[str, Any], ...], RouterSpec]]:
    """(variant, spec) pairs to try, ``RouterSpec.from_config``'s first: sigmoid scores instead of softmax (no
    correction bias: Flint), softmax scores (ERNIE-4.5) or the choice by logits + correction (Kolibri1), top-k
    renormalization toggled (Jamba), a routed scaling read from a config key (HY-V3's router_scaling_factor)."""
    base = RouterSpec.from_config(replace(fam, router_variant=()), cfg)
    if base.kind == "softmax":
        kinds: list[dict[str, Any]] = [{}] + ([{"kind": "sigmoid_group"}] if base.n_group <= 1 else [])
    else:
        kinds = [{}, {"score": "softmax"}]
    choices: list[dict[str, Any]] = [{}, {"choice": "logits"}] if fam.correction_bias else [{}]
    norms: list[dict[str, Any]] = [{}, {"norm_topk": not base.norm_topk}]
    scalings: list[dict[str, Any]] = [{}]
    for key in SCALING_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) not in (1.0, base.scaling):
            scalings.append({"scaling_key": key})
    out, seen = [], set()
    for parts in itertools.product(kinds, choices, norms, scalings):
        var = tuple(sorted(kv for p in parts for kv in p.items()))
        kind = dict(var).get("kind", base.kind)
        if kind == "softmax" and any(k in dict(var) for k in ("scaling_key", "choice", "score")):
            continue  # route()'s softmax ranks by logits and applies no scaling: the same as without
        spec = RouterSpec.from_config(replace(fam, router_variant=var), cfg)
        if spec not in seen:
            seen.add(spec)
            out.append((var, spec))
    return out


@torch.no_grad()
def check_routing(
    meta_block: torch.nn.Module, fam: Any, cfg: Any, layer: int = 0,
    only: list[tuple[tuple[tuple[str, Any], ...], RouterSpec]] | None = None,
) -> RoutingCheck:  # fmt: skip
    """Run the family's own block (``meta_block``: derive's, on the meta device) against ``route`` (module
    docstring) under each of ``candidates`` (or ``only`` those) in turn: the first that matches is the result's
    ``variant``; none: the first candidate's difference. ``cfg``: the config the block was built from (a wrapper's
    text config); never raises."""
    first = ""
    try:
        H = int(cfg.hidden_size)
        E = int(fam.router_of(meta_block).weight.shape[0])
        scale = torch.rand(E, generator=torch.Generator().manual_seed(7)) + 0.5  # [E] factors in [0.5, 1.5)
        blocks = (_prepared(meta_block, fam, scale, False), _prepared(meta_block, fam, scale, True))
        found = None
        for var, spec in only if only is not None else candidates(fam, cfg):
            try:
                for seed in SEEDS:
                    for b in blocks:
                        _fill(b, fam, H, seed)
                    _check_runs(blocks, fam, spec, H, seed)
            except _Mismatch as err:
                first = first or str(err)  # from_config's difference is the one reported
                continue
            found = var, spec
            break
        if found is None:
            raise _Mismatch(first)
        var, spec = found
    except _Mismatch as err:
        return RoutingCheck(False, False, str(err))
    except Exception as err:  # the family's code raised on the stubbed block: not verified, with the reason
        return RoutingCheck(False, False, f"running its block raised {type(err).__name__}: {str(err)[:160]}")
    if spec.n_group <= 1:
        return RoutingCheck(True, True, "", var)
    try:
        g = spec.n_group
        per = E // g
        if per - 1 < 2 or spec.top_k > (per - 1) * spec.topk_group:
            raise _Mismatch(f"groups of {per} experts cannot lose one and still route top-{spec.top_k}")
        reduced = _reduced_block(meta_block, fam, cfg, E - g, layer)
        for seed in SEEDS:
            gen = torch.Generator().manual_seed(100 + seed)
            gone = torch.randint(per, (g,), generator=gen) + torch.arange(g) * per  # one expert per group
            keep = torch.tensor([e for e in range(E) if e not in set(gone.tolist())])
            full = _prepared(meta_block, fam, scale, False)
            _fill(full, fam, H, seed)
            small = tuple(_prepared(reduced, fam, scale[keep], z) for z in (False, True))
            for b in small:
                _copy_kept(full, b, keep, E)
            _check_runs(small, fam, spec, H, seed, keep=keep, full=full)  # type: ignore[arg-type]
    except _Mismatch as err:
        return RoutingCheck(True, False, f"removal: {err}", var)
    except Exception as err:
        return RoutingCheck(True, False, f"removal: running the rebuilt block raised {type(err).__name__}: {err}", var)
    return RoutingCheck(True, True, "", var)
