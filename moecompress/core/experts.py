"""The one expert computation (SwiGLU-style gated MLP) every operation uses, honouring the family's activation.

For expert e with gate, up [I, H] and down [H, I] (transformers' fused ``gate_up_proj`` [E, 2I, H] holds gate
rows first): h(x) = act(x gate^T) * (x up^T) [T, I], f(x) = h(x) down^T [T, H]. ``act`` is the model's own
activation (``experts.act_fn`` of the transformers module, or ``activation(config)``): never assume SiLU.

Three kinds of ``act`` compute h differently, each exactly what the family's experts module computes:
- a plain activation (``ACT2FN``): h = act(g) * u;
- ``GatedActivation``: a family's own gated activation (transformers' ``_apply_gate`` override: Beam, GLM-5-Next,
  MiniMax-M3), h = _apply_gate([g | u]), checked channel-wise (h_j depends on g_j and u_j only, 0 maps to 0), so
  channel pruning, padding and every h-based statistic stay exact; the helpers below call it through ``gated``;
- ``ExpertsKernel``: experts with biases and their own gate (gpt-oss) run as ``BiasedExperts``, whose ``act_fn``
  ``routed_forward`` and ``expert_outputs`` compute with exactly, while the plain helpers refuse it.
- ``Ungated``: experts with no gate projection (transformers' ``has_gate=False``: Nemotron-H, h = act(x up^T), its
  relu^2). The view keeps the [E, 2I, H] layout every operation slices, with the gate half a copy of the up rows that
  nothing computes with: h = act(u) (``gated``, ``fused_hidden``, ``expert_outputs``, ``routed_forward`` use the up
  rows only, bit for bit transformers' eager computation) and the family writes only up and down.
- ``PostNorm``: experts that normalize each expert's output (transformers' ``has_post_expert_norm=True``, MuseSpark:
  f = norm(h down^T), one norm module shared by the layer's experts, applied before the routing weight).
  ``routed_forward``, ``expert_outputs`` and ``expert_forward`` apply the norm, bit for bit the family's eager
  computation (profile, masked-routing prune, merge similarity). The norm mixes the hidden channels of f (an RMS
  over them), so f is not linear in h: ``expert_hidden``, ``fused_hidden`` and ``gated`` (the helpers of channel
  pruning, refit, merge alignment, GPTQ / LP-plan error measurement and the packed quantized kernel, which form
  f = h down^T themselves) refuse in one line.
Calling a ``GatedActivation``, an ``ExpertsKernel``, an ``Ungated`` or a ``PostNorm`` as act(g) refuses in one line: a
code path that multiplies act(g) * u itself would be silently wrong on these experts.

The layer stream may hold the fused weights in the checkpoint's dtype (bf16) while the hidden states are float32:
``routed_forward``, ``expert_outputs`` and the ``ExpertsKernel`` upcast one expert's weights at a time to the
hidden states' dtype (bf16 -> float32 is exact, so the results are the float32 layer's bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError

Act = Callable[[torch.Tensor], torch.Tensor]


def clamped_swiglu(g: torch.Tensor, u: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated activation (``GptOssExperts._apply_gate``): (clamp(u, ±limit) + 1) * g' sigmoid(alpha g'),
    g' = min(g, limit). g, u [n, I] -> [n, I]."""
    g = g.clamp(min=None, max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


class GatedActivation:
    """A family's own gated activation: h = ``_apply_gate``([g | u]) of its transformers experts class (an override
    of transformers' act(g) * u), called with the scalars and parameter-free modules it reads (``swiglu_limit``,
    ``act_fn``, ...) copied from the experts module. Made by ``own_gate`` only after ``check_channelwise`` showed
    it is channel-wise (h_j from g_j and u_j alone, any width) and maps 0 to 0. ``fused(gate_up_out [n, 2I])`` is
    bit for bit the family's eager computation; ``glu(g, u)`` the same on split halves."""

    def __init__(self, experts: nn.Module, family: str):
        self.apply_gate = type(experts)._apply_gate
        self.family, self.cls = family, type(experts).__name__
        self.owner = _gate_owner(experts)

    def fused(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """[..., 2I] (gate first) -> [..., I]."""
        return self.apply_gate(self.owner, gate_up_out)

    def glu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g, u [..., I] -> h [..., I]."""
        return self.fused(torch.cat([g, u], dim=-1))

    def __call__(self, *args: Any) -> torch.Tensor:
        raise UserError(
            f"{self.family}'s experts use their own gated activation ({self.cls}._apply_gate), which this code path "
            "does not apply (it computes act(gate) * up itself), so it is refused for this model type"
        )


def _gate_owner(experts: nn.Module) -> SimpleNamespace:
    """What ``_apply_gate`` may read of its module: plain scalar attributes and parameter-free child modules."""
    owner = SimpleNamespace()
    for name in dir(experts):  # the instance's and its class's (a class-level constant)
        try:
            v = getattr(experts, name)
        except Exception:  # a property that cannot be read on this module
            continue
        if not name.startswith("__") and isinstance(v, (bool, int, float, str)):
            setattr(owner, name, v)
    for name, child in experts.named_children():
        if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            continue
        setattr(owner, name, child)
    return owner


def check_channelwise(glu: Callable[[torch.Tensor], torch.Tensor], scale: float = 1.0) -> str | None:
    """None when ``glu`` ([n, 2I] gate rows first -> [n, I]) is channel-wise and maps 0 to 0, else the reason.

    Probed on random values over +-``scale`` x 4 (past the clamps of the known gates): output j must not change when
    the other channels are permuted or removed (up to float rounding: vectorized kernels round a tail apart), and a
    zero channel (atom padding) must give exactly 0."""
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")  # (also under a meta device context: the stream builds its modules there)
    g, u = ((torch.rand(6, 9, generator=gen, device=cpu) * 2 - 1) * 4 * scale for _ in range(2))
    try:
        h = glu(torch.cat([g, u], dim=-1))
        perm = torch.randperm(9, generator=gen, device=cpu)
        hp = glu(torch.cat([g[:, perm], u[:, perm]], dim=-1))
        hn = glu(torch.cat([g[:, :4], u[:, :4]], dim=-1))
        h0 = glu(torch.zeros(6, 18, device=cpu))
    except Exception as err:  # a gate that cannot run on plain float tensors
        return f"its _apply_gate fails on a probe ({type(err).__name__}: {str(err)[:80]})"
    if tuple(h.shape) != (6, 9) or not torch.isfinite(h).all():
        return f"its _apply_gate maps [n, 2I] to {list(h.shape)}, not [n, I]"
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731 (vectorized tails round apart)
    if not close(hp, h[:, perm]) or not close(hn, h[:, :4]):
        return "its _apply_gate mixes channels (channel j's output depends on other channels)"
    if not torch.equal(h0, torch.zeros_like(h0)):
        return "its _apply_gate does not map a zero channel to 0"
    return None


def own_gate(experts: nn.Module, family: str | None = None) -> GatedActivation:
    """The ``GatedActivation`` of a transformers experts module that overrides ``_apply_gate`` with concatenated
    gate/up halves and no biases; a ValueError with the reason when that gate is not channel-wise."""
    if not getattr(experts, "is_concatenated", True) or getattr(experts, "has_bias", False):
        raise ValueError(f"{type(experts).__name__} overrides _apply_gate on interleaved or biased gate/up rows")
    act = GatedActivation(experts, family or type(experts).__name__)
    limits = [v for k, v in vars(act.owner).items() if "limit" in k and isinstance(v, (int, float))]
    reason = check_channelwise(act.fused, max([1.0, *map(abs, limits)]))
    if reason is not None:
        raise ValueError(f"{type(experts).__name__} overrides _apply_gate and {reason}")
    return act


def experts_activation(experts: nn.Module) -> Act:
    """What computes h for a transformers (or moecompress) experts module: its ``GatedActivation`` where its class
    overrides transformers' default ``_apply_gate`` (gpt-oss's biased experts aside), else its ``act_fn``."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(experts, "has_post_expert_norm", False) or isinstance(getattr(experts, "act_fn", None), PostNorm):
        raise PostNorm(activation(None), nn.Identity(), type(experts).__name__).refuse()  # (the packed kernel: no norm)
    if getattr(experts, "has_gate", True) is False:  # transformers' gateless experts (Nemotron-H)
        return Ungated(experts.act_fn, type(experts).__name__)
    gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    if gate is _default_apply_gate or getattr(experts, "has_bias", False) or hasattr(experts, "gate_up_bias"):
        return experts.act_fn
    return own_gate(experts)


def gated(act: Act, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = act(g) * u, or the family's own gated activation of (g, u): g, u [..., I] -> [..., I]."""
    if isinstance(act, PostNorm):
        raise act.refuse()
    if isinstance(act, (GatedActivation, Ungated)):
        return act.glu(g, u)
    return act(g) * u


class ExpertsKernel:
    """The ``act_fn`` of ``BiasedExperts``: the expert computation of experts with biases and their own gated
    activation (gpt-oss). ``routed_forward`` and ``expert_outputs`` compute with it exactly; the plain helpers
    (``expert_hidden``, ``fused_hidden``, calling it as act(g)) refuse in one line, since an operation that models
    experts as act(gate x) * (up x) without biases would be silently wrong on these experts."""

    def __init__(self, module: BiasedExperts):
        self.module = module

    def hidden(self, x: torch.Tensor, gate_up: torch.Tensor, e: int) -> torch.Tensor:
        """h(x) of expert e: x [n, H], gate_up [2I, H] (gate rows first) -> [n, I]."""
        g, u = nn.functional.linear(x, gate_up.to(x.dtype), self.module.gate_up_bias[e]).chunk(2, dim=-1)
        return self.module.glu(g, u)

    def output(self, h: torch.Tensor, down: torch.Tensor, e: int) -> torch.Tensor:
        """f = h down^T + b_down: h [n, I], down [H, I] -> [n, H]."""
        return nn.functional.linear(h, down.to(h.dtype), self.module.down_bias[e])

    def refuse(self) -> UserError:
        return UserError(
            f"this model's experts carry biases and a {self.module.gate} activation ({self.module.family}) that this "
            "operation's expert math does not model, so it is refused for this model type (profile, expert pruning "
            "by frequency, routing-mass or reap, eval and load work)"
        )

    def __call__(self, *args: Any) -> torch.Tensor:
        raise self.refuse()


class BiasedExperts(nn.Module):
    """The experts of a family whose module is not act(g) * u over [E, 2I, H] (gpt-oss: transposed, gate/up
    interleaved, biases, clamped SwiGLU), held in the internal view's layout so every moecompress path reads it the
    same way: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I], gate_up_bias [E, 2I], down_bias [E, H].
    ``forward`` is the family's eager computation (same values up to float rounding)."""

    def __init__(self, E: int, H: int, I: int, family: str, gate: str, alpha: float, limit: float):
        super().__init__()
        if gate != "clamped_swiglu":
            raise ValueError(f"unknown expert gate {gate!r}")
        self.num_experts, self.family, self.gate, self.alpha, self.limit = E, family, gate, alpha, limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I), requires_grad=False)
        self.gate_up_bias = nn.Parameter(torch.empty(E, 2 * I), requires_grad=False)
        self.down_bias = nn.Parameter(torch.empty(E, H), requires_grad=False)
        self.act_fn = ExpertsKernel(self)

    def glu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(g, u, self.alpha, self.limit)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(self.gate_up_proj, self.down_proj, self.act_fn, hidden, top_k_index, top_k_weights)


class GatedExperts(nn.Module):
    """The experts of a family with its own channel-wise gated activation (``GatedActivation``) in the view's
    layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I], ``act_fn`` the gate; ``forward`` is
    ``routed_forward``: the family's eager computation (F.linear, its ``_apply_gate``, F.linear, weighting), same
    ops in the same order."""

    def __init__(self, E: int, H: int, I: int, act_fn: GatedActivation):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I), requires_grad=False)
        self.act_fn = act_fn

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(self.gate_up_proj, self.down_proj, self.act_fn, hidden, top_k_index, top_k_weights)


class Ungated:
    """The activation of experts without a gate projection (``has_gate=False``, Nemotron-H): h = act(u), u = x up^T.
    ``act`` is the experts module's own ``act_fn`` (Nemotron-H: relu^2). The view's gate rows are a copy of the up
    rows and never computed with: ``glu(g, u)`` = act(u), ``fused([g | u])`` = act(u). Channel j of h depends on
    up row j alone, so channel pruning, padding (act(0) = 0 is checked) and every h-based statistic stay exact."""

    def __init__(self, act: Act, family: str):
        self.act, self.family = act, family
        zero = act(torch.zeros(2, device=torch.device("cpu")))
        if not torch.equal(zero, torch.zeros_like(zero)):
            raise ValueError(f"{family}'s gateless expert activation does not map 0 to 0")

    def fused(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """[..., 2I] (gate half first, ignored) -> [..., I]."""
        return self.act(gate_up_out[..., gate_up_out.shape[-1] // 2 :])

    def glu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.act(u)

    def __call__(self, *args: Any) -> torch.Tensor:
        raise UserError(
            f"{self.family}'s experts have no gate projection (h = act(up x)), and this code path computes "
            "act(gate) * up itself, so it is refused for this model type"
        )


class UngatedExperts(GatedExperts):
    """The experts of a family without a gate projection in the view's layout: gate_up_proj [E, 2I, H] (the gate half
    a copy of the up rows, unused), down_proj [E, H, I], ``act_fn`` an ``Ungated``; ``forward`` is ``routed_forward``:
    F.linear(x, up), act, F.linear(h, down), weighting: transformers' eager computation, same ops in the same order."""

    def __init__(self, E: int, H: int, I: int, act_fn: Ungated):  # type: ignore[override]
        super().__init__(E, H, I, act_fn)  # type: ignore[arg-type]


class PostNorm:
    """The activation of experts with a norm after each expert (``has_post_expert_norm=True``, MuseSpark): ``act`` the
    inner activation (h = act(g) * u, or a ``GatedActivation`` / ``Ungated``), ``norm`` the experts module's
    ``post_expert_norm`` (one module for every expert of the layer): f = norm(h down^T)."""

    def __init__(self, act: Act, norm: nn.Module, family: str):
        if isinstance(act, (PostNorm, ExpertsKernel)):
            raise ValueError(f"{family}: a post-expert norm over {type(act).__name__} experts is not modelled")
        self.act, self.norm, self.family = act, norm, family

    def output(self, h: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """f = norm(h down^T): h [n, I], down [H, I] -> [n, H]."""
        return self.norm(nn.functional.linear(h, down.to(h.dtype)))

    def refuse(self) -> UserError:
        return UserError(
            f"{self.family}'s experts normalize each expert's output (has_post_expert_norm=True: f = norm(h down^T), "
            "an RMS over the hidden channels), which this operation's expert math (f linear in h) does not model, "
            "so it is refused for this model type"
        )

    def __call__(self, *args: Any) -> torch.Tensor:
        raise self.refuse()


class PostNormedExperts(nn.Module):
    """The experts of a family with a post-expert norm in the view's layout: gate_up_proj [E, 2I, H] (gate rows first),
    down_proj [E, H, I], ``post_expert_norm`` the family's own norm module (its weight saved at
    ``experts.post_expert_norm.weight`` as transformers does), ``act_fn`` a ``PostNorm``; ``forward`` is
    ``routed_forward``: F.linear, act, F.linear, the norm, weighting: the family's eager computation, same ops in the
    same order."""

    def __init__(self, E: int, H: int, I: int, act: Act, norm: nn.Module, family: str):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I), requires_grad=False)
        self.post_expert_norm = norm
        self.act_fn = PostNorm(act, norm, family)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(self.gate_up_proj, self.down_proj, self.act_fn, hidden, top_k_index, top_k_weights)


def expert_outputs(gate_up: torch.Tensor, down: torch.Tensor, act: Act, x: torch.Tensor) -> torch.Tensor:
    """Every expert's unweighted output on the same tokens: gate_up [E, 2I, H], down [E, H, I], x [N, H] ->
    [E, N, H] (with the experts' biases and own activation for ``BiasedExperts``)."""
    if isinstance(act, ExpertsKernel):
        return torch.stack([act.output(act.hidden(x, gate_up[e], e), down[e], e) for e in range(gate_up.shape[0])])
    if isinstance(act, PostNorm):  # the norm after each expert: f = norm(h down^T), one expert at a time
        return torch.stack(
            [act.output(fused_hidden(x, gate_up[e].to(x.dtype), act.act), down[e]) for e in range(len(down))]
        )
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:  # narrow weights: one expert upcast at a time
        out = torch.empty((gate_up.shape[0], x.shape[0], down.shape[1]), dtype=x.dtype, device=x.device)  # [E, N, H]
        for e in range(gate_up.shape[0]):
            out[e : e + 1] = expert_outputs(gate_up[e : e + 1].to(x.dtype), down[e : e + 1].to(x.dtype), act, x)
        return out
    if isinstance(act, Ungated):  # the up rows only
        h = act.act(torch.einsum("nh,eih->eni", x, gate_up[:, gate_up.shape[1] // 2 :]))  # [E, N, I]
        return torch.einsum("eni,ehi->enh", h, down)
    gu = torch.einsum("nh,eih->eni", x, gate_up)  # [E, N, 2I]
    h = act.fused(gu) if isinstance(act, GatedActivation) else gated(act, *gu.chunk(2, dim=-1))
    return torch.einsum("eni,ehi->enh", h, down)


def activation(config: object) -> Act:
    """The experts' activation named by ``config.hidden_act`` (transformers' ACT2FN), SiLU when unnamed."""
    from transformers.activations import ACT2FN

    return ACT2FN[getattr(config, "hidden_act", None) or "silu"]


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Act) -> torch.Tensor:
    """h(x) = act(x gate^T) * (x up^T): x [T, H], gate/up [I, H] -> [T, I] (refused for a ``PostNorm``: its callers
    model the expert output as linear in h)."""
    if isinstance(act, (ExpertsKernel, PostNorm)):
        raise act.refuse()
    return gated(act, nn.functional.linear(x, gate), nn.functional.linear(x, up))


def expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Act) -> torch.Tensor:
    """f(x) = h(x) down^T: x [T, H], gate/up [I, H], down [H, I] -> [T, H] (unweighted expert output; with the
    post-expert norm for a ``PostNorm``)."""
    if isinstance(act, PostNorm):
        return act.output(fused_hidden(x, torch.cat([gate, up]), act.act), down)
    return nn.functional.linear(expert_hidden(x, gate, up, act), down)


def fused_hidden(x: torch.Tensor, gate_up: torch.Tensor, act: Act) -> torch.Tensor:
    """h(x) from transformers' fused ``gate_up [2I, H]`` (gate rows first): x [T, H] -> [T, I]. The same values as
    ``expert_hidden`` up to float rounding; bit for bit what the eager kernel (and ``routed_forward``) computes.
    Refused for a ``PostNorm`` (its callers form f = h down^T themselves, without the norm)."""
    if isinstance(act, ExpertsKernel):
        raise act.refuse()
    if isinstance(act, PostNorm):  # its callers form f = h down^T themselves: without the norm
        raise act.refuse()
    if isinstance(act, Ungated):  # transformers' eager gateless experts: act(F.linear(x, up))
        return act.act(nn.functional.linear(x, gate_up[gate_up.shape[0] // 2 :]))
    gu = nn.functional.linear(x, gate_up)  # [T, 2I]
    if isinstance(act, GatedActivation):
        return act.fused(gu)
    g, u = gu.chunk(2, dim=-1)
    return act(g) * u


def routed_forward(
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    act: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    observe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """The eager experts computation of transformers (same ops, same order), calling
    ``observe(e, token_idx, top_k_pos, h [n, I], f [n, H])`` with each expert's unweighted output.
    ``recompute`` (without ``observe``): under autograd each expert's term is checkpointed (non-reentrant
    torch.utils.checkpoint: the same graph and ops, its intermediates recomputed in the backward instead of kept)."""
    if recompute and observe is not None:
        raise ValueError("recompute would call observe again in the backward")
    out = torch.zeros_like(hidden)
    E = gate_up.shape[0]
    kernel = act if isinstance(act, ExpertsKernel) else None  # biased experts (gpt-oss): their own computation
    post = isinstance(act, PostNorm)  # a norm after each expert (MuseSpark): f = norm(h down^T)
    inner = act.act if isinstance(act, PostNorm) else act

    def term(e: int, token_idx: torch.Tensor, pos: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if kernel is None:
            h = fused_hidden(x[token_idx], gate_up[e].to(x.dtype), inner)  # [n, I] (upcast: narrow weights)
            f = act.output(h, down[e]) if post else nn.functional.linear(h, down[e].to(h.dtype))  # [n, H]
        else:
            h = kernel.hidden(x[token_idx], gate_up[e], e)
            f = kernel.output(h, down[e], e)
        if observe is not None:
            observe(e, token_idx, pos, h, f)
        return f * w[token_idx, pos, None]

    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= E:
            continue
        token_idx, pos = torch.where(top_k_index == e)
        if recompute and torch.is_grad_enabled():
            t = checkpoint(term, e, token_idx, pos, hidden, top_k_weights, use_reentrant=False)
            out = _IndexAdd.apply(out, token_idx, t.to(out.dtype))  # (index_add_ would keep t for its backward)
        else:
            t = term(e, token_idx, pos, hidden, top_k_weights)
            out.index_add_(0, token_idx, t.to(out.dtype))
    return out


class _IndexAdd(torch.autograd.Function):
    """out.index_add_(0, idx, src) (in place) whose backward keeps only idx (autograd's index_add_ keeps src [n, H]
    too); the same gradients: grad for out, grad.index_select(0, idx) for src."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.mark_dirty(out)
        return out.index_add_(0, idx, src)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (idx,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, idx)
