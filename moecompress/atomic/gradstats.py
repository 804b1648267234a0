"""Gradient statistics G_e = mean over routed tokens of g g^T, g = dL/d f_e(x) (HEAPr's Fisher factor).

f_e(x) is expert e's unweighted output; the MoE block returns y = sum_e p_e(x) f_e(x), so
dL/d f_e(x) = p_e(x) * dL/dy(x). A forward hook on each layer's Experts module records (top-k index, top-k weight)
and a tensor hook on its output receives dL/dy during one backward pass of the LM loss; the accumulator splits it
per expert. Nothing else of the backward is kept (parameters need no gradients).

Memory per expert (float32, hidden size H, rank r), while accumulating -> stored:
    full      H^2            -> H^2         (Qwen3-30B, H=2048: 16.8 MB/expert, 103 GB for 48x128 experts)
    diag      H              -> H           (8 KB/expert)
    lowrank   2rH + H        -> rH + H      (Frequent Directions sketch of the g rows + exact diagonal; r=32:
                                             0.53 MB -> 0.27 MB per expert at H=2048)
Channel second moments m_{e,j} (I floats per expert) can be accumulated in the same forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core import dist
from ..core.experts import Act, expert_hidden
from .heapr import ChunkedG, GradStat, LowRankG

KINDS = ("full", "diag", "lowrank")


def bytes_per_expert(kind: str, hidden: int, rank: int = 32, dtype_bytes: int = 4) -> dict[str, int]:
    """Bytes one expert's G statistic needs while accumulating and once stored."""
    if kind == "full":
        acc = stored = hidden * hidden
    elif kind == "diag":
        acc = stored = hidden
    elif kind == "lowrank":
        acc, stored = 2 * rank * hidden + hidden, rank * hidden + hidden
    else:
        raise ValueError(f"unknown Hessian approximation {kind!r}; use one of {KINDS}")
    return {"accumulating": acc * dtype_bytes, "stored": stored * dtype_bytes}


class GradStatAccumulator:
    """Accumulates one MoE layer's per-expert G_e from gradient rows g [n, H] (already scaled by p_e)."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        kind: str = "full",
        rank: int = 32,
        device: torch.device | str = "cpu",
        rows: list[int] | None = None,
    ) -> None:
        """rows (full only): the experts whose G is kept, in this order ([len(rows), H, H]; default all); the
        others' tokens are only counted."""
        if kind not in KINDS:
            raise ValueError(f"unknown Hessian approximation {kind!r}; use one of {KINDS}")
        if rows is not None and kind != "full":
            raise ValueError("rows are for the full statistic")
        self.E, self.H, self.kind, self.rank = num_experts, hidden, kind, rank
        self.rows = rows
        self.slot = {e: i for i, e in enumerate(rows)} if rows is not None else None
        self.counts = torch.zeros(num_experts, dtype=torch.long)  # [E]
        if kind == "full":
            n = num_experts if rows is None else len(rows)
            self.sum = torch.zeros(n, hidden, hidden, device=device)  # [E or len(rows), H, H]
        else:
            self.diag = torch.zeros(num_experts, hidden, device=device)  # [E, H]
        if kind == "lowrank":
            self.sketch = torch.zeros(num_experts, 2 * rank, hidden, device=device)  # [E, 2r, H]
            self.fill = [0] * num_experts

    def update(self, expert: int, g: torch.Tensor) -> None:
        """Add gradient rows g [n, H] of tokens routed to `expert`."""
        g = g.detach().float()
        self.counts[expert] += g.shape[0]
        if self.kind == "full":
            self.sum[expert if self.slot is None else self.slot[expert]].addmm_(g.T, g)
            return
        self.diag[expert] += g.square().sum(0)
        if self.kind == "lowrank":
            self._sketch_rows(expert, g)

    def _sketch_rows(self, e: int, g: torch.Tensor) -> None:
        """Frequent Directions (Liberty 2013): B^T B <= sum g g^T, error <= ||A||_F^2 / (r + 1) in spectral norm."""
        r, cap = self.rank, 2 * self.rank
        while g.shape[0]:
            room = cap - self.fill[e]
            take = g[:room]
            self.sketch[e, self.fill[e] : self.fill[e] + take.shape[0]] = take
            self.fill[e] += take.shape[0]
            g = g[room:]
            if self.fill[e] == cap:
                _, S, Vt = torch.linalg.svd(self.sketch[e].double(), full_matrices=False)  # S [2r], Vt [2r, H]
                shrunk = (S[:r].square() - S[r].square()).clamp_min(0).sqrt()  # [r]
                self.sketch[e].zero_()
                self.sketch[e, :r] = (shrunk[:, None] * Vt[:r]).float()
                self.fill[e] = r

    def update_routed(
        self,
        grad: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        experts: Iterable[int] | None = None,
    ) -> None:
        """Split dL/dy [T, H] per expert: g = p_e(x) dL/dy(x) for x routed to e (top_k_* : [T, k]). With
        ``experts``, only those experts' statistics are accumulated (every expert's token count is)."""
        grad = grad.detach().reshape(-1, self.H).float()  # [T, H]
        w = top_k_weights.detach().float()  # [T, k]
        only = None if experts is None else set(experts)
        if self.slot is not None:
            only = set(self.slot) if only is None else only & set(self.slot)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.E:
                continue
            tok, pos = torch.where(top_k_index == e)
            if only is not None and e not in only:
                self.counts[e] += tok.numel()
                continue
            self.update(e, grad[tok] * w[tok, pos, None])

    def result(self, in_place: bool = False) -> GradStat:
        """Mean statistic over routed tokens (experts with no tokens get zeros).

        in_place: divide the full [E, H, H] sums in place (no second layer-sized copy; the accumulator is spent).
        """
        dev = (self.sum if self.kind == "full" else self.diag).device
        n = self.counts.clamp_min(1).float().to(dev)  # [E]
        if self.rows is not None:
            n = n[self.rows]  # [len(rows)]
        if self.kind == "full":
            return self.sum.div_(n[:, None, None]) if in_place else self.sum / n[:, None, None]
        if self.kind == "diag":
            return self.diag / n[:, None]
        # lowrank: G ~ B^T B / n + diag(residual)
        U = torch.stack([self.sketch[e].T for e in range(self.E)]) / n.sqrt()[:, None, None]  # [E, H, 2r]
        U = _top_r(U, self.rank)  # [E, H, r]
        resid = (self.diag / n[:, None] - U.square().sum(-1)).clamp_min(0)  # [E, H]
        return LowRankG(factors=U, residual_diag=resid)


def _top_r(U: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r factor of U U^T for each expert (U: [E, H, c] -> [E, H, r])."""
    Q, S, _ = torch.linalg.svd(U.double(), full_matrices=False)  # Q [E, H, c], S [E, c]
    return (Q[..., :r] * S[:, None, :r]).float()


def chunked_g(
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_experts: int, hidden: int, chunk: int
) -> ChunkedG:
    """Full G of one layer made ``chunk`` experts at a time from the kept (dL/dy [T_b, H], top-k index, top-k
    weight) of every batch, replayed in batch order: each expert's sums are the whole accumulator's, bit for bit."""
    dev = rows[0][0].device if rows else torch.device("cpu")

    def build(ids: list[int]) -> torch.Tensor:
        acc = GradStatAccumulator(num_experts, hidden, "full", device=dev, rows=ids)
        for g, i, w in rows:
            acc.update_routed(g, i, w)
        return acc.result(in_place=True)  # [len(ids), H, H]

    return ChunkedG(num_experts, chunk, build)


def routed_counts(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_experts: int) -> torch.Tensor:
    """Routed (token, slot) pairs per expert over the kept batches, as the accumulator counts them: [E] long."""
    counts = torch.zeros(num_experts, dtype=torch.long)
    for _, i, _ in rows:
        i = i.reshape(-1).cpu()
        counts += torch.bincount(i[(i >= 0) & (i < num_experts)], minlength=num_experts)
    return counts


@dataclass
class LayerGradStats:
    """What one gradient pass yields for one MoE layer."""

    G: GradStat
    counts: torch.Tensor  # [E] routed tokens seen
    m: torch.Tensor | None  # [E, I] channel second moments (if asked for)


def collect_grad_stats(
    model: torch.nn.Module,
    experts_modules: dict[int, torch.nn.Module],
    batches: Iterable[torch.Tensor],
    kind: str = "full",
    rank: int = 32,
    gate_up_fn: Callable[[torch.nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None,
    act: Act | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, LayerGradStats]:
    """One forward + backward of the summed next-token NLL per batch; returns G (and m) per MoE layer.

    experts_modules: layer index -> that layer's Experts module (forward(hidden [T,H], top_k_index [T,k],
    top_k_weights [T,k]) -> [T,H]). Only these layers accumulate, so a big model can run one group of layers
    per pass. batches: input_ids [B, S]. gate_up_fn(module) -> (W_gate [E,I,H], W_up [E,I,H]) enables m, with
    ``act`` (None: each Experts module's own ``act_fn``).
    Parameters get no gradients; the embedding output is the only leaf that requires grad.
    """
    accs: dict[int, GradStatAccumulator] = {}
    msum: dict[int, torch.Tensor] = {}
    handles = []
    for layer, mod in experts_modules.items():
        handles.append(attach_hook(mod, layer, accs, msum, kind, rank, gate_up_fn, act))
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for step, ids in enumerate(batches):
            with torch.enable_grad():
                logits = model(input_ids=ids).logits  # [B, S, V]
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
                )
                loss.backward()
            if progress is not None:
                progress(step + 1)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {l: finish(accs[l], msum.get(l)) for l in experts_modules if l in accs}


def attach_hook(
    mod: torch.nn.Module,
    layer: int,
    accs: dict[int, GradStatAccumulator],
    msum: dict[int, torch.Tensor],
    kind: str,
    rank: int,
    gate_up_fn: Callable[[torch.nn.Module], tuple[torch.Tensor, torch.Tensor]] | None,
    act: Act | None = None,
    sink: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> Any:
    """Forward hook on an Experts module: records routing, adds m sums (activation ``act``, None: the module's
    own ``act_fn``), and hooks dL/dy of its output (into the accumulator, or to ``sink(grad, top_k_index,
    top_k_weights)`` when given)."""
    act = act if act is not None else mod.act_fn

    def hook(mod, args, kwargs, out):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        hidden, idx, w = (list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs])[:3]
        if layer not in accs:
            accs[layer] = GradStatAccumulator(_num_experts(mod, idx), out.shape[-1], kind, rank, out.device)
        if gate_up_fn is not None:
            _add_moments(msum, layer, mod, hidden.detach(), idx, gate_up_fn, act)
        if out.requires_grad:
            i, ww = idx.detach(), w.detach()
            if sink is not None:
                out.register_hook(lambda grad: sink(grad, i, ww))
            else:
                out.register_hook(lambda grad: accs[layer].update_routed(grad, i, ww))

    return mod.register_forward_hook(hook, with_kwargs=True)


def share_rows_(acc: GradStatAccumulator) -> None:
    """Under torchrun, when each rank accumulated only its experts (``update_routed(..., experts=dist.share(E))``):
    every rank then holds every expert's sums (exact; a no-op in one process)."""
    if dist.world() == 1:
        return
    if acc.kind == "full":
        dist.fill_rows_(acc.sum, acc.E)
        return
    dist.fill_rows_(acc.diag, acc.E)
    if acc.kind == "lowrank":
        dist.fill_rows_(acc.sketch, acc.E)
        fill = torch.tensor(acc.fill)
        acc.fill = dist.fill_rows_(fill, acc.E).tolist()


def finish(acc: GradStatAccumulator, msum: torch.Tensor | None) -> LayerGradStats:
    """Mean statistics of one layer, on the CPU (the accumulator is spent: full G is divided in place)."""
    m = msum.cpu() / acc.counts.clamp_min(1)[:, None] if msum is not None else None
    G = acc.result(in_place=True)
    G = LowRankG(G.factors.cpu(), G.residual_diag.cpu()) if isinstance(G, LowRankG) else G.cpu()
    return LayerGradStats(G=G, counts=acc.counts.clone(), m=m)


def _num_experts(mod: torch.nn.Module, idx: torch.Tensor) -> int:
    n = getattr(mod, "num_experts", None)
    return int(n) if n else int(idx.max().item()) + 1


def _add_moments(msum, layer, mod, hidden, idx, gate_up_fn, act) -> None:
    """m_{e,j} sums: h_j(x)^2 over tokens x routed to e (counts come from the gradient accumulator)."""
    W_gate, W_up = gate_up_fn(mod)  # [E, I, H]
    if layer not in msum:
        msum[layer] = torch.zeros(W_gate.shape[0], W_gate.shape[1], dtype=torch.float64, device=hidden.device)
    x = hidden.reshape(-1, W_gate.shape[-1]).float()  # [T, H]
    with torch.no_grad():
        for e in torch.unique(idx).tolist():
            if not 0 <= e < W_gate.shape[0]:
                continue
            tok = torch.where(idx == e)[0]
            h = expert_hidden(x[tok], W_gate[e].float(), W_up[e].float(), act)  # [n, I]
            msum[layer][e] += h.double().square().sum(0)
