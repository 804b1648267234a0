"""Profile statistics of routed experts (DESIGN.md section 4), as pure tensor code.

For MoE layer l, expert e, tokens X_e routed to e, renormalized top-k probability p_e(x), unweighted expert
output f_e(x) = W_down h(x) with h(x) = act(W_gate x) * (W_up x):
  frequency    phi_e = |X_e| / (k T)
  routing mass w_e   = sum_{x in X_e} p_e(x), normalized within the layer
  REAP         S_e   = mean_{x in X_e} p_e(x) ||f_e(x)||_2
  max |out|    a_e   = max_{x in X_e} ||f_e(x)||_inf (and its channel)
  moments      m_ej  = mean_{x in X_e} h_j(x)^2
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.experts import (
    expert_outputs,
    routed_forward,  # noqa: F401  (re-exported: the eager experts computation)
)


@dataclass
class LayerAccumulator:
    """Running sums for one MoE layer over all calibration batches."""

    num_experts: int
    width: int  # I
    hidden: int  # H
    num_domains: int = 0
    sim_tokens: int = 256
    counts: torch.Tensor = field(init=False)  # [E]
    mass: torch.Tensor = field(init=False)  # [E] sum of p
    reap_sum: torch.Tensor = field(init=False)  # [E] sum of p * ||f||
    max_abs: torch.Tensor = field(init=False)  # [E]
    max_channel: torch.Tensor = field(init=False)  # [E] channel of max |f|
    sq_sum: torch.Tensor = field(init=False)  # [E, I] sum of h^2
    domain_counts: torch.Tensor = field(init=False)  # [D, E]
    logit_gram: torch.Tensor = field(init=False)  # [E, E] sum over tokens of logits logits^T
    sim_inputs: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        f64 = torch.float64
        self.counts = torch.zeros(E, dtype=torch.long)
        self.mass = torch.zeros(E, dtype=f64)
        self.reap_sum = torch.zeros(E, dtype=f64)
        self.max_abs = torch.zeros(E, dtype=f64)
        self.max_channel = torch.full((E,), -1, dtype=torch.long)
        self.sq_sum = torch.zeros(E, self.width, dtype=f64)
        self.domain_counts = torch.zeros(max(self.num_domains, 1), E, dtype=torch.long)
        self.logit_gram = torch.zeros(E, E, dtype=f64)

    def to(self, device: torch.device) -> None:
        """Keep the running sums on ``device`` (the compute device: no host sync per expert); finalize brings them
        back to the CPU."""
        for name in ("counts", "mass", "reap_sum", "max_abs", "max_channel", "sq_sum", "domain_counts", "logit_gram"):
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, t.to(device))

    @property
    def sim_collected(self) -> int:
        return sum(x.shape[0] for x in self.sim_inputs)


def observe_into(
    acc: LayerAccumulator,
    top_k_weights: torch.Tensor,  # [T, k]
    token_domain: torch.Tensor | None,  # [T] domain id per token
) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """An observer for ``routed_forward`` that adds one batch into ``acc``.

    The sums stay on the batch's device (moved there once per batch if needed): no CPU-GPU sync per expert.
    """
    dev = top_k_weights.device
    acc.to(dev)
    p_all = top_k_weights.double() / top_k_weights.double().sum(-1, keepdim=True).clamp_min(1e-30)  # [T, k]
    dom = token_domain.to(dev) if token_domain is not None else None

    def observe(e: int, token_idx: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> None:
        p = p_all[token_idx, pos]  # [n]
        fd = f.detach().double()
        acc.counts[e] += token_idx.numel()
        acc.mass[e] += p.sum()
        acc.reap_sum[e] += (p * fd.norm(dim=-1)).sum()
        amax = fd.abs().amax(dim=0)  # [H]
        m, ch = amax.max(dim=0)
        better = m > acc.max_abs[e]  # kept as a tensor: no host sync
        acc.max_abs[e] = torch.where(better, m, acc.max_abs[e])
        acc.max_channel[e] = torch.where(better, ch, acc.max_channel[e])
        acc.sq_sum[e] += h.detach().double().pow(2).sum(0)
        if dom is not None:
            acc.domain_counts[:, e] += torch.bincount(dom[token_idx], minlength=acc.num_domains)

    return observe


def add_router_batch(acc: LayerAccumulator, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """Router-logit Gram matrix and a token sample for output similarity."""
    lg = logits.detach().double()  # [T, E]
    acc.to(lg.device)
    acc.logit_gram += lg.T @ lg
    acc.tokens += logits.shape[0]
    need = acc.sim_tokens - acc.sim_collected
    if need > 0:
        step = max(1, hidden.shape[0] // need)
        acc.sim_inputs.append(hidden.detach()[::step][:need].cpu())


def output_similarity(
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    act: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,  # [N, H] sampled tokens, every expert evaluated on all of them
    chunk: int | None = None,  # tokens per float64 chunk (default: ~8M float64 values)
) -> torch.Tensor:
    """Mean per-token cosine similarity of expert outputs: [E, E].

    The outputs are computed once in the hidden states' dtype ([E, N, H], float32: N tokens, not the layer's size);
    the cosines are summed in float64 a chunk of ``chunk`` tokens at a time ([c, E, H] float64, ~64 MB by default),
    so no float64 copy of all of [E, N, H] is made. Equal to normalizing all of it in float64 and one einsum, up to
    float64 rounding (the sums run in another order)."""
    f = expert_outputs(gate_up, down, act, x)  # [E, N, H] (biased experts: their own computation)
    E, N, H = f.shape
    step = chunk or max(1, (1 << 23) // max(E * H, 1))
    sim = torch.zeros(E, E, dtype=torch.float64, device=f.device)
    for s in range(0, N, step):
        fc = f[:, s : s + step].transpose(0, 1).double()  # [c, E, H]
        fc = fc / fc.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as nn.functional.normalize
        sim += torch.bmm(fc, fc.transpose(1, 2)).sum(0)  # [E, E]
    return sim / N


def gram_to_cosine(gram: torch.Tensor) -> torch.Tensor:
    d = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / (d[:, None] * d[None, :])


def finalize(acc: LayerAccumulator, top_k: int) -> dict[str, torch.Tensor]:
    """Per-expert statistics of one layer from its accumulator (on the CPU)."""
    acc.to(torch.device("cpu"))
    n = acc.counts.double()
    safe = n.clamp_min(1)
    total = acc.mass.sum()
    return {
        "tokens": acc.counts,
        "frequency": n / max(top_k * acc.tokens, 1),
        "routing_mass": acc.mass / total if total > 0 else acc.mass,
        "reap": acc.reap_sum / safe,
        "max_abs_out": acc.max_abs,
        "max_abs_channel": acc.max_channel,
        "channel_sq_mean": acc.sq_sum / safe[:, None],
        "router_similarity": gram_to_cosine(acc.logit_gram),
        "domain_counts": acc.domain_counts,
    }


def super_experts(
    max_abs: dict[tuple[int, int], float], num_layers: int, quantile: float = 0.995, median_factor: float = 10.0
) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Super experts (Su et al. 2025) with a magnitude guard for small pools.

    Pool a_e over experts of layers l < round(0.75 L); super if a_e > P99.5, a_e > max/10 and a_e > 10 x median.
    """
    cutoff = round(0.75 * num_layers)
    pool = {k: v for k, v in max_abs.items() if k[0] < cutoff}
    rule: dict[str, Any] = {
        "rule": "a_e > quantile(pool, q) and a_e > max(pool)/10 and a_e > median_factor * median(pool)",
        "pool_layers_below": cutoff,
        "quantile": quantile,
        "median_factor": median_factor,
    }
    if not pool:
        rule.update(threshold_quantile=None, threshold_max=None, threshold_median=None)
        return [], rule
    vals = torch.tensor(list(pool.values()), dtype=torch.float64)
    q = torch.quantile(vals, quantile).item()
    mx = vals.max().item()
    med = vals.median().item()
    rule.update(threshold_quantile=q, threshold_max=mx / 10, threshold_median=median_factor * med, pool_size=len(pool))
    chosen = sorted(k for k, v in pool.items() if v > q and v > mx / 10 and v > median_factor * med)
    return chosen, rule
