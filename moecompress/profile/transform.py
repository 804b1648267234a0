"""The profile as an engine transform: per-expert statistics of each MoE layer, gathered while the layer runs.

Each calibration batch is observed into its own ``LayerAccumulator`` (one add per expert and batch), and the
batches are folded into the layer's accumulator in batch order: the sums are those of one running accumulator,
bit for bit. Under torchrun each rank observes its own batches during its forward (``observes_split``) and the
per-batch accumulators travel to every rank (one exact exchange per round of W batches) before the fold, so every
rank holds the single-process statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import dist
from ..core.engine import LayerContext, Transform
from .stats import LayerAccumulator, add_router_batch, finalize, observe_into, output_similarity

_SUMS = ("counts", "mass", "reap_sum", "max_abs", "max_channel", "sq_sum", "domain_counts", "logit_gram")


def sim_quota(tokens: list[int], sim_tokens: int) -> list[int]:
    """Tokens each batch gives to the output-similarity sample (``add_router_batch`` over batches of ``tokens``
    tokens, in order): batch b takes every step-th of its tokens up to what the sample still needs."""
    out, have = [], 0
    for t in tokens:
        need = sim_tokens - have
        take = min(need, len(range(0, t, max(1, t // need)))) if need > 0 else 0
        out.append(take)
        have += take
    return out


def fold(acc: LayerAccumulator, part: LayerAccumulator) -> None:
    """Add one batch's accumulator into the running one (what observing that batch into ``acc`` would do)."""
    for name in ("counts", "mass", "reap_sum", "sq_sum", "domain_counts", "logit_gram"):
        getattr(acc, name).add_(getattr(part, name))
    better = part.max_abs > acc.max_abs
    acc.max_abs = torch.where(better, part.max_abs, acc.max_abs)
    acc.max_channel = torch.where(better, part.max_channel, acc.max_channel)
    acc.tokens += part.tokens
    acc.sim_inputs.extend(part.sim_inputs)


def pack(part: LayerAccumulator, sim_rows: int) -> torch.Tensor:
    """One batch's accumulator as a float64 vector (counts and channels are exact in float64), the similarity
    sample padded to ``sim_rows`` rows."""
    sim = torch.zeros(sim_rows, part.hidden, dtype=torch.float64)
    if part.sim_inputs:
        got = torch.cat(part.sim_inputs).double()
        sim[: got.shape[0]] = got
    fields = [getattr(part, n).detach().cpu().double().reshape(-1) for n in _SUMS]
    return torch.cat([*fields, torch.tensor([float(part.tokens)], dtype=torch.float64), sim.reshape(-1)])


def unpack(vec: torch.Tensor, like: LayerAccumulator, sim_rows: int, sim_dtype: torch.dtype) -> LayerAccumulator:
    """The inverse of ``pack`` (``like``: an accumulator of the layer's shapes; ``sim_rows``: the batch's sample)."""
    part = LayerAccumulator(like.num_experts, like.width, like.hidden, like.num_domains, like.sim_tokens)
    at = 0
    for n in _SUMS:
        t = getattr(part, n)
        setattr(part, n, vec[at : at + t.numel()].reshape(t.shape).to(t.dtype))
        at += t.numel()
    part.tokens = int(vec[at])
    sim = vec[at + 1 :].reshape(-1, like.hidden)[:sim_rows]
    part.sim_inputs = [sim.to(sim_dtype)] if sim_rows else []
    return part


class ProfileTransform(Transform):
    """Observes every batch's routed computation (the model's own routing) into one ``LayerAccumulator`` per
    layer; changes nothing. ``results[l]`` holds layer l's statistics (``stats.finalize`` + output similarity)."""

    name = "profile"
    wants_inputs = False
    observes_forward = True
    observes_split = True
    changes_block = False
    reads_narrow = True  # the experts' weights are read through core.experts (upcast per expert)

    def __init__(self, num_experts: int, top_k: int, domains: list[str], window_domains: list[str], sim_tokens: int):
        self.num_experts, self.top_k, self.sim_tokens = num_experts, top_k, sim_tokens
        self.num_domains = len(domains)
        self.window_domain = torch.tensor([domains.index(d) for d in window_domains])  # [N]
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self._acc: LayerAccumulator | None = None
        self._parts: dict[int, LayerAccumulator] = {}  # batch -> that batch's accumulator (not folded yet)
        self._quota: list[int] = []
        self._router_in: list[torch.Tensor] = []  # the router's own input, where it is not the experts' (MuseSpark)
        self._hook: Any = None

    def moe_layer(self, ctx: LayerContext) -> None:
        down = ctx.experts.down_proj  # [E, H, I]
        self._acc = LayerAccumulator(self.num_experts, down.shape[-1], down.shape[1], self.num_domains, self.sim_tokens)
        self._parts = {}
        self._quota = sim_quota([b.numel() for b in ctx.engine.batches], self.sim_tokens)
        self._router_in = []
        if ctx.router.weight.shape[-1] != down.shape[1]:  # the router reads the block input, the experts a projection
            # of it (MuseSpark: pre_expert_norm(pre_expert_proj(x)), moe_hidden_size wide): its logits from its input
            def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                self._router_in.append(x.detach().reshape(-1, x.shape[-1]))

            self._hook = ctx.router.register_forward_pre_hook(grab, with_kwargs=True)

    def observe_forward(
        self, ctx: LayerContext, batch: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> Any:
        router, acc, bs = ctx.router, self._acc, ctx.engine.batch_size
        assert acc is not None
        part = LayerAccumulator(acc.num_experts, acc.width, acc.hidden, acc.num_domains, self._quota[batch])
        self._parts[batch] = part
        x = hidden
        if self._hook is not None:  # the router's own input (the block's), seen just before these experts ran
            x = self._router_in.pop()
            self._router_in.clear()
            if x.shape[0] != hidden.shape[0]:
                raise RuntimeError(f"the router saw {x.shape[0]} tokens, its experts {hidden.shape[0]}")
        logits = torch.nn.functional.linear(x.float(), router.weight.float())  # [T, E]
        if getattr(router, "bias", None) is not None:
            logits = logits + router.bias.float()
        add_router_batch(part, logits, hidden)
        rows = self.window_domain[batch * bs : (batch + 1) * bs]  # [B]
        td = rows[:, None].expand(-1, hidden.shape[0] // max(rows.numel(), 1)).reshape(-1)  # [T]
        return observe_into(part, w, td)

    def _fold_all(self, ctx: LayerContext) -> LayerAccumulator:
        """Every batch's accumulator folded in batch order (exchanged across ranks when each saw its own)."""
        acc = self._acc
        assert acc is not None
        acc.to(torch.device("cpu"))
        n, W = len(ctx.engine.batches), dist.world()
        if len(self._parts) == n:  # one process, or every batch observed on every rank (the gathered inputs)
            for b in range(n):
                part = self._parts.pop(b)
                part.to(torch.device("cpu"))
                fold(acc, part)
            return acc
        dtype = ctx.engine.stream.dtype  # the MoE inputs' dtype (the sample's)
        rows = max(self._quota, default=0)
        size = sum(getattr(acc, name).numel() for name in _SUMS) + 1 + rows * acc.hidden
        for first in range(0, n, W):  # a round: batches first .. first + W - 1, batch first + r on rank r
            vecs = torch.zeros(W, size, dtype=torch.float64)  # [W, packed]
            mine = self._parts.pop(first + dist.rank(), None)
            if mine is not None:
                vecs[dist.rank()] = pack(mine, rows)
            dist.fill_rows_(vecs, W)
            for r in range(min(W, n - first)):
                fold(acc, unpack(vecs[r], acc, self._quota[first + r], dtype))
        return acc

    def observed(self, ctx: LayerContext) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._router_in = None, []
        acc = self._fold_all(ctx)
        stats = finalize(acc, self.top_k)
        if self.sim_tokens > 0:  # 0: no output similarity (``prune``'s own profile pass: nothing there reads it)
            x = torch.cat(acc.sim_inputs).to(ctx.engine.device)
            experts = ctx.experts
            stats["output_similarity"] = output_similarity(
                experts.gate_up_proj, experts.down_proj, experts.act_fn, x
            ).cpu()
        self.results[ctx.index] = stats
        self._acc = None

    def section(self) -> dict[str, Any]:
        return {"layers": sorted(self.results)}
