"""Expert pruning (DESIGN.md section 5): pure scoring and selection of the routed experts to drop.

Every method turns one MoE layer into a *removal order*: a list of steps, each a set of experts removed together
(one expert; one expert per group for group-limited routers such as DeepSeek-V3's ``n_group``) with a cost.
  frequency / routing-mass / reap / random: ascending profile score (normalized to a share of the layer);
  output-error (NAEE-style greedy): on cached MoE-block inputs of the unpruned model, repeatedly make unroutable
    the expert whose removal (its tokens go to their next choice) changes the layer's routed output least;
    cost = the increase of ||y_R - y||^2 relative to the residual stream's energy on the same tokens (so layers
    compare). Memory: [T, E, H] expert outputs per layer (T = error_tokens); only tokens whose routing changes
    are recomputed per candidate.
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

from .errors import UserError
from .report import write_report

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
def removal_count(num_experts: int, ratio: float, spec: RouterSpec) -> tuple[int, str | None]:
    """n experts removed per layer for ``ratio`` (uniform layout); a note when rounded to a multiple of n_group."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio} must be between 0 and 1 (the fraction of routed experts removed)")
    E, g = num_experts, spec.n_group
    n = round(ratio * E)
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
        what = f"top-k {spec.top_k}" if spec.kind == "softmax" else f"the router's minimum {spec.min_keep()}"
        raise UserError(f"--ratio {ratio} leaves {E - n} of {E} experts, fewer than {what}: lower --ratio")
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


def output_error_order(
    outs: torch.Tensor,
    logits: torch.Tensor,
    spec: RouterSpec,
    protected: set[int],
    max_remove: int,
    correction: torch.Tensor | None = None,
    scale: float | None = None,
) -> list[Step]:
    """Greedy removal order: each step drops the expert whose removal raises the relative error least.

    outs [T, E, H] expert outputs, logits [T, E] router logits (+ router bias) on the same tokens. Error of a
    removed set R: ||y_R - y||^2 / scale summed over tokens (y = routed output with every expert; scale defaults
    to ||y||^2; pass the residual stream's energy on the same tokens to compare layers). With groups, every group
    loses one expert per round (the round is one step; its cost is the round's error increase)."""
    E = logits.shape[1]
    g, Eg = spec.n_group, E // spec.n_group
    y0 = combine(outs, *route(logits, spec, None, correction))  # [T, H]
    denom = max(float(scale if scale is not None else y0.pow(2).sum()), 1e-30)
    removed = torch.zeros(E, dtype=torch.bool)
    lost = [0] * g
    steps: list[Step] = []
    prev = 0.0
    round_experts: list[int] = []
    round_cost = 0.0
    cur_w, cur_idx = route(logits, spec, removed, correction)
    d2 = torch.zeros(logits.shape[0], dtype=torch.float64)  # [T] ||y_R - y||^2 per token
    for _ in range(max_remove):
        least = min(lost)
        cands = [e for e in range(E) if not removed[e] and e not in protected and lost[e // Eg] == least]
        if not cands:
            break
        best, best_err, best_state = -1, math.inf, None
        total = d2.sum()
        for e in cands:
            trial = removed.clone()
            trial[e] = True
            w, idx = route(logits, spec, trial, correction)
            # only tokens whose routing changes need their output recomputed (all others keep d2)
            rows = ((idx != cur_idx) | (w != cur_w)).any(-1).nonzero().squeeze(1)  # [n]
            y = (outs[rows[:, None], idx[rows]] * w[rows][:, :, None]).sum(1)  # [n, k, H] -> [n, H]
            new_d2 = (y - y0[rows]).double().pow(2).sum(-1)
            err = float(total - d2[rows].sum() + new_d2.sum()) / denom
            if err < best_err:
                best, best_err, best_state = e, err, (w, idx, rows, new_d2)
        w, idx, rows, new_d2 = best_state
        cur_w, cur_idx = w, idx
        d2[rows] = new_d2
        removed[best] = True
        lost[best // Eg] += 1
        round_experts.append(best)
        round_cost += best_err - prev
        prev = best_err
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

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} must be between 0 and 1 (the fraction of routed experts removed)")
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout!r} is not one of {', '.join(LAYOUTS)} for expert pruning")
        if self.error_tokens < 1:
            raise UserError(f"--error-tokens {self.error_tokens} must be at least 1")


def _moe_inputs(stream: Any, layer: Any, limit: int, propagate: bool = True) -> tuple[torch.Tensor, float]:
    """Run one materialized layer over the stream's cache (replacing it by the outputs when ``propagate``); return
    <= limit MoE-block inputs [T, H] and the residual stream's energy sum ||r||^2 (layer outputs) on those tokens."""
    xs: list[torch.Tensor] = []
    rs: list[torch.Tensor] = []

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        xs.append(h.detach().reshape(-1, h.shape[-1]))

    handle = stream.moe_block(layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(len(stream.cache)):
                out = stream.run_layer(layer, i)
                rs.append(out.reshape(-1, out.shape[-1]))
                if propagate:
                    stream.cache[i] = out
    finally:
        handle.remove()
    x, r = torch.cat(xs), torch.cat(rs)  # [T, H]
    step = max(1, x.shape[0] // limit)
    return x[::step][:limit], float(r[::step][:limit].float().pow(2).sum())


def output_error_orders(
    ckpt: Any, tokens: Any, spec: RouterSpec, protected: dict[int, set[int]], max_remove: int, opts: PruneOptions,
    batch_size: int, device: torch.device, sequential: int | None = None,
) -> dict[int, list[Step]]:  # fmt: skip
    """Greedy output-error orders of every MoE layer (one decoder layer in memory).

    Inputs are the unpruned model's, unless ``sequential`` = n: then each layer loses its first n experts right
    after its order is found, and later layers are measured on the pruned model's activations (uniform layout)."""
    from .progress import progress_bar
    from .prune_load import layer_view, set_layer_experts
    from .stream import LayerStream

    fam, moe = ckpt.family, set(ckpt.moe_layers)
    stream = LayerStream(ckpt, tokens.input_ids, batch_size=batch_size, device=device)
    orders: dict[int, list[Step]] = {}
    try:
        with progress_bar() as bar:
            task = bar.add_task("output-error greedy", total=len(stream.decoder_layers))
            for l, layer in stream.layers():
                if l not in moe:
                    stream.forward_layer(layer)
                    bar.advance(task)
                    continue
                x, resid = _moe_inputs(stream, layer, opts.error_tokens, sequential is None)  # [T, H]
                block = stream.moe_block(layer)
                experts, router = getattr(block, fam.experts), getattr(block, fam.router)
                I = experts.down_proj.shape[-1]
                gu = experts.gate_up_proj
                with torch.no_grad():
                    outs = expert_outputs(x, gu[:, :I], gu[:, I:], experts.down_proj, experts.act_fn)  # [T, E, H]
                    logits = x.float() @ router.weight.float().T  # [T, E]
                    if getattr(router, "bias", None) is not None:
                        logits = logits + router.bias.float()
                    corr = getattr(router, fam.correction_bias) if fam.correction_bias else None
                    scale = resid if opts.error_scale == "residual" else None
                    orders[l] = output_error_order(outs, logits, spec, protected[l], max_remove, corr, scale)
                del outs
                if sequential is not None:
                    keep = select_uniform({l: orders[l]}, sequential, ckpt.num_experts)[l]
                    set_layer_experts(stream.model, fam, l, layer_view(stream.model, fam, l).select(keep))
                    stream.forward_layer(layer)
                bar.advance(task)
    finally:
        stream.close()
    return orders


def pruned_tensors(ckpt: Any, kept: dict[int, list[int]], totals: dict[str, int]) -> Any:
    """Output tensors in hub names, one decoder layer at a time; ``totals`` gets params and tensor bytes."""
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
            for k, t in fam.write_layer(ckpt.moe_weights(l).select(kept[l]), l).items():
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
    import json
    import shutil
    import time
    from pathlib import Path

    from . import __version__
    from .checkpoint import Checkpoint
    from .data import calibration_set, check_seq_len
    from .profile import Profile, build_profile, collect, load_tokenizer, save_profile
    from .writer import atomic_dir, check_output, dir_bytes, write_shards

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

    if profile_dir is not None:
        prof = Profile.load(profile_dir)
        prof.check_model(ckpt)
        cal = prof.meta.get("calibration") or {}
        if tokens is None and opts.method == "output-error" and cal.get("name"):
            calib, samples, seq_len = cal["name"], cal["samples"], cal["seq_len"]
            tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, cal.get("seed") or 0)
    else:
        if tokens is None:
            tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, opts.seed)
        prof = build_profile(ckpt, tokens, collect(ckpt, tokens, batch_size, dev), time.time() - t0)
    if tokens is None and opts.method == "output-error":  # a profile that does not name its calibration set
        check_seq_len(seq_len, cfg)
        tokens = calibration_set(load_tokenizer(ckpt.path), calib, samples, seq_len, opts.seed)
    supers = {(int(l), int(e)) for l, e in prof.super_experts} if opts.protect_super else set()
    protected = {l: {e for ll, e in supers if ll == l} for l in layers}
    if not opts.protect_super and prof.super_experts:
        warnings.append(f"--no-protect-super: super experts {sorted(prof.super_experts)} may be removed")

    max_remove = n if opts.layout == "uniform" else E - spec.min_keep()
    scores: dict[int, torch.Tensor] = {}
    if opts.method == "output-error":
        seq = n if opts.layout == "uniform" and opts.sequential else None
        orders = output_error_orders(ckpt, tokens, spec, protected, max_remove, opts, batch_size, dev, seq)
    else:
        scores = {l: method_scores(prof, l, opts.method, opts.seed) for l in layers}
        orders = {l: score_order(scores[l], protected[l], spec.n_group) for l in layers}
    if opts.layout == "uniform":
        kept = select_uniform(orders, n, E)
    else:
        kept = select_global(orders, n * len(layers), E, spec.min_keep())
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
        "output_error_calibration": tokens.describe() if opts.method == "output-error" else None,
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
        write_shards(tmp, pruned_tensors(ckpt, kept, totals))
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
