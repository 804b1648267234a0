"""Layer-streamed execution: capture the first decoder layer's inputs once, then run one layer at a time.

Only the embedding, one decoder layer and the activation cache are in memory at any time; each layer's
tensors are read lazily from the safetensors shards and freed after use (GPTQ-style sequential pass).
"""

from __future__ import annotations

import copy
import ctypes
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import DTYPE_BYTES, Checkpoint
from .derive import causal_lm, layer_carry
from .errors import UserError
from .experts import (
    BiasedExperts,
    GatedExperts,
    PostNormedExperts,
    Ungated,
    UngatedExperts,
    own_gate,
    routed_forward,
)
from .families import Family
from .memprobe import probe


def libc_function(name: str) -> Any:
    """glibc's function ``name`` (ctypes), or None where there is no glibc (looked up once per name)."""
    if name not in _LIBC:
        try:
            _LIBC[name] = getattr(ctypes.CDLL("libc.so.6"), name)
        except (OSError, AttributeError):
            _LIBC[name] = None
    return _LIBC[name]


def release_freed() -> None:
    """Give the C heap's freed pages back to the system (glibc ``malloc_trim``; a no-op elsewhere): tensors below
    malloc's mmap threshold (per-expert weights, activations) are freed into the heap, whose pages otherwise stay
    resident when it is fragmented, so a pass's peak would carry the freed garbage of the layers before."""
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


_LIBC: dict[str, Any] = {}
STACK_CHUNK_BYTES = 64 << 20  # per-expert tensors read at once while a layer's experts are stacked


class _Captured(Exception):
    pass


# Gemma-4's per-layer input embeddings (PLE): modules of the text model beside the embedding, the layers and the final
# norm; the text model's own project_per_layer_inputs combines them into [B, S, L, D] before its first layer, and
# decoder layer l is called with slice [:, :, l] (its per_layer_input argument)
PER_LAYER_MODULES = ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")


def per_layer_modules(text_model: nn.Module) -> tuple[str, ...]:
    """The per-layer input modules ``text_model`` holds (empty for every model without per-layer inputs)."""
    if not getattr(text_model, "hidden_size_per_layer_input", None) or not hasattr(
        text_model, "project_per_layer_inputs"
    ):
        return ()
    return tuple(n for n in PER_LAYER_MODULES if isinstance(getattr(text_model, n, None), nn.Module))


@contextmanager
def recording_per_layer_inputs(text_model: nn.Module, store: Any) -> Iterator[None]:
    """While active, every per-layer input tensor [B, S, L, D] the text model computes (its own
    ``project_per_layer_inputs``: the token's per-layer embedding + the projected input embedding, normed and scaled)
    is appended to ``store``: the stream passes decoder layer l the slice ``[:, :, l]``, as the model does."""
    own = text_model.project_per_layer_inputs

    def project(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = own(*args, **kwargs)
        store.append(out.detach())
        return out

    text_model.project_per_layer_inputs = project
    try:
        yield
    finally:
        del text_model.project_per_layer_inputs


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def module_state(
    fam: Family, tensors: dict[str, torch.Tensor], layer: int, num_experts: int | None,
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Hub-format tensors of one decoder layer -> the transformers module's state dict (keys relative to layer).

    ``stacked``: the routed experts already stacked as (gate_up [E, 2I, H], down [E, H, I]) (``stacked_experts``);
    ``tensors`` then holds expert 0's hub keys (views into them, so the family reads router and biases as usual)
    and no other expert's."""
    prefix = f"model.layers.{layer}."
    out: dict[str, torch.Tensor] = {}
    if num_experts is not None:
        pat = fam.routed_key_pattern(layer)
        w = fam.read_layer({k: v for k, v in tensors.items() if pat.match(k)}, layer, 1 if stacked else num_experts)
        mb = f"{fam.module_block}."
        gate_up, down = stacked or (torch.cat([w.gate, w.up], dim=1), w.down)
        out[f"{mb}{fam.experts}.gate_up_proj"] = gate_up  # [E, 2I, H]
        out[f"{mb}{fam.experts}.down_proj"] = down  # [E, H, I]
        if fam.own_experts and w.gate_bias is not None and w.up_bias is not None:  # BiasedExperts
            out[f"{mb}{fam.experts}.gate_up_bias"] = torch.cat([w.gate_bias, w.up_bias], dim=1)  # [E, 2I]
            out[f"{mb}{fam.experts}.down_bias"] = w.down_bias  # [E, H]
        out[f"{mb}{fam.router}.weight"] = w.router
        if w.router_bias is not None:
            out[f"{mb}{fam.router}.bias"] = w.router_bias
        if w.correction_bias is not None:
            out[mb + fam.correction_module_key()] = fam.correction_disk(w.correction_bias)
        if w.expert_scale is not None:  # Gemma-4's router.per_expert_scale (its router.scale [H] passes through)
            out[mb + fam.expert_scale] = w.expert_scale
        tensors = {k: v for k, v in tensors.items() if not pat.match(k)}
    for k, v in tensors.items():
        out[fam.disk_to_module(k)[len(prefix) :]] = v
    return out


def skeleton(ckpt: Checkpoint) -> nn.Module:
    """The whole model on the meta device (buffers such as rotary tables stay real and tiny). Attention runs through
    SDPA, or the family's eager attention where it has no SDPA path (gpt-oss's attention sinks); the experts of a
    family with biases or its own gate are ``BiasedExperts`` / ``GatedExperts``."""
    cfg = copy.deepcopy(ckpt.config)
    if hasattr(cfg, "quantization_config"):  # an MXFP4 release: its experts are dequantized on read
        del cfg.quantization_config
    with init_empty_weights(include_buffers=False):  # causal_lm: a wrapper's text config gets its text model + head
        try:
            model = causal_lm(cfg, experts_implementation="eager", attn_implementation="sdpa")
        except ValueError as err:
            if "sdpa" not in str(err).lower() and "scaled_dot_product" not in str(err):
                raise
            model = causal_lm(cfg, experts_implementation="eager", attn_implementation="eager")
    # persistent buffers the checkpoint saves outside the layers (Mistral-Large-4's rotary embedding scales its
    # frequencies by exp(lerope.alpha), zeros until loaded) take the saved values, as transformers loads them; the
    # others keep what the config computes (a saved non-persistent one, an old inv_freq, is ignored there too)
    persistent = [
        f"{m}.{b}" if m else b
        for m, mod in model.named_modules()
        for b in mod._buffers
        if b not in mod._non_persistent_buffers_set
    ]
    saved = [n for n in persistent if not n.startswith("model.layers.") and n in ckpt.weight_map]
    for name, t in ckpt.read(saved).items() if saved else ():
        model.get_buffer(name).copy_(t)
    if ckpt.family.own_experts:
        for l in ckpt.moe_layers:
            block = getattr(model.model.layers[l], ckpt.family.module_block)
            setattr(block, ckpt.family.experts, _biased_experts(ckpt.family, getattr(block, ckpt.family.experts)))
    model.eval()
    model.requires_grad_(False)
    return model


def _biased_experts(fam: Family, ex: nn.Module) -> nn.Module:
    """The moecompress module (on the meta device) for a transformers experts module with biases / its own gate:
    ``BiasedExperts`` (gpt-oss), or ``GatedExperts`` for a channel-wise ``_apply_gate`` of its own."""
    if fam.gateless:  # no gate projection (Nemotron-H): up [E, I, H] in transformers' module
        E, I, H = ex.up_proj.shape
        with torch.device("meta"):
            return UngatedExperts(E, H, I, Ungated(ex.act_fn, fam.name))
    E, a, b = ex.gate_up_proj.shape
    H, I = (a, b // 2) if fam.transposed else (b, a // 2)
    if fam.post_norm:  # MuseSpark: f = norm(h down^T), the module's own norm (on the meta device, filled on load)
        act = own_gate(ex, fam.name) if fam.gate == "apply_gate" else ex.act_fn
        with torch.device("meta"):
            return PostNormedExperts(E, H, I, act, copy.deepcopy(ex.post_expert_norm), fam.name)
    with torch.device("meta"):
        if fam.gate == "apply_gate":
            return GatedExperts(E, H, I, own_gate(ex, fam.name))
        if fam.gate is None and not fam.expert_bias:  # only transposed (Aria: x @ [H, 2I]): its plain act(g) * u
            return GatedExperts(E, H, I, ex.act_fn)
        return BiasedExperts(E, H, I, fam.name, fam.gate or "", float(ex.alpha), float(ex.limit))


_NARROW: dict[type, type] = {}


def _narrow_class(cls: type) -> type:
    """``cls`` (a transformers experts module) whose forward is ``routed_forward``: the eager computation, same ops
    and order, with each expert's weights upcast to the hidden states' dtype as it is used."""
    if cls not in _NARROW:

        def forward(self: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Any:
            return routed_forward(self.gate_up_proj, self.down_proj, self.act_fn, hidden, top_k_index, top_k_weights)

        _NARROW[cls] = type(cls.__name__, (cls,), {"forward": forward, "narrow_of": cls})
    return _NARROW[cls]


def _stand_in(layer: nn.Module, j: int, forward: Any, attention_type: str | None = None) -> nn.Module:
    """A stand-in for decoder layer j of the layer's own class (a model picks each layer's mask by isinstance, as
    Jamba does) with ``forward`` as its forward, its plain attributes (layer_idx, attention_type, ...), ``j``, and no
    modules or weights."""
    cls = type(f"Recorder{type(layer).__name__}", (type(layer),), {"forward": forward})
    rec = cls.__new__(cls)
    nn.Module.__init__(rec)
    for name, value in vars(layer).items():
        if not name.startswith("_"):
            setattr(rec, name, value)
    rec.j = j
    if not hasattr(rec, "attention_type"):
        rec.attention_type = attention_type if attention_type is not None else "full_attention"
    return rec


class ActivationCache:
    """Per-batch hidden states, in memory or spilled to safetensors files in a temporary folder."""

    def __init__(self, spill: bool):
        self._mem: list[torch.Tensor] = []
        self._dir = Path(tempfile.mkdtemp(prefix="moecompress-acts-")) if spill else None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def spilled(self) -> bool:
        """True when the batches live in files (read back one at a time)."""
        return self._dir is not None

    def append(self, t: torch.Tensor) -> None:
        if self._dir is None:
            self._mem.append(t)
        else:
            save_file({"h": t.contiguous().cpu()}, str(self._dir / f"{self._n}.safetensors"))
        self._n += 1

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._dir is None:
            return self._mem[i]
        return load_file(str(self._dir / f"{i}.safetensors"))["h"]

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        if self._dir is None:
            self._mem[i] = t
        else:
            save_file({"h": t.contiguous().cpu()}, str(self._dir / f"{i}.safetensors"))

    def close(self) -> None:
        self._mem.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class LayerStream:
    """Run a checkpoint one decoder layer at a time over fixed token batches.

    >>> ls = LayerStream(ckpt, input_ids, batch_size=8, device=torch.device("cpu"))
    >>> for l, layer in ls.layers():      # layer l is materialized; ls.cache holds its inputs
    ...     ls.forward_layer(layer)       # replaces the cache with the layer's outputs
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        input_ids: torch.Tensor,  # [N, S]
        batch_size: int = 8,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        spill: bool | None = None,
    ):
        self.ckpt = ckpt
        self.fam = ckpt.family
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.model = skeleton(ckpt)
        self.batches = [b for b in input_ids.split(batch_size) if b.numel()]  # no windows: a write-only pass
        H = ckpt.config.hidden_size
        if spill is None:
            spill = input_ids.numel() * H * 4 > 4 * 1024**3
        self.cache = ActivationCache(spill)
        # narrow: the routed experts' fused weights are held in the checkpoint's dtype (bf16: half of float32) and
        # upcast per expert where they are used (core.experts); every reader of them must upcast what it reads
        self.narrow = False
        self.captured = False  # capture() ran (the cache may still be empty: zero windows)
        self.kwargs: list[dict[str, Any]] = []  # per batch: the first decoder layer's keyword arguments
        self._moe = set(ckpt.moe_layers)
        self._info: dict[str, Any] | None = None  # the checkpoint's tensor headers (read once, when first needed)
        kinds = getattr(ckpt.config, "layer_types", None)
        mixed = isinstance(kinds, (list, tuple)) and len(set(map(str, kinds))) > 1
        self.layer_types: list[str] | None = [str(t) for t in kinds] if mixed else None
        theta = getattr(ckpt.config, "layer_rope_theta", None)  # per-layer RoPE bases (MuseSpark, GraniteMoE-SWA):
        n = len(self.decoder_layers)  # each layer gets its base's position embeddings, none where it is 0 (NoPE)
        if isinstance(theta, (list, tuple)) and len(theta) >= n and len({str(r) for r in theta[:n]}) > 1:
            base = self.layer_types or [str(kinds[0]) if isinstance(kinds, (list, tuple)) else "layer"] * n
            self.layer_types = [f"{t}/rope_theta={r}" for t, r in zip(base, theta[:n], strict=True)]
        classes = [type(layer).__name__ for layer in self.decoder_layers]
        if len(set(classes)) > 1:  # hybrid stacks of layer classes (Jamba's Mamba and attention layers)
            self.layer_types = [f"{c}/{t}" for c, t in zip(classes, self.layer_types or classes, strict=True)]
        self._kwargs_by_type: dict[str, list[dict[str, Any]]] = {}  # mixed layer types: each type's own inputs
        self._per_layer_names = per_layer_modules(self.model.model)
        # the text model's modules its forward runs after the last layer besides the final norm (DeepSeek-V4's
        # hyper-connection head hc_head, which collapses the [B, S, hc, D] streams before the norm): the head is then
        # that forward run with stand-ins for the embedding and the layers (derive checked they are used only there)
        skip = (self.fam.embed, "layers", self.fam.final_norm, *self._per_layer_names)
        self._tail_names = tuple(
            n for n, c in self.model.model.named_children() if n not in skip and list(c.parameters())
        )
        # what the model's layer loop threads from one layer to the next beside the hidden states (HY-V4, GLM-5-DSA:
        # the top-k indices a "full" indexer layer hands to the "shared" layers after it): {keyword: output index};
        # per batch, the values layer l gets (_carry_in, from layer l - 1) and the ones it gave (_carry_out)
        self._carry, self._arity = layer_carry(type(self.model.model))
        self._carry_layer = 0
        self._carry_in: dict[int, dict[str, Any]] = {}
        self._carry_out: dict[int, dict[str, Any]] = {}
        # keep_carries: every layer's carried inputs are kept (HEAPr's backward pass re-runs every layer on its kept
        # inputs; they are the top-k indices, smaller than the hidden states it keeps for each layer)
        self.keep_carries = False
        self._carry_hist: dict[int, dict[int, dict[str, Any]]] = {}
        H, norm = ckpt.config.hidden_size, self.model.model.get_submodule(self.fam.final_norm)
        # the final module is no [hidden] norm (Qwen4-Exp's hyper_connection_mixer): the forward's tail as well
        self._own_head = bool(self._tail_names) or tuple(getattr(norm, "weight", torch.empty(0)).shape) != (H,)
        # per batch: the per-layer inputs [B, S, L, D] (Gemma-4); spilled with the activations
        self.per_layer = ActivationCache(spill) if self._per_layer_names else None

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _materialize(
        self, module: nn.Module, state: dict[str, torch.Tensor], what: str, keep: tuple[str, ...] = ()
    ) -> None:
        """Allocate ``module`` in ``self.dtype`` on the device and copy ``state`` in. The parameters named in
        ``keep`` (narrower floats: bf16, fp16) become their state tensors themselves, in their own dtype (moved to
        the device; on the CPU no copy at all: the stacked experts are not held twice while the layer loads)."""
        module.to(dtype=self.dtype)
        held = {}
        for name in keep:
            p, t = module.get_parameter(name), state[name]
            if tuple(t.shape) != tuple(p.shape):
                continue  # a mismatch: load_state_dict below names it
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
            held[name] = t
        # real buffers the checkpoint does not hold (non-persistent: Gemma-4's embed_scale) keep their values
        real = {n: b.clone() for n, b in module.named_buffers() if b.device.type != "meta" and n not in state}
        module.to_empty(device=self.device)
        for name, t in real.items():
            module.get_buffer(name).copy_(t)
        for name, t in held.items():
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, nn.Parameter(t.to(self.device), requires_grad=False))
        # load_state_dict copies into the existing parameters and casts on the fly: no second full-size copy
        missing, unexpected = module.load_state_dict({k: v for k, v in state.items() if k not in held}, strict=False)
        missing = [k for k in missing if k not in held]
        if missing or unexpected:
            raise UserError(
                f"{what}: checkpoint tensors do not match the {self.ckpt.config.model_type} config "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )

    def _narrower(self, t: torch.Tensor | None) -> bool:
        """A float tensor narrower than the stream's dtype (bf16, fp16 under float32)."""
        return t is not None and t.is_floating_point() and t.element_size() < self.dtype.itemsize

    def stacked_experts(self, l: int) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """MoE layer l's per-expert routed tensors read a chunk of experts at a time (~64 MB) straight into the fused
        gate_up [E, 2I, H] and down [E, H, I] (the checkpoint's dtype): the per-expert copies never all exist beside
        the stacked ones. Returns expert 0's hub tensors (views into the stacked ones, for ``module_state``) and the
        pair; None when the family keeps its experts fused on disk or the experts' headers differ in shape or dtype
        (then the layer is read whole, as before)."""
        fam, E = self.fam, self.ckpt.num_experts
        if fam.fused_disk or fam.expert_bias or (fam.own_experts and fam.gate not in ("apply_gate", "ungated")):
            return None  # (own gate, gateless experts: the same layout; gateless: the gate rows are read from up)
        if self._info is None:
            self._info = self.ckpt.tensor_info()
        info = self._info
        keys = [[fam.expert_key(l, e, p) for p in range(3)] for e in range(E)]
        if any(k not in info for ks in keys for k in ks):
            return None
        g0, u0, d0 = (info[k] for k in keys[0])
        if any(info[ks[p]] != ref for ks in keys for p, ref in enumerate((g0, u0, d0))) or g0 != u0:
            return None
        (I, H), dt = g0["shape"], g0["dtype"]
        if d0["shape"] != [H, I] or d0["dtype"] != dt:
            return None
        gate_up = down = None
        per = 3 * I * H * max(1, int(DTYPE_BYTES.get(dt, 4)))
        step = max(1, STACK_CHUNK_BYTES // per)
        for s in range(0, E, step):
            part = self.ckpt.read([k for e in range(s, min(E, s + step)) for k in keys[e]])
            for e in range(s, min(E, s + step)):
                g, u, d = (part[k] for k in keys[e])  # (gateless: g and u are the one up tensor)
                for k in keys[e]:
                    part.pop(k, None)
                if gate_up is None or down is None:
                    gate_up = torch.empty((E, 2 * I, H), dtype=g.dtype)
                    down = torch.empty((E, H, I), dtype=d.dtype)
                gate_up[e, :I], gate_up[e, I:], down[e] = g, u, d
        assert gate_up is not None and down is not None
        first = dict(zip(keys[0], (gate_up[0, :I], gate_up[0, I:], down[0]), strict=True))
        return first, (gate_up, down)

    def load_layer(self, l: int) -> nn.Module:
        layer = self.decoder_layers[l]
        moe = l in self._moe
        got = self.stacked_experts(l) if moe else None
        if got is None:
            raw = self.ckpt.layer_tensors(l)
            state = module_state(self.fam, raw, l, self.ckpt.num_experts if moe else None)
        else:
            skip = {self.fam.expert_key(l, e, p) for e in range(self.ckpt.num_experts) for p in range(3)}
            prefix = f"model.layers.{l}."
            raw = self.ckpt.read([k for k in self.ckpt.weight_map if k.startswith(prefix) and k not in skip])
            state = module_state(self.fam, {**raw, **got[0]}, l, self.ckpt.num_experts, got[1])
            del got
        del raw  # per-expert tensors are now stacked into the fused ones
        release_freed()
        probe(f"layer {l}: read")
        keep: tuple[str, ...] = ()
        if self.narrow and l in self._moe:
            ex = f"{self.fam.module_block}.{self.fam.experts}"
            keep = tuple(k for k in (f"{ex}.gate_up_proj", f"{ex}.down_proj") if self._narrower(state.get(k)))
            experts = layer.get_submodule(ex)
            if keep and not isinstance(experts, BiasedExperts):  # (BiasedExperts' own forward is routed_forward)
                experts.__class__ = _narrow_class(type(experts))
        self._materialize(layer, state, f"layer {l}", keep)
        probe(f"layer {l}: materialized")
        return layer

    def free(self, module: nn.Module) -> None:
        module.to("meta")
        for m in module.modules():
            if "narrow_of" in vars(type(m)):
                m.__class__ = type(m).narrow_of
        release_freed()

    @torch.no_grad()
    def capture(self) -> None:
        """Embed every batch and record the first decoder layer's inputs and keyword arguments."""
        self.captured = True
        emb = self.model.get_input_embeddings()
        self._materialize(emb, {"weight": self.ckpt.get(f"model.{self.fam.embed}.weight")}, "embeddings")
        if self.per_layer is not None:
            try:
                self._capture_per_layer(emb)
            finally:
                self.free(emb)
            probe("captured")
            return
        self._capture(emb)
        probe("captured")

    def _capture_per_layer(self, emb: nn.Module) -> None:
        """Capture with the per-layer input modules materialized, recording the per-layer inputs of every batch."""
        inner, parts = self.model.model, []
        try:
            for name in self._per_layer_names:
                part = inner.get_submodule(name)
                parts.append(part)
                state = {k[len(f"model.{name}.") :]: v for k, v in self.ckpt.prefixed(f"model.{name}.").items()}
                self._materialize(part, state, name)
            with recording_per_layer_inputs(inner, self.per_layer):
                self._capture(emb, free_embedding=False)
            if len(self.per_layer) != len(self.batches):
                raise UserError(
                    f"{self.ckpt.config.model_type}: the per-layer inputs were computed {len(self.per_layer)} times "
                    f"for {len(self.batches)} batches: the layer stream cannot pass them to the layers"
                )
        finally:
            for part in parts:
                self.free(part)

    def _capture(self, emb: nn.Module, free_embedding: bool = True) -> None:
        first = self.decoder_layers[0]
        store = self

        class Catcher(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attention_type = getattr(first, "attention_type", "full_attention")

            def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                store.cache.append(hidden_states.detach())
                store.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
                raise _Captured

        if self.layer_types is not None:
            self._capture_types(emb, free_embedding)
            return
        self.decoder_layers[0] = Catcher()
        try:
            for ids in self.batches:
                try:
                    self.model.model(input_ids=ids.to(self.device), use_cache=False)
                except _Captured:
                    pass
        finally:
            self.decoder_layers[0] = first
            if free_embedding:
                self.free(emb)

    def _capture_types(self, emb: nn.Module, free_embedding: bool = True) -> None:
        """Mixed layer types (sliding/full/linear attention): record each type's keyword arguments (its own mask)
        at its first layer; the layers before pass the hidden states through unchanged (no compute)."""
        types = self.layer_types
        assert types is not None
        first = {t: types.index(t) for t in set(types)}
        last = max(first.values())
        store, saved = self, [self.decoder_layers[j] for j in range(last + 1)]

        def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.j == 0:
                store.cache.append(hidden_states.detach())
            if first[types[self.j]] == self.j:
                kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
                store._kwargs_by_type.setdefault(types[self.j], []).append(kw)
            if self.j == last:
                raise _Captured
            return hidden_states

        for j in range(last + 1):
            self.decoder_layers[j] = _stand_in(saved[j], j, forward, types[j])
        try:
            for ids in self.batches:
                try:
                    self.model.model(input_ids=ids.to(self.device), use_cache=False)
                except _Captured:
                    pass
        finally:
            for j, layer in enumerate(saved):
                self.decoder_layers[j] = layer
            if free_embedding:
                self.free(emb)
        self.kwargs = self._kwargs_by_type.get(types[0], [])  # no batches: a write-only pass

    def layer_kwargs(self, l: int, i: int) -> dict[str, Any]:
        """Keyword arguments of decoder layer l for cached batch i (its layer type's mask when types are mixed; its
        slice of the per-layer inputs where the model has them: Gemma-4)."""
        kw = self.kwargs[i] if self.layer_types is None else self._kwargs_by_type[self.layer_types[l]][i]
        if self.per_layer is not None:
            kw = {**kw, "per_layer_input": self.per_layer[i][:, :, l, :].to(self.device)}
        if self._carry:
            if l != self._carry_layer and l in self._carry_hist:
                return {**kw, **self._carry_hist[l].get(i, dict.fromkeys(self._carry))}
            if l != self._carry_layer:
                raise UserError(
                    f"{self.ckpt.config.model_type}'s layers hand {sorted(self._carry)} on to the next layer, which "
                    f"the layer stream holds for the current layer only (layer {l} was asked for at layer "
                    f"{self._carry_layer}): this operation re-runs earlier layers and is not available for it"
                )
            kw = {**kw, **self._carry_in.get(i, dict.fromkeys(self._carry))}
        return kw

    def run_layer(self, layer: nn.Module, i: int) -> torch.Tensor:
        kw = self.kwargs[i]
        if self.layer_types is not None or self.per_layer is not None or self._carry:
            kw = self.layer_kwargs(next(j for j, m in enumerate(self.decoder_layers) if m is layer), i)
        out = layer(self.cache[i].to(self.device), **kw)
        if self._carry and isinstance(out, tuple):
            self._carry_out[i] = {k: out[j] for k, j in self._carry.items()}
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward_layer(self, layer: nn.Module) -> None:
        """Replace the cached inputs by this layer's outputs."""
        for i in range(len(self.cache)):
            self.cache[i] = self.run_layer(layer, i)

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, materialized layer); the layer is freed when the caller moves on."""
        if not self.captured:  # (a pass over zero windows has an empty cache but is captured)
            self.capture()
        for l in range(len(self.decoder_layers)):
            layer = self.load_layer(l)
            release_freed()  # the checkpoint-dtype state a float32 layer was copied from
            try:
                yield l, layer
            finally:
                self.free(layer)
            if self._carry:  # layer l + 1 gets what layer l handed on
                if self.keep_carries:
                    self._carry_hist[l] = self._carry_in
                self._carry_in, self._carry_out, self._carry_layer = self._carry_out, {}, l + 1

    def moe_block(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.fam.module_block)

    @torch.no_grad()
    def logits(self, i: int) -> torch.Tensor:
        """Final norm + lm_head on cached batch i (call after all layers ran)."""
        return self.head(self.cache[i].to(self.device))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head on the last layer's outputs h ([B, S, H]; [B, S, hc, H] for hyper-connections) ->
        logits [B, S, V] (autograd allowed)."""
        self._ensure_head()
        logits = self.model.lm_head(self._tail(h) if self._own_head else self._norm(h))
        scale = getattr(self.ckpt.config, "logits_scaling", None)  # Granite divides its logits
        if isinstance(scale, (int, float)) and scale not in (0, 1):
            logits = logits / scale
        cap = getattr(self.ckpt.config, "final_logit_softcapping", None)  # Gemma-4: cap * tanh(logits / cap)
        if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        """The text model's own forward from its last layer's outputs ``h`` on: its embedding returns zeros and its
        layers pass the hidden states through, the first one handing ``h`` on (each a stand-in of the layer's own
        class, as in ``_capture_types``), so what the forward does after its loop (DeepSeek-V4: ``norm(hc_head(h))``)
        runs as transformers runs it."""
        inner = self.model.model
        own_embed, own_layers = inner.get_submodule(self.fam.embed), inner.layers
        H = self.ckpt.config.hidden_size

        class Zeros(nn.Module):
            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                return torch.zeros((*input_ids.shape, H), dtype=h.dtype, device=h.device)

        extra = (None,) * (self._arity - 1)  # (what a loop that unpacks more outputs threads on: None)

        def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = h if self.j == 0 else hidden_states
            return (out, *extra) if extra else out

        setattr(inner, self.fam.embed, Zeros())
        inner.layers = nn.ModuleList(_stand_in(layer, j, forward) for j, layer in enumerate(own_layers))
        try:
            ids = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
            out = inner(input_ids=ids, use_cache=False)
        finally:
            setattr(inner, self.fam.embed, own_embed)
            inner.layers = own_layers
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _ensure_head(self) -> None:
        if getattr(self, "_head_ready", False):
            return
        prefix = f"model.{self.fam.final_norm}."  # weight, and bias where the norm has one (Phi-MoE's LayerNorm)
        state = {k[len(prefix) :]: v for k, v in self.ckpt.prefixed(prefix).items()}
        self._materialize(self._norm, state, "final norm")
        for name in self._tail_names:
            state = {k[len(f"model.{name}.") :]: v for k, v in self.ckpt.prefixed(f"model.{name}.").items()}
            self._materialize(self.model.model.get_submodule(name), state, name)
        key = "lm_head.weight" if "lm_head.weight" in self.ckpt.weight_map else f"model.{self.fam.embed}.weight"
        self._materialize(self.model.lm_head, {"weight": self.ckpt.get(key)}, "lm_head")
        self._head_ready = True

    def free_head(self) -> None:
        """Free what ``head`` materialized (final norm, tail modules, lm_head: [V, H] in the stream's dtype); the next
        ``head`` call reads them again."""
        if not getattr(self, "_head_ready", False):
            return
        for name in self._tail_names:
            self.free(self.model.model.get_submodule(name))
        self.free(self._norm)
        self.free(self.model.lm_head)
        self._head_ready = False

    @property
    def _norm(self) -> nn.Module:
        return self.model.model.get_submodule(self.fam.final_norm)

    def close(self) -> None:
        self.cache.close()
        if self.per_layer is not None:
            self.per_layer.close()
