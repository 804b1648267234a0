"""One declarative record per MoE family, and the per-layer weight view every algorithm sees.

The view, for MoE layer l with E routed experts of width I over hidden size H:
    gate, up: [E, I, H]   down: [E, H, I]   router: [E, H]   (+ router_bias [E], correction_bias [E])
It reads from and writes to *hub-format* tensor names (what ``save_pretrained`` writes and vLLM reads:
one key per expert projection) and also reads transformers' in-memory fused names
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import UserError


def config_int(cfg: Any, key: str, lo: int = 1, default: Any = None, hi: int | None = None) -> int:
    """``cfg.key`` as a whole number in [lo, hi]; a UserError naming the key, the value and the allowed range.

    Booleans, strings and fractions are refused (``true`` or ``"8"`` is never silently read as a count)."""
    value = getattr(cfg, key, default)
    span = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "missing" if value is None else f"{value!r} ({type(value).__name__})"
        raise UserError(f"config.json {key} is {shown}: it must be a whole number, {span}")
    if value < lo or (hi is not None and value > hi):
        raise UserError(f"config.json {key} is {value}: it must be {span}")
    return value


def _qwen_dense_layers(cfg: Any) -> frozenset[int]:
    L = config_int(cfg, "num_hidden_layers")
    step = config_int(cfg, "decoder_sparse_step", default=1)
    only = getattr(cfg, "mlp_only_layers", None) or []
    if not isinstance(only, list) or any(isinstance(l, bool) or not isinstance(l, int) for l in only):
        raise UserError(f"config.json mlp_only_layers is {only!r}: it must be a list of layer indices")
    return frozenset(l for l in range(L) if l in set(only) or (l + 1) % step != 0)


def _deepseek_dense_layers(cfg: Any) -> frozenset[int]:
    L = config_int(cfg, "num_hidden_layers")
    return frozenset(range(min(config_int(cfg, "first_k_dense_replace", lo=0, default=0), L)))


def _no_dense_layers(cfg: Any) -> frozenset[int]:
    return frozenset()


_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")


@dataclass(frozen=True)
class Family:
    """Where a family keeps its MoE pieces. A new family is one more record (plus a tiny test model)."""

    name: str
    model_types: tuple[str, ...]
    count_keys: tuple[str, ...]  # config keys holding the routed expert count (all are written)
    disk_block: str = "mlp"  # MoE block name in checkpoint keys
    module_block: str = "mlp"  # MoE block attribute on the transformers decoder layer
    router: str = "gate"  # router sub-module of the block (weight [E, H])
    experts: str = "experts"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert disk names
    router_bias: bool = False
    correction_bias: str | None = None  # DeepSeek: router buffer added to scores for top-k choice only
    shared: str | None = None  # shared expert sub-module (never a routed expert)
    shared_gate: str | None = None
    norm_topk_key: str | None = "norm_topk_prob"  # None: always renormalized over the top-k
    group_key: str | None = None  # group-limited routing (E % n_group == 0 must hold)
    # the router groups experts by contiguous index blocks (view(-1, n_group, E // n_group)): removing the same
    # number from every group keeps each kept expert in its group (a derived family's code, checked in derive)
    groups_contiguous: bool = False
    dense_layers: Callable[[Any], frozenset[int]] = field(default=_no_dense_layers)
    top_k_key: str = "num_experts_per_tok"
    # routing_known: the block's routing is one moecompress re-implements (prune's output-error search, RouterSpec:
    # softmax top-k with/without renormalization, DeepSeek-V3 sigmoid + correction bias + group-limited top-k).
    # False for a derived family whose router code is not a copy of a hand-written family's: operations that
    # re-implement routing must refuse it; operations that use the model's own routing (profile) work.
    routing_known: bool = True
    # how routing_known was established: "record" (a hand-written family), "source" (derive: the block and router
    # code equal a hand-written family's), "behaviour" (core.routing_check: the family's own block, run on random
    # inputs, routes as prune.order.route does), None (not verified: ``routing_note`` says where it differs)
    routing_verified_by: str | None = "record"
    routing_note: str = ""
    # the RouterSpec variant core.routing_check found the block to route by ((field, value) pairs over what
    # RouterSpec.from_config gives; ("scaling_key", key): the routed scaling read from config ``key``); () for none
    router_variant: tuple[tuple[str, Any], ...] = ()
    derived: bool = False  # built by ``derive`` from the transformers model, not written by hand
    # other per-layer tensors transformers saves under another name: (disk name, module name), layer-relative
    renames: tuple[tuple[str, str], ...] = ()
    disk_router: str | None = None  # router name in checkpoint keys when it differs (Phi-MoE: gate on disk, router)
    disk_correction: str | None = None  # correction bias's block-relative checkpoint name when not under the router
    # the correction bias's block-relative module path when it is not ``<router>.<correction_bias>``: MiniMax-M2 keeps
    # it on the block (``e_score_correction_bias``, passed to its router), ERNIE-4.5 under the router's
    # ``moe_statics``; every module-side access goes through ``correction_of`` / ``set_correction``
    correction_module: str | None = None
    correction_row: bool = False  # held as [1, E] in the module and on disk (ERNIE-4.5's moe_statics); the view: [E]
    # experts saved as the module's own fused tensors (gpt-oss: experts.gate_up_proj [E, H, 2I], down_proj [E, I, H],
    # their biases; MXFP4 releases hold gate_up_proj_blocks/_scales instead): read and written in that layout
    fused_names: tuple[str, str] | None = None  # block-relative disk names of (gate_up, down) when fused on disk
    transposed: bool = False  # fused tensors are [E, H, 2I] / [E, I, H] (x @ W), not [E, 2I, H] / [E, H, I]
    # the save conversion transposes the fused tensors (Qwen3-VL-MoE: [E, 2I, H] in memory, [E, H, 2I] on disk)
    save_transposed: bool = False
    interleaved: bool = False  # gate and up rows alternate (g0, u0, g1, u1, ...) instead of gate rows first
    expert_bias: bool = False  # gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]
    # the experts' gated activation when not act(g) * u: "clamped_swiglu" (gpt-oss, with biases: BiasedExperts) or
    # "apply_gate" (the family's own channel-wise _apply_gate, run as experts.GatedExperts: Beam), or "ungated": no gate
    # projection (transformers' has_gate=False, Nemotron-H: h = act(x up^T)); the view's gate is then a copy of the up
    # rows that nothing computes with (experts.Ungated), expert_names[0] == expert_names[1], and only up and down are
    # written
    gate: str | None = None
    # a norm after each expert (transformers' has_post_expert_norm, MuseSpark: f = norm(h down^T), its weight at
    # experts.post_expert_norm.weight): the stream runs the experts as experts.PostNormedExperts
    post_norm: bool = False
    embed: str = "embed_tokens"  # input embedding module under model.model
    final_norm: str = "norm"  # final norm module under model.model (Jamba: final_layernorm)
    # where the checkpoint keeps the model body: "model" (model.layers.*), or another root transformers renames on
    # load (Nemotron-H: backbone.*); ``Checkpoint`` maps its keys to the view's model.* and back
    disk_body: str = "model"
    # a multimodal wrapper whose language model is this MoE: (the text model's, the lm_head's path in its checkpoint),
    # e.g. ("model.language_model", "lm_head"); the view names them model.* / lm_head.* (``Checkpoint`` maps the keys)
    # and reads the wrapper's text_config; every other tensor (vision tower, projector) is copied as it is
    nest: tuple[str, str] | None = None
    # Llama-4: the router's score g (sigmoid of the top-k logit) multiplies the token copy BEFORE the expert, and the
    # expert's output is added unweighted. The stream runs the block as ``interface.ScaledInputMoe``: the experts see
    # the copies g x with routing weight 1, so observed statistics are of the expert's true input, activation and
    # contribution f(g x) (routing mass = frequency, REAP = mean ||f(g x)||, channel moments of h(g x))
    scaled_input: bool = False
    # a per-expert output scale [E] (block-relative path) that multiplies each expert's routing weight after the
    # top-k renormalization: Gemma-4's ``router.per_expert_scale``; expert removal slices it with the router rows
    expert_scale: str | None = None
    # the MoE block is a view of modules its decoder layer holds itself (Gemma-4's ``interface.DecoderLayerMoe``):
    # the checkpoint keeps them at ``layers.N.<part>.*``, the view at ``layers.N.<module_block>.<part>.*``
    layer_parts: tuple[str, ...] = ()
    # MoE layers routed by a fixed token -> expert id table (DeepSeek-V4's first layers: router.tid2eid[input_ids]);
    # removing or merging experts would change which experts tokens reach there: refused (check_routing)
    hash_layers: tuple[int, ...] = ()

    @property
    def fused_disk(self) -> bool:
        """The routed experts are saved as fused tensors (gpt-oss's experts.gate_up_proj, Granite's input_linear)."""
        return self.fused_names is not None

    @property
    def disk_transposed(self) -> bool:
        """The fused tensors on disk are [E, H, 2I] / [E, I, H]."""
        return self.transposed != self.save_transposed

    @property
    def own_experts(self) -> bool:
        """The layer stream runs this family's experts as ``experts.BiasedExperts`` (biases, own gate, transposed or
        interleaved layouts) or ``experts.GatedExperts`` (its own channel-wise gate), not as the transformers module."""
        return self.transposed or self.interleaved or self.expert_bias or self.gate is not None or self.post_norm

    def view_names(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's tensors under the view's names: keys under ``disk_body`` (Nemotron-H's backbone.*) renamed
        to model.* (for loaders that read a folder's files directly; ``Checkpoint`` maps them itself)."""
        if self.disk_body == "model":
            return tensors
        pre = f"{self.disk_body}."
        return {f"model.{k[len(pre) :]}" if k.startswith(pre) else k: v for k, v in tensors.items()}

    @property
    def gateless(self) -> bool:
        """The experts have no gate projection (``experts.Ungated``): the view's gate is a copy of its up rows."""
        return self.gate == "ungated"

    # ---- config facts -------------------------------------------------------------------------
    def num_experts(self, cfg: Any) -> int:
        for key in self.count_keys:
            if getattr(cfg, key, None) is not None:
                return config_int(cfg, key)
        raise UserError(f"config.json has none of {', '.join(self.count_keys)}: cannot tell the expert count")

    def top_k(self, cfg: Any) -> int:
        if getattr(cfg, self.top_k_key, None) is None:
            raise UserError(f"config.json has no {self.top_k_key}: cannot tell the router's top-k")
        return config_int(cfg, self.top_k_key, hi=self.num_experts(cfg))

    def norm_topk(self, cfg: Any) -> bool:
        if self.scaled_input:  # Llama-4: the sigmoid scores scale the expert inputs as they are, never renormalized
            return False
        return True if self.norm_topk_key is None else bool(getattr(cfg, self.norm_topk_key, False))

    def check_routing(self, cfg: Any, what: str, removes_experts: bool, needs_routing: bool, hint: str) -> None:
        """Refuse ``what`` where this family's routing matters and moecompress has not verified it (a derived family
        whose router code differs from the hand-written ones): re-implemented routing (``needs_routing``: output-error
        search, refits, merging) or group-limited routing with experts removed (renumbering would regroup them)."""
        if self.expert_scale and not removes_experts:  # channel pruning (the atom transform rebuilds the layer)
            raise UserError(
                f"channel pruning does not carry {self.name}'s per-expert output scale ({self.expert_scale}) yet: "
                "prune whole experts with --method frequency, routing-mass or reap and --refit none"
            )
        if self.post_norm and not removes_experts:  # channel pruning: HEAPr and the refit take f linear in h
            raise UserError(
                f"channel pruning is refused for {self.name}: its experts normalize each expert's output "
                "(f = post_expert_norm(h down^T)), which the channel scores and refit (f linear in h) do not model: "
                "prune whole experts with --method frequency, routing-mass or reap and --refit none"
            )
        if removes_experts and self.hash_layers:
            raise UserError(
                f"{what} is refused for {self.name}: its layers {list(self.hash_layers)} pick experts by a fixed token "
                "-> expert table (router.tid2eid), so removing experts would send tokens elsewhere, and config.json "
                "holds one expert count for every layer (quantize and channel pruning, --granularity atom, work)"
            )
        if self.routing_known and self.routing_verified_by != "behaviour":
            return
        if removes_experts and self.group_key is not None and self.n_group(cfg) > 1 and not self.groups_contiguous:
            why = f" ({self.routing_note})" if self.routing_note and self.routing_known else ""
            raise UserError(
                f"{self.name} routes within groups of experts (config {self.group_key} = {self.n_group(cfg)}) by "
                f"code moecompress has not verified{why}: {what} could regroup its experts, so it is refused for "
                "this model type (quantize and channel pruning without refit work)"
            )
        if needs_routing and not self.routing_known:
            why = (
                f"its routing differs from moecompress's re-implementation on random inputs: {self.routing_note}"
                if self.routing_note
                else "its routing (derived from its transformers code) is not one moecompress has verified"
            )
            raise UserError(f"{what} re-implements the router, and for {self.name} {why}: {hint}")

    def routing_summary(self) -> str:
        """One line for ``moecompress info``: how moecompress knows this family's routing, or where it differs."""
        if self.routing_verified_by == "record":
            return "re-implemented by moecompress (a hand-written family)"
        if self.routing_verified_by == "source":
            return "verified: its router code equals a hand-written family's"
        if self.routing_verified_by == "behaviour":
            extra = f"; expert removal within groups not verified ({self.routing_note})" if self.routing_note else ""
            return "verified: its own block routes as moecompress's re-implementation on random inputs" + extra
        why = self.routing_note or "its router code is not one moecompress re-implements"
        return f"not verified ({why}): merge, output-error prune and refits are refused"

    def n_group(self, cfg: Any) -> int:
        if not self.group_key or getattr(cfg, self.group_key, None) is None:
            return 1
        return config_int(cfg, self.group_key, hi=self.num_experts(cfg))

    def moe_layers(self, cfg: Any) -> list[int]:
        dense = self.dense_layers(cfg)
        return [l for l in range(config_int(cfg, "num_hidden_layers")) if l not in dense]

    def check_config(self, cfg: Any, layers_on_disk: int | None = None) -> None:
        """Every count this family reads from config.json is a whole number in range and they agree with each
        other (top-k <= experts, groups divide the experts, no more layers than ``layers_on_disk``); raises a
        UserError naming the field otherwise."""
        for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
            config_int(cfg, key)
        if layers_on_disk is not None and cfg.num_hidden_layers > layers_on_disk:
            raise UserError(
                f"config.json num_hidden_layers is {cfg.num_hidden_layers}, but the weights hold "
                f"{layers_on_disk} decoder layers: the config does not belong to these weights"
            )
        E, k, G = self.num_experts(cfg), self.top_k(cfg), self.n_group(cfg)
        if E % G:
            raise UserError(f"config.json {self.group_key} is {G}, which does not divide the {E} routed experts")
        if G > 1 and getattr(cfg, "topk_group", None) is not None:
            tg = config_int(cfg, "topk_group", hi=G)
            if k > E // G * tg:
                raise UserError(
                    f"config.json num_experts_per_tok is {k}, more than the {E // G * tg} experts in the "
                    f"topk_group={tg} groups a token may use"
                )
        if not self.moe_layers(cfg):
            raise UserError("config.json makes every layer dense (no MoE layer): nothing for moecompress to do")

    def expert_count_updates(self, n: int) -> dict[str, int]:
        """config.json entries to write for a new routed-expert count."""
        return {key: n for key in self.count_keys}

    # ---- tensor names ---------------------------------------------------------------------------
    def block_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.disk_block}."

    def expert_key(self, layer: int, expert: int, proj: int) -> str:
        """proj: 0 gate, 1 up, 2 down. A family fused on disk has no per-expert keys, and transformers loads no
        quantized layout of its experts (checked with transformers 5.23 + compressed-tensors 0.20: per-expert and
        fused packed tensors alike, bench/quant_load_check.py --fused), so quantization is refused in one line."""
        if self.fused_disk and self.scaled_input:
            raise UserError(
                f"{self.name} keeps its routed experts fused on disk ({self.disk_block}.{self.fused_names[0]}): "
                "transformers reads quantized Llama-4 experts as one module per expert (SequentialLlama4TextExperts: "
                f"{self.experts}.<e>.gate_proj/up_proj/down_proj), which moecompress quantize writes (quant/keys.py); "
                "the byte-budget planner's per-expert layout is refused for it"
            )
        if self.fused_disk:
            fused = self.fused_names[0] if self.fused_names else f"{self.experts}.gate_up_proj"
            raise UserError(
                f"{self.name} keeps its routed experts fused on disk ({self.disk_block}.{fused}"
                f"{', with biases' if self.expert_bias else ''}): transformers loads compressed-tensors experts only "
                "through a per-expert WeightConverter of the model type's conversion mapping and this one has none, "
                "so quantized experts would not load (per expert or fused, their weight_packed tensors come back "
                "unexpected and gate_up_proj / down_proj missing); quantization is refused for it (profile, expert "
                "pruning, eval and load work)"
                if "gpt_oss" not in self.model_types  # gpt-oss: quant/mxfp4.py writes its release format instead
                else f"{self.name} keeps its routed experts fused on disk: `moecompress quantize --bits 4` writes "
                "them as MXFP4 (the release format transformers loads); compress quantize stages and byte budgets "
                "are refused"
            )
        return f"{self.block_prefix(layer)}{self.experts}.{expert}.{self.expert_names[proj]}.weight"

    def router_key(self, layer: int, what: str = "weight") -> str:
        if self.disk_correction and what == self.correction_bias:
            return f"{self.block_prefix(layer)}{self.disk_correction}"
        return f"{self.block_prefix(layer)}{self.disk_router or self.router}.{what}"

    def correction_key(self, layer: int) -> str | None:
        return self.router_key(layer, self.correction_bias) if self.correction_bias else None

    # ---- the correction bias in the transformers module (DeepSeek: router buffer; MiniMax-M2: the block's) -------
    def correction_module_key(self) -> str:
        """The correction bias's key in the MoE block's state dict (block-relative)."""
        return self.correction_module or f"{self.router}.{self.correction_bias}"

    def correction_disk(self, t: torch.Tensor) -> torch.Tensor:
        """The view's correction bias [E] in the shape the module and the checkpoint hold ([1, E] for ERNIE-4.5)."""
        return t.reshape(1, -1) if self.correction_row else t

    def router_of(self, block: torch.nn.Module) -> torch.nn.Module:
        """The MoE block's router module (a dotted path where it is nested: Hunyuan's gate.wg)."""
        return block.get_submodule(self.router)

    def correction_of(self, block: torch.nn.Module) -> torch.Tensor | None:
        """The MoE block's correction bias as the view holds it ([E]), None when the family has none."""
        if not self.correction_bias:
            return None
        owner, _, leaf = self.correction_module_key().rpartition(".")
        t = getattr(block.get_submodule(owner) if owner else block, leaf, None)
        return None if t is None else t.reshape(-1) if self.correction_row else t

    def set_correction(self, block: torch.nn.Module, t: torch.Tensor) -> None:
        """Give the MoE block this correction bias ([E], the view's): where and in the shape its module holds it."""
        owner, _, leaf = self.correction_module_key().rpartition(".")
        mod = block.get_submodule(owner) if owner else block
        t = self.correction_disk(t).contiguous()
        if leaf in mod._parameters:  # ERNIE-4.5 holds it as a parameter (requires_grad=False)
            setattr(mod, leaf, torch.nn.Parameter(t, requires_grad=False))
        else:
            mod.register_buffer(leaf, t)

    def routed_key_pattern(self, layer: int) -> re.Pattern[str]:
        """Matches every key owned by the routed experts and router of one layer (hub or fused names)."""
        names = (self.experts, *sorted({self.router, self.disk_router or self.router}))
        owned = rf"(?:{'|'.join(re.escape(n) for n in names)})\."
        if self.disk_correction:
            owned = rf"(?:{owned}|{re.escape(self.disk_correction)}$)"
        if self.expert_scale:
            owned = rf"(?:{owned}|{re.escape(self.expert_scale)}$)"
        if self.fused_names:  # fused experts saved outside the experts name (Granite's input_linear.weight)
            owned = rf"(?:{owned}|{'|'.join(re.escape(n) + '$' for n in self.fused_names)})"
        if self.post_norm:  # the experts' post_expert_norm.weight (one per layer, not per expert): passed through as is
            owned = rf"(?!{re.escape(self.experts)}\.post_expert_norm\.){owned}"
        if self.hash_layers:  # a hash router's token -> expert table is the layer's own tensor, passed through as is
            owned = rf"(?!(?:{re.escape(self.router)}|{re.escape(self.disk_router or self.router)})\.tid2eid$){owned}"
        return re.compile(
            rf"^model\.layers\.{layer}\.(?:{re.escape(self.disk_block)}|{re.escape(self.module_block)})\.{owned}"
        )

    def disk_to_module(self, key: str) -> str:
        """Rename a hub key's block part to the transformers module name (e.g. Mixtral block_sparse_moe -> mlp)."""
        if (self.renames or self.disk_correction or self.fused_names) and (m := _LAYER_PREFIX.match(key)):
            rel = key[m.end() :]
            for fused, name in zip(self.fused_names or (), ("gate_up_proj", "down_proj"), strict=False):
                if rel == f"{self.disk_block}.{fused}":
                    return f"{m[0]}{self.module_block}.{self.experts}.{name}"
            if self.disk_correction and rel == f"{self.disk_block}.{self.disk_correction}":
                return f"{m[0]}{self.module_block}.{self.correction_module_key()}"
            for disk, module in self.renames:
                if rel == disk:
                    return m[0] + module
        if self.disk_block != self.module_block:
            key = re.sub(rf"\.{re.escape(self.disk_block)}\.", f".{self.module_block}.", key, count=1)
        if self.disk_router and self.disk_router != self.router:
            mb = re.escape(self.module_block)
            key = re.sub(rf"^(model\.layers\.\d+\.{mb}\.){re.escape(self.disk_router)}\.", rf"\g<1>{self.router}.", key)
        return key

    # ---- the view ------------------------------------------------------------------------------
    def fused_key(self, layer: int, name: str) -> str:
        """A fused experts tensor of a family fused on disk (name: gate_up_proj, down_proj, their _bias)."""
        names = dict(zip(("gate_up_proj", "down_proj"), self.fused_names or (), strict=False))
        rel = names.get(name, f"{self.experts}.{name}")
        return f"{self.block_prefix(layer)}{rel}"

    def _read_fused(self, tensors: Mapping[str, torch.Tensor], layer: int) -> MoEWeights:
        """The view of a family fused on disk (gpt-oss layout: transposed, gate/up interleaved, biases; MXFP4
        ``_blocks``/``_scales`` dequantized on read with transformers' own converter)."""

        def get(name: str) -> torch.Tensor:
            key = self.fused_key(layer, name)
            if key in tensors:
                return tensors[key]
            blocks, scales = tensors.get(key + "_blocks"), tensors.get(key + "_scales")
            if blocks is None or scales is None:
                raise UserError(f"{self.name} checkpoint lacks {key} (layer {layer}): the weights do not match config")
            return dequantize_mxfp4(blocks, scales, key)

        gu, down = get("gate_up_proj"), get("down_proj")
        if self.disk_transposed:
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)  # [E, 2I, H], [E, H, I]
        I = gu.shape[1] // 2
        gate, up = (gu[:, 0::2], gu[:, 1::2]) if self.interleaved else (gu[:, :I], gu[:, I:])
        gb = ub = db = None
        if self.expert_bias:
            gub, db = get("gate_up_proj_bias"), get("down_proj_bias")  # [E, 2I], [E, H]
            gb, ub = (gub[:, 0::2], gub[:, 1::2]) if self.interleaved else (gub[:, :I], gub[:, I:])
        rp = self.block_prefix(layer) + (self.disk_router or self.router) + "."
        router = tensors.get(rp + "weight")
        if router is None:
            raise UserError(f"{self.name} checkpoint lacks the router weight {rp}weight (layer {layer})")
        bias = tensors.get(rp + "bias") if self.router_bias else None
        corr = tensors.get(self.router_key(layer, self.correction_bias)) if self.correction_bias else None  # (HY-V4)
        if corr is not None and self.correction_row:
            corr = corr.reshape(-1)  # [1, E] -> [E]
        return MoEWeights(gate, up, down, router, bias, corr, gb, ub, db, self._read_expert_scale(tensors, layer))

    def _write_fused(self, w: Any, layer: int) -> dict[str, torch.Tensor]:
        if not isinstance(w.gate, torch.Tensor):
            raise UserError(f"{self.name} keeps its experts fused on disk: experts of unequal widths cannot be written")

        def fuse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [E, I, ...] x2 -> [E, 2I, ...]
            return torch.stack([a, b], dim=2).flatten(1, 2) if self.interleaved else torch.cat([a, b], dim=1)

        gu, down = fuse(w.gate, w.up), w.down  # [E, 2I, H], [E, H, I]
        if self.disk_transposed:
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        out = {self.fused_key(layer, "gate_up_proj"): gu.contiguous(), self.fused_key(layer, "down_proj"): down}
        if self.expert_bias:
            out[self.fused_key(layer, "gate_up_proj_bias")] = fuse(w.gate_bias, w.up_bias)
            out[self.fused_key(layer, "down_proj_bias")] = w.down_bias
        out[self.router_key(layer)] = w.router
        if w.router_bias is not None:
            out[self.router_key(layer, "bias")] = w.router_bias
        if w.correction_bias is not None and self.correction_bias:
            out[self.router_key(layer, self.correction_bias)] = self.correction_disk(w.correction_bias)
        out |= self._write_expert_scale(w, layer)
        return {k: v.contiguous() for k, v in out.items()}

    def _write_expert_scale(self, w: Any, layer: int) -> dict[str, torch.Tensor]:
        if not self.expert_scale:
            return {}
        if getattr(w, "expert_scale", None) is None:
            raise UserError(f"{self.name} layer {layer}: its per-expert scale {self.expert_scale} was not kept")
        return {self.block_prefix(layer) + self.expert_scale: w.expert_scale.contiguous()}

    def read_layer(self, tensors: Mapping[str, torch.Tensor], layer: int, num_experts: int) -> MoEWeights:
        """Per-layer view from hub-format or fused (in-memory) tensors."""
        if self.fused_disk:
            return self._read_fused(tensors, layer)
        p = self.block_prefix(layer)
        fused = f"model.layers.{layer}.{self.module_block}.{self.experts}.gate_up_proj"
        own_up = f"model.layers.{layer}.{self.module_block}.{self.experts}.up_proj"  # a gateless module's [E, I, H]
        if fused in tensors or (self.gateless and own_up in tensors):
            if fused in tensors:
                gate_up = tensors[fused]  # [E, 2I, H]
                I = gate_up.shape[1] // 2
                gate, up = gate_up[:, :I], gate_up[:, I:]
            else:
                up = tensors[own_up]
                gate = up.clone()
            down = tensors[f"model.layers.{layer}.{self.module_block}.{self.experts}.down_proj"]  # [E, H, I]
            rp = f"model.layers.{layer}.{self.module_block}.{self.router}."
            ck = f"model.layers.{layer}.{self.module_block}.{self.correction_module_key()}"
        else:
            try:
                gate = torch.stack([tensors[self.expert_key(layer, e, 0)] for e in range(num_experts)])
                up = torch.stack([tensors[self.expert_key(layer, e, 1)] for e in range(num_experts)])
                down = torch.stack([tensors[self.expert_key(layer, e, 2)] for e in range(num_experts)])
            except KeyError as err:
                raise UserError(
                    f"{self.name} checkpoint lacks {err.args[0]} (layer {layer}): the weights do not match config.json"
                ) from None
            rp = p + (self.disk_router or self.router) + "."
            ck = self.router_key(layer, self.correction_bias or "")
        router = tensors.get(rp + "weight")
        if router is None:
            raise UserError(f"{self.name} checkpoint lacks the router weight {rp}weight (layer {layer})")
        bias = tensors.get(rp + "bias") if self.router_bias else None
        corr = tensors.get(ck) if self.correction_bias else None
        if corr is not None and self.correction_row:
            corr = corr.reshape(-1)  # [1, E] -> [E]
        return MoEWeights(
            gate=gate, up=up, down=down, router=router, router_bias=bias, correction_bias=corr,
            expert_scale=self._read_expert_scale(tensors, layer),
        )  # fmt: skip

    def _read_expert_scale(self, tensors: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor | None:
        """The per-expert output scale [E] of a family that has one (disk or module name), else None."""
        if not self.expert_scale:
            return None
        for p in (self.block_prefix(layer), f"model.layers.{layer}.{self.module_block}."):
            if p + self.expert_scale in tensors:
                return tensors[p + self.expert_scale]
        raise UserError(f"{self.name} checkpoint lacks {self.block_prefix(layer)}{self.expert_scale} (layer {layer})")

    def write_layer(self, w: Any, layer: int) -> dict[str, torch.Tensor]:
        """Hub-format tensors for one layer's routed experts and router (experts numbered 0..E-1).

        ``w``: a MoEWeights, or any object with the same fields holding per-expert lists (unequal widths).
        A family fused on disk gets its fused tensors back (bit for bit what ``read_layer`` read)."""
        if self.expert_bias:
            E, I = len(w.gate), w.gate[0].shape[0]
            gb, ub, db = (getattr(w, n, None) for n in ("gate_bias", "up_bias", "down_bias"))
            if gb is None or ub is None or db is None or tuple(gb.shape) != (E, I) or ub.shape != gb.shape:
                raise UserError(
                    f"{self.name}'s experts carry biases that this operation did not keep in step with the weights "
                    f"({E} experts of width {I}): it is refused for this model type"
                )
        if self.fused_disk:
            return self._write_fused(w, layer)
        out: dict[str, torch.Tensor] = {}
        for e in range(len(w.gate)):
            for proj, t in enumerate((w.gate[e], w.up[e], w.down[e])):
                if proj == 0 and self.gateless:  # no gate projection: the view's gate copies up, never written
                    continue
                out[self.expert_key(layer, e, proj)] = t.contiguous()
        out[self.router_key(layer)] = w.router.contiguous()
        if w.router_bias is not None:
            out[self.router_key(layer, "bias")] = w.router_bias.contiguous()
        if w.correction_bias is not None and self.correction_bias:
            out[self.router_key(layer, self.correction_bias)] = self.correction_disk(w.correction_bias).contiguous()
        out |= self._write_expert_scale(w, layer)
        return out


@dataclass
class MoEWeights:
    """One MoE layer's routed experts and router, in the internal view."""

    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    router: torch.Tensor  # [E, H]
    router_bias: torch.Tensor | None = None  # [E]
    correction_bias: torch.Tensor | None = None  # [E]
    gate_bias: torch.Tensor | None = None  # [E, I]  (experts with biases: gpt-oss)
    up_bias: torch.Tensor | None = None  # [E, I]
    down_bias: torch.Tensor | None = None  # [E, H]
    expert_scale: torch.Tensor | None = None  # [E] (Gemma-4's router.per_expert_scale)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def select(self, experts: list[int] | torch.Tensor) -> MoEWeights:
        """Keep only these experts, in this order (renumbered 0..k-1); router rows and biases follow."""
        idx = torch.as_tensor(experts, dtype=torch.long)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        return replace(
            self,
            gate=self.gate.index_select(0, idx),
            up=self.up.index_select(0, idx),
            down=self.down.index_select(0, idx),
            router=self.router.index_select(0, idx),
            router_bias=pick(self.router_bias),
            correction_bias=pick(self.correction_bias),
            gate_bias=pick(self.gate_bias),
            up_bias=pick(self.up_bias),
            down_bias=pick(self.down_bias),
            expert_scale=pick(self.expert_scale),
        )


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, key: str) -> torch.Tensor:
    """An MXFP4 experts tensor as published (``*_blocks`` [E, R, G, 16] uint8, ``*_scales`` [E, R, G] uint8 E8M0) in
    bfloat16, with transformers' own converter: [E, G * 32, R] (gpt-oss: gate_up [E, H, 2I], down [E, I, H])."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise UserError(
            f"{key}_blocks {list(blocks.shape)} / _scales {list(scales.shape)} are not MXFP4 (uint8 blocks of 16 "
            "bytes with one uint8 scale each): the checkpoint is corrupt"
        )
    return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="Mixtral",
        model_types=("mixtral",),
        count_keys=("num_local_experts",),
        disk_block="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
        norm_topk_key=None,
    ),
    Family(
        name="Qwen2-MoE",
        model_types=("qwen2_moe",),
        count_keys=("num_experts",),
        shared="shared_expert",
        shared_gate="shared_expert_gate",
        dense_layers=_qwen_dense_layers,
    ),
    Family(
        name="Qwen3-MoE",
        model_types=("qwen3_moe",),
        count_keys=("num_experts", "num_local_experts"),
        dense_layers=_qwen_dense_layers,
    ),
    Family(name="OLMoE", model_types=("olmoe",), count_keys=("num_experts",)),
    Family(
        name="DeepSeek-V3",
        model_types=("deepseek_v3",),
        count_keys=("n_routed_experts",),
        correction_bias="e_score_correction_bias",
        shared="shared_experts",
        group_key="n_group",
        dense_layers=_deepseek_dense_layers,
    ),
)


# Config keys (top level, or inside a nested sub-config such as DBRX's ffn_config) that hold a routed expert count.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _expert_count_anywhere(cfg: Any, least: int = 2) -> str | None:
    """'key=value' of the first routed-expert count >= ``least`` in the config or one level of nested sub-configs."""
    try:
        d = cfg.to_dict()
    except Exception:  # a hostile config object: treat it as carrying no expert count
        return None
    places: list[tuple[str, Any]] = [("", d)] + [(f"{k}.", v) for k, v in d.items() if isinstance(v, dict)]
    try:  # (two configs deep: Qwen3-Omni's thinker_config.text_config)
        text = cfg.get_text_config()
        if text is not cfg and hasattr(text, "to_dict"):
            places.append(("text_config.", text.to_dict()))
    except Exception:  # a config without transformers' text-config lookup: the levels above only
        pass
    for prefix, sub in places:
        for key in EXPERT_COUNT_KEYS:
            v = sub.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= least:
                return f"{prefix}{key}={v}"
    return None


def family_for(cfg: Any) -> Family:
    """The family record for a transformers config, or a UserError naming what is missing.

    A hand-written record first; any other Mixture-of-Experts model type is derived from its transformers model
    (``derive.derive``), or refused in one line naming the reason."""
    model_type = getattr(cfg, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            if all(getattr(cfg, k, None) in (None, 0) for k in fam.count_keys):
                raise UserError(
                    f"model_type {model_type!r} has no routed experts ({' / '.join(fam.count_keys)} missing or 0): "
                    "moecompress needs a Mixture-of-Experts model"
                )
            return fam
    supported = ", ".join(t for f in FAMILIES for t in f.model_types) + " and the derived families in the README"
    found = _expert_count_anywhere(cfg)
    if found is None and _expert_count_anywhere(cfg, least=1) is not None:  # one routed expert left (top-1 Llama-4
        fam, _ = derived_family(cfg)  # pruned to its minimum): still a routed block, when derivation finds one
        if fam is not None:
            return fam
    nested = [k for k, v in vars(cfg).items() if hasattr(v, "to_dict") and k.endswith("config")]
    if found is None and nested:
        raise UserError(
            f"model_type {model_type!r} keeps its language model in nested configs ({', '.join(nested[:3])}) and "
            "no expert count at the top of config.json: moecompress reads text-only causal LMs; "
            f"supported MoE families: {supported}"
        )
    if found is None:
        raise UserError(
            f"model_type {model_type!r} is not a Mixture-of-Experts model (no expert count in config.json); "
            f"supported MoE families: {supported}"
        )
    fam, reason = derived_family(cfg)
    if fam is not None:
        return fam
    raise UserError(
        f"no moecompress adapter for model_type {model_type!r} yet: it is a Mixture-of-Experts family ({found}) "
        f"that moecompress cannot read: {reason}; supported: {supported}"
    )


_DERIVED: dict[str, tuple[Family | None, str]] = {}


def derived_family(cfg: Any) -> tuple[Family | None, str]:
    """(Family, "") derived from the transformers model ``cfg`` describes, or (None, the one-line reason)."""
    from .derive import Refusal, derive

    try:
        memo = cfg.to_json_string(use_diff=False)
    except Exception:  # a config transformers cannot serialize: derive it every time
        memo = None
    if memo is not None and memo in _DERIVED:
        return _DERIVED[memo]
    try:
        d = derive(cfg)
    except Refusal as err:
        result: tuple[Family | None, str] = (None, str(err))
    else:
        dense = d["dense"]
        fam = Family(
            name=d["model_type"],
            model_types=(d["model_type"],),
            count_keys=d["count_keys"],
            disk_block=d["disk_block"],
            module_block=d["module_block"],
            router=d["router"],
            experts=d["experts"],
            expert_names=d["expert_names"],
            router_bias=d["router_bias"],
            correction_bias=d["correction_bias"],
            shared=d["shared"],
            shared_gate=d["shared_gate"],
            norm_topk_key=d["norm_topk_key"],
            group_key=d["group_key"],
            groups_contiguous=d["groups_contiguous"],
            dense_layers=lambda cfg, dense=dense: dense,
            top_k_key=d["top_k_key"],
            renames=d["renames"],
            disk_router=d["disk_router"],
            disk_correction=d["disk_correction"],
            correction_module=d["correction_module"],
            correction_row=d["correction_row"],
            routing_known=d["routing_like"] is not None,
            routing_verified_by="source" if d["routing_like"] is not None else None,
            derived=True,
            fused_names=d["fused_names"][:2] if d["fused_names"] else None,
            save_transposed=bool(d["fused_names"] and d["fused_names"][2]),
            transposed=d["flags"]["is_transposed"],
            interleaved=not d["flags"]["is_concatenated"],
            expert_bias=d["flags"]["has_bias"],
            gate=d["gate"],
            post_norm=d.get("post_norm", False),
            disk_body=d.get("disk_body", "model"),
            embed=d["embed"],
            final_norm=d["final_norm"],
            nest=d["nest"],
            scaled_input=d["scaled_input"],
            expert_scale=d.get("expert_scale"),
            layer_parts=d.get("layer_parts", ()),
            hash_layers=d.get("hash_layers", ()),
        )
        if d["routing_block"] is not None:  # no source match: run the block itself against route()
            fam = _behaviour_verified(fam, d)
        result = (fam, "")
    if memo is not None:
        if len(_DERIVED) > 64:
            _DERIVED.clear()
        _DERIVED[memo] = result
        if result[0] is not None and result[0].nest is not None:  # its text config (what Checkpoint.config holds)
            _DERIVED[d["text_config"].to_json_string(use_diff=False)] = result
    return result


def _behaviour_verified(fam: Family, d: dict[str, Any]) -> Family:
    """``fam`` with routing_known set when its own MoE block routes as ``prune.order.route`` on random inputs
    (``core.routing_check``), else with the first difference in ``routing_note``. Its group-limited routing counts as
    contiguous (expert removal allowed) only when a block rebuilt with one expert fewer per group routes as ``route``
    with those experts masked (the source pattern ``groups_contiguous`` is not enough once routing is verified)."""
    from .routing_check import check_routing

    cfg = d["routing_config"]
    res = check_routing(d["routing_block"], fam, cfg, d["routing_layer"])
    if not res.verified:
        return replace(fam, routing_note=res.reason)
    try:
        groups = fam.group_key is not None and fam.n_group(cfg) > 1
    except UserError:  # (a bad group count: check_config says so when the model is opened)
        groups = False
    return replace(
        fam, routing_known=True, routing_verified_by="behaviour", routing_note=res.reason, router_variant=res.variant,
        groups_contiguous=res.removal_verified if groups else fam.groups_contiguous,
    )  # fmt: skip
