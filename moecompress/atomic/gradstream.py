"""The HEAPr gradient pass one decoder layer at a time: an engine pass forward, then backward in reverse layer order.

Forward: the engine runs layer after layer (nothing changes the layers) and every layer's inputs are kept (L
activation caches of [N, S, H]). Head: final norm + lm_head on the last hidden state -> summed next-token NLL
-> dL/dh_L per batch. Backward (this module's own loop: the engine only runs forward, and the loss needs every
layer first): from the top layer down, each layer is materialized again, re-run on its cached inputs with
autograd, and back-propagated with the incoming gradient; the Experts hooks of gradstats see dL/dy of that layer,
and the gradient at the layer's input becomes the next (lower) layer's incoming gradient. Only one layer's weights
and one layer's G accumulators live at a time; ``on_layer`` turns a layer's statistics into scores so full G never
exists for more than one layer (Qwen3-30B: 128 experts x 16.8 MB = 2.1 GB instead of 103 GB for 48 layers).
Activations: (L + 1) x N x S x H floats (Qwen3-30B, 64 x 256 tokens: about 6.6 GB in fp32) kept per layer in an
ActivationCache: in memory, or (``spill``, by default past SPILL_BYTES for all layers) in files that stay on disk
and are read back one batch at a time, so host memory then holds one batch of inputs and one batch of gradients.
Under torchrun each rank runs the forward and the backward on its own share of the batches (the engine's
``stream``: the kept activations and the backward split W ways); each layer's dL/dy rows are then gathered in
batch order and every rank accumulates G for its own experts only (``dist.share``: G's memory and its
accumulation split W ways), in the single-process order, so G is bit for bit one process's; with
``split_experts`` False the rows of G are then exchanged so every rank holds all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..core import dist
from ..core.checkpoint import DTYPE_BYTES, Checkpoint
from ..core.engine import Engine, Transform
from ..core.experts import ExpertsKernel, gated, routed_forward
from ..core.interface import observing
from ..core.limits import expert_chunk
from ..core.memprobe import probe
from ..core.progress import progress_bar
from ..core.stream import ActivationCache, LayerStream, release_freed
from .gradstats import (
    GradStatAccumulator,
    LayerGradStats,
    attach_hook,
    chunked_g,
    finish,
    routed_counts,
    share_rows_,
)

SPILL_BYTES = 4 * 1024**3  # kept layer inputs beyond this go to files


def _gate_up(mod: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    I = mod.down_proj.shape[-1]
    return mod.gate_up_proj[:, :I], mod.gate_up_proj[:, I:]  # [E, I, H] each


class _FirstInputs(Transform):
    """Keeps the first decoder layer's inputs (this rank's cache right after the capture)."""

    name = "gradient inputs"
    wants_inputs = False
    changes_block = False
    reads_narrow = True  # reads no expert weight: the stream holds the routed experts in the checkpoint's dtype

    def __init__(self, keep: ActivationCache):
        self.keep = keep

    def start(self, engine: Engine) -> None:
        cache = engine.stream.cache
        for i in range(len(cache)):
            self.keep.append(cache[i])


class _UpcastLinear(torch.autograd.Function):
    """y = x w^T for a weight held narrow (bf16): upcast to x's dtype in the forward and again in the backward, so
    the graph keeps the narrow weight, not its float32 copy (which would be a whole float32 layer per batch).
    dL/dx = dL/dy w, the same mm as F.linear's own backward with the float32 weight (bit for bit)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        return grad.matmul(w.to(grad.dtype)), None  # (x [.., in]: matmul folds the leading dims into one mm)


class _NarrowKernel(ExpertsKernel):
    """The plain expert computation act(x gate^T) * (x up^T) down^T of ``routed_forward``, with ``_UpcastLinear``
    for the narrow weights (the backward through a layer held in bf16)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__(module)  # type: ignore[arg-type]
        self.act = module.act_fn

    def hidden(self, x: torch.Tensor, gate_up: torch.Tensor, e: int) -> torch.Tensor:
        g, u = _UpcastLinear.apply(x, gate_up).chunk(2, dim=-1)  # gate_up [2I, H], gate rows first
        return gated(self.act, g, u)  # act(g) * u, or the family's own gate (core.experts.GatedActivation)

    def output(self, h: torch.Tensor, down: torch.Tensor, e: int) -> torch.Tensor:
        return _UpcastLinear.apply(h, down)


def _narrow_attention(layer: torch.nn.Module) -> list[torch.nn.Linear]:
    """Hold the bias-free float32 projections of ``layer``'s attention (``self_attn``) in bfloat16 where that is
    exact (every weight a bfloat16 value: a bf16 checkpoint upcast by the stream), computed through ``_UpcastLinear``
    (the same F.linear on the same float32 values, forward and backward): the backward then holds them at half
    size (DeepSeek-V3 dims: 514 -> 257 MB). Returns the modules changed (``_widen`` undoes their forwards)."""
    attn = getattr(layer, "self_attn", None)
    done: list[torch.nn.Linear] = []
    if not isinstance(attn, torch.nn.Module):
        return done
    for m in attn.modules():
        if type(m) is not torch.nn.Linear or m.bias is not None or m.weight.dtype != torch.float32:
            continue
        narrow = m.weight.detach().to(torch.bfloat16)
        if not torch.equal(narrow.float(), m.weight):
            continue
        m.weight = torch.nn.Parameter(narrow, requires_grad=False)
        m.forward = lambda x, w=narrow: _UpcastLinear.apply(x, w)  # type: ignore[method-assign]
        done.append(m)
    return done


def _widen(mods: list[torch.nn.Linear]) -> None:
    for m in mods:
        del m.forward


def _narrow(experts: torch.nn.Module | None, dtype: torch.dtype) -> bool:
    """The experts hold plain (act(g) * u) weights narrower than the stream's dtype."""
    if experts is None or isinstance(getattr(experts, "act_fn", None), ExpertsKernel):
        return False
    return experts.gate_up_proj.dtype != dtype or experts.down_proj.dtype != dtype


def _keep_all(acts: ActivationCache, cache: Any) -> None:
    for i in range(len(cache)):
        acts.append(cache[i])  # in memory: the same tensor, no copy


HEAD_LOGIT_BYTES = 256 << 20  # float32 logits made at once by the head gradients (positions chunked beyond)


def head_positions(batch: int, seq: int, vocab: int | None) -> int:
    """Positions of a [batch, seq] batch whose float32 logits [batch, n, vocab] the head makes at once: all of them
    when they fit HEAD_LOGIT_BYTES, else equal chunks under it (Qwen3's 152k vocabulary at 8 x 2048 tokens: 10 GB
    per float32 copy of the logits, ~3 copies while the loss and its gradient are built)."""
    if not vocab or 4 * batch * seq * vocab <= HEAD_LOGIT_BYTES:
        return seq
    step = max(1, HEAD_LOGIT_BYTES // (4 * batch * vocab))
    parts = -(-seq // step)
    return -(-seq // parts)  # equal chunks (no small remainder)


def _head_grads(ls: LayerStream, hidden: Any, grads: ActivationCache, vocab: int | None = None) -> None:
    """dL/dh [B, S, H] of the summed next-token NLL at the last layer's outputs ``hidden``, per batch; with the
    ``vocab`` size, the logits of ``head_positions`` positions at a time (each row's gradient is its own: the norm,
    the head and the log-softmax work row by row and the summed loss gives every row weight 1)."""
    for i, ids in enumerate(ls.batches):
        h = hidden[i].to(ls.device).detach()
        # every position's logits with the last one's target ignored, not a [B (S-1), V] copy of the others (nor,
        # backward, the zero-padded [B, S, V] gradient of that slice): each row's gradient is the same, the last
        # row's 0 either way; the logits are not referenced past the loss (its graph keeps only their log-softmax)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        targets = targets.to(ls.device)
        B, S = ids.shape
        step = head_positions(B, S, vocab)
        if step >= S:
            grads.append(_head_grad(ls, h, targets))
            continue
        out = torch.empty_like(h)
        for s0 in range(0, S, step):
            out[:, s0 : s0 + step] = _head_grad(ls, h[:, s0 : s0 + step], targets[:, s0 : s0 + step])
        grads.append(out)
        del h, out


def _head_grad(ls: LayerStream, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """dL/dh of the summed NLL of the head's logits on ``h`` [B, n, H] against ``targets`` [B, n] (-100: none)."""
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = ls.head(h)  # [B, n, V]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        del logits
        loss.backward()
    assert h.grad is not None
    return h.grad.detach()


def _backward_layer(
    ls: LayerStream,
    l: int,
    layer: torch.nn.Module,
    inputs: ActivationCache,
    grads: ActivationCache,
    experts: torch.nn.Module | None = None,
) -> None:
    """Back-propagate every batch's incoming gradient through decoder layer ``l`` (re-run on its kept ``inputs``;
    the Experts hooks see dL/dy on the way); ``grads`` then holds the gradients at the layer's inputs. Routed
    ``experts`` held narrow run through ``_NarrowKernel`` (the graph holds no float32 copy of their weights)."""
    for i in range(len(grads)):
        x = inputs[i].to(ls.device).detach().requires_grad_(True)
        again = x.numel() * x.element_size() >= RECOMPUTE_ATTENTION_BYTES
        with torch.enable_grad(), _narrow_forward(experts, ls.dtype), _recomputed_attention(layer, again):
            y = layer(x, **ls.layer_kwargs(l, i))  # the layer type's own mask when types are mixed
            y = y[0] if isinstance(y, tuple) else y
            y.backward(grads[i].to(ls.device))
        grads[i] = x.grad.detach()
        del x, y
        release_freed()  # the batch's graph: its freed pages go back before the next batch builds one


RECOMPUTE_ATTENTION_BYTES = 32 << 20  # a batch's hidden states from which the backward recomputes the attention


@contextmanager
def _recomputed_attention(layer: torch.nn.Module, on: bool = True) -> Iterator[None]:
    """While inside (when ``on``): ``layer``'s attention (``self_attn``) runs under non-reentrant activation
    checkpointing, so the graph keeps its inputs only and its intermediates (queries, norms, rotary terms, the
    SDPA output: ~10 [B S, H] floats at DeepSeek-V3 dims) are recomputed when the backward reaches it, not held
    while the MoE part's backward runs; the same ops on the same inputs, so the same gradients bit for bit."""
    attn = getattr(layer, "self_attn", None)
    if not on or not isinstance(attn, torch.nn.Module):
        yield
        return
    own, had = attn.forward, "forward" in vars(attn)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(own, *args, use_reentrant=False, **kwargs)

    attn.forward = forward
    try:
        yield
    finally:
        if had:
            attn.forward = own
        else:
            del attn.forward


def _free_all_but_down(ls: LayerStream, layer: torch.nn.Module, experts: torch.nn.Module) -> None:
    """Free decoder ``layer`` once its backward is done, except its routed experts' down_proj, which the scores read
    (``on_layer``): attention, router and gate_up (2/3 of the experts) are not held while G is built and scored.
    The experts module keeps its other parameters on the meta device (their shapes and dtypes)."""
    down = experts.down_proj.detach()  # the held tensor itself (no copy); free() only replaces the parameter
    ls.free(layer)
    experts.down_proj = torch.nn.Parameter(down, requires_grad=False)


@contextmanager
def _narrow_forward(experts: torch.nn.Module | None, dtype: torch.dtype) -> Iterator[None]:
    """While inside: narrow ``experts`` compute through ``_NarrowKernel`` (nothing changes for wide ones)."""
    if not _narrow(experts, dtype):
        yield
        return
    assert experts is not None
    kernel = _NarrowKernel(experts)

    def fwd(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return routed_forward(experts.gate_up_proj, experts.down_proj, kernel, hidden, idx, w, recompute=True)

    with observing(experts, fwd):
        yield


def _accumulate_gathered(
    engine: Engine, acc: GradStatAccumulator, rows: list[tuple[torch.Tensor, ...]], split_experts: bool
) -> None:
    """Every batch's (dL/dy [T_b, H], top-k index, top-k weight) gathered in batch order, accumulated into this
    rank's experts (the single-process order of additions); then, unless ``split_experts``, all experts' rows
    exchanged."""
    parts = [engine.gather_batches([r[j] for r in rows]) for j in range(3)]
    mine = dist.share(acc.E)
    for g, i, w in zip(*parts, strict=True):
        acc.update_routed(g, i, w, experts=mine)
    if not split_experts:
        share_rows_(acc)


G_LAYER_FRACTION = 0.25  # full G held at once: at most this fraction of one MoE layer's routed experts' bytes


def routed_layer_bytes(ckpt: Checkpoint) -> int:
    """Bytes of the largest MoE layer's routed experts and router in the checkpoint (its dtype)."""
    info, best = ckpt.tensor_info(), 0
    for l in ckpt.moe_layers:
        pat = ckpt.family.routed_key_pattern(l)
        best = max(best, sum(math.prod(v["shape"]) * DTYPE_BYTES.get(v["dtype"], 4) for k, v in info.items()
                             if pat.match(k)))  # fmt: skip
    return best


def g_chunk(ckpt: Checkpoint, device: torch.device | None = None) -> int:
    """Experts whose full G (H^2 float32 each) is held at once: ``core.limits.expert_chunk`` (a quarter of
    ``--max-memory``, else of the free memory) and at most ``G_LAYER_FRACTION`` of one layer's routed bytes, so the
    gradient pass peaks near one layer held narrow whatever the free memory (chunks only replay the kept dL/dy rows:
    the scores are the same for every chunk)."""
    E, H = ckpt.num_experts, ckpt.config.hidden_size
    per = 4 * H * H
    return max(1, min(expert_chunk(E, per, device), int(G_LAYER_FRACTION * routed_layer_bytes(ckpt)) // per))


def streamed_grad_stats(
    ckpt: Checkpoint,
    input_ids: torch.Tensor,
    kind: str = "full",
    rank: int = 32,
    batch_size: int = 8,
    device: torch.device | None = None,
    with_moments: bool = False,
    on_layer: Callable[[int, LayerGradStats, torch.nn.Module], Any] | None = None,
    progress: Callable[[int], None] | None = None,
    spill: bool | None = None,
    split_experts: bool = False,
    chunk: int | None = None,
) -> dict[int, Any]:
    """G_e (and optionally m) per MoE layer with one layer in memory at a time.

    input_ids: [N, S]. Returns {layer: on_layer(layer, stats, experts_module)} (or the LayerGradStats when
    on_layer is None); ``on_layer`` runs once the layer's backward is done and the layer is freed but for the
    experts' down_proj (their other parameters are on the meta device). progress(n) is called after each of the
    2 x num_layers + 1 steps. spill: keep the layer inputs and gradients in files (None: when all layers' inputs
    exceed SPILL_BYTES); the scores do not depend on it.
    split_experts: under torchrun, each rank's G (and so ``on_layer``'s) holds only the experts of
    ``dist.share(E)`` (the others are zero); False: every expert's on every rank. m, when asked for, is summed over
    the ranks (all-reduce: float64 rounding of the sum order).
    chunk (full G with ``on_layer``): experts whose G is held at once (default ``g_chunk``: from ``--max-memory`` or
    the free memory, and at most a quarter of a layer's routed bytes). Below the layer's expert count, each
    batch's dL/dy rows are kept (T x H floats) and G comes to ``on_layer`` as a ``heapr.ChunkedG``, built chunk by
    chunk from them (scores bit-identical to the whole [E, H, H]).
    """
    fam, moe = ckpt.family, set(ckpt.moe_layers)
    if spill is None:  # every layer's inputs are kept: the bound applies to all of them together
        cfg = ckpt.config
        spill = (cfg.num_hidden_layers + 1) * input_ids.numel() * cfg.hidden_size * 4 > SPILL_BYTES
    engine = Engine(ckpt, input_ids, batch_size, device, "gradient pass (forward)")
    ls, W = engine.stream, engine.world
    ls.keep_carries = True  # the backward re-runs every layer: what layers hand on too (HY-V4's top-k indices)
    E, H = ckpt.num_experts, ckpt.config.hidden_size
    if kind == "full" and on_layer is not None and chunk is None:
        chunk = g_chunk(ckpt, ls.device)
    chunked = kind == "full" and on_layer is not None and chunk is not None and chunk < len(dist.share(E))
    out: dict[int, Any] = {}
    steps = iter(range(1, 2 * len(ls.decoder_layers) + 2))
    tick = (lambda: progress(next(steps))) if progress is not None else (lambda: None)
    inputs: list[ActivationCache] = [ActivationCache(spill)]  # inputs[l]: decoder layer l's inputs
    grads = ActivationCache(spill)
    try:
        n_layers = len(ls.decoder_layers)
        for ctx in engine.layers([_FirstInputs(inputs[0])]):  # forward, keeping every layer's outputs
            if ctx.index < n_layers - 1:
                inputs.append(ActivationCache(spill))
                _keep_all(inputs[-1], ls.cache)
            del ctx  # not held through the next layer (Engine.layers)
            tick()
        _head_grads(ls, ls.cache, grads, getattr(ckpt.config, "vocab_size", None))
        ls.free_head()  # lm_head [V, H] in float32 (1.2 GB at Qwen3's vocabulary) is not needed again
        ls.cache.close()  # the last layer's outputs: only the head read them (the backward re-runs from inputs)
        release_freed()
        probe("gradient pass: head gradients")
        tick()
        with progress_bar() as bar:  # backward, one layer at a time
            task = bar.add_task("gradient pass (backward)", total=n_layers)
            for l in reversed(range(n_layers)):
                layer = ls.load_layer(l)
                narrowed = _narrow_attention(layer) if ls.dtype == torch.float32 else []
                release_freed()
                accs: dict[int, GradStatAccumulator] = {}
                msum: dict[int, torch.Tensor] = {}
                experts = getattr(ls.moe_block(layer), fam.experts) if l in moe else None
                gate_up = _gate_up if with_moments else None
                rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # under torchrun: per own batch
                keep = rows.append
                sink = None
                if W > 1 or chunked:
                    sink = lambda g, i, w: keep((g.detach().reshape(-1, g.shape[-1]), i, w))  # noqa: B023, E731
                handle = None
                if experts is not None:  # (chunked: the rows are kept, the hook's own accumulator stays unused)
                    handle = attach_hook(experts, l, accs, msum, "diag" if chunked else kind, rank, gate_up, sink=sink)
                try:
                    _backward_layer(ls, l, layer, inputs[l], grads, experts)
                    probe(f"gradient pass {l}: backward")
                    if on_layer is not None and experts is not None:
                        _free_all_but_down(ls, layer, experts)
                    if l in accs and chunked:
                        accs.pop(l)
                        if W > 1:
                            parts = [engine.gather_batches([r[j] for r in rows]) for j in range(3)]
                            rows[:] = list(zip(*parts, strict=True))
                            if l in msum:
                                dist.all_reduce_sum_(msum[l])
                        assert chunk is not None
                        counts = routed_counts(rows, E)
                        ms = msum.pop(l, None)
                        m = ms.cpu() / counts.clamp_min(1)[:, None] if ms is not None else None
                        stats = LayerGradStats(G=chunked_g(rows, E, H, chunk), counts=counts, m=m)
                        out[l] = on_layer(l, stats, experts)
                        del stats
                        probe(f"gradient pass {l}: scored")
                    if l in accs and W > 1:
                        _accumulate_gathered(engine, accs[l], rows, split_experts)
                        if l in msum:
                            dist.all_reduce_sum_(msum[l])
                    rows.clear()
                    if l in accs:
                        stats = finish(accs.pop(l), msum.pop(l, None))  # the accumulator's sums are freed first
                        out[l] = on_layer(l, stats, experts) if on_layer is not None else stats
                        del stats
                finally:
                    if handle is not None:
                        handle.remove()
                    _widen(narrowed)
                    ls.free(layer)
                    inputs[l].close()
                tick()
                bar.advance(task)
    finally:
        for acts in inputs:
            acts.close()
        grads.close()
        engine.close()
    return out
