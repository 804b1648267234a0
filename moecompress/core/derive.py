"""Derive a ``Family`` from the transformers model a config describes, instead of transcribing it by hand.

The model is built on the meta device (no memory). Its experts modules are the ones transformers wraps with
``use_experts_implementation`` (they carry ``has_gate`` / ``is_transposed`` / ``has_bias`` / ``is_concatenated`` /
``has_post_expert_norm``); the parent of one is the MoE block, the block child holding a ``weight [E, H]`` is the
router. The on-disk names come from transformers' own save path (``revert_weight_conversion``, the reverse of
``conversion_mapping.py``), run on small marker tensors so every per-expert key is matched to its expert and
projection by value, not by guessing names. What cannot be supported correctly is refused with one reason
(``Refusal``); the caller turns it into a one-line UserError.
"""

from __future__ import annotations

import copy
import inspect
import re
from functools import lru_cache
from typing import Any

import torch

_CORR = "e_score_correction_bias"
COUNT_EXCLUDE = ("per_tok", "shared", "top", "group", "layer", "capacity")


class Refusal(Exception):
    """A model type moecompress cannot support correctly yet; ``str(err)`` is the one-line reason."""


def _norm_source(cls: type) -> str:
    """A class's source with every CamelCase name replaced (two modular copies of one family compare equal)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return f"<no source {cls.__qualname__}>"
    src = re.sub(r"#.*", "", src)
    src = re.sub(r"\b[A-Z][A-Za-z0-9_]*\b", "X", src)
    return re.sub(r"\s+", " ", src)


_norm_source_of = lru_cache(maxsize=512)(_norm_source)


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


# group-limited routing over contiguous, equal groups of expert indices (DeepSeek-V2/V3, GLM-4.5 and their copies):
# ``scores.view(-1, self.num_group, self.num_experts // self.num_group)``. Experts removed in equal numbers from
# every group, in order, leave every kept expert in its group: the pruned router is the base router with those
# experts masked out of routing (tests/families checks it per model type).
_CONTIGUOUS_GROUPS = re.compile(r"\.view\(\s*-1,\s*self\.(\w+),\s*self\.\w+\s*//\s*self\.\1\s*\)")


@lru_cache(maxsize=1)
def _clamped_swiglu_source() -> str:
    """gpt-oss's gated activation (``GptOssExperts._apply_gate``), normalized: ``core.experts.clamped_swiglu``."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return _norm_source(GptOssExperts._apply_gate)


@lru_cache(maxsize=1)
def _reference_routing() -> dict[str, tuple[str, str]]:
    """Normalized (block, router) sources of the hand-written families whose routing moecompress re-implements."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    from transformers.models.gpt_oss import modeling_gpt_oss as go
    from transformers.models.mixtral import modeling_mixtral as mx
    from transformers.models.olmoe import modeling_olmoe as ol
    from transformers.models.qwen2_moe import modeling_qwen2_moe as q2
    from transformers.models.qwen3_moe import modeling_qwen3_moe as q3

    return {
        # gpt-oss: top-k of the biased logits, softmax over those k = Mixtral's softmax, top-k, renormalized, with the
        # router bias added to the logits (which prune and merge add); its prune output equals the base model with
        # those experts masked out of routing (tests/families family checks)
        "gpt_oss": (_norm_source(go.GptOssMLP), _norm_source(go.GptOssTopKRouter)),
        "mixtral": (_norm_source(mx.MixtralSparseMoeBlock), _norm_source(mx.MixtralTopKRouter)),
        "qwen2_moe": (_norm_source(q2.Qwen2MoeSparseMoeBlock), _norm_source(q2.Qwen2MoeTopKRouter)),
        "qwen3_moe": (_norm_source(q3.Qwen3MoeSparseMoeBlock), _norm_source(q3.Qwen3MoeTopKRouter)),
        "olmoe": (_norm_source(ol.OlmoeSparseMoeBlock), _norm_source(ol.OlmoeTopKRouter)),
        "deepseek_v3": (_norm_source(ds.DeepseekV3MoE), _norm_source(ds.DeepseekV3TopkRouter)),
    }


@lru_cache(maxsize=1)
def _nemotron_h_routing() -> tuple[str, str]:
    """Normalized (block, router) sources of Nemotron-H: ``NemotronHTopkRouter`` is DeepSeek-V3's router up to names
    (sigmoid, correction bias, group-limited top-k, renormalization, routed scaling: checked here), and
    ``NemotronHMoE`` calls it as ``DeepseekV3MoE`` does, with latent projections around the experts that are
    identities when ``moe_latent_size`` is unset (the latent variant is refused): its routing is DeepSeek-V3's."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    from transformers.models.nemotron_h import modeling_nemotron_h as nh

    block, router = _norm_source(nh.NemotronHMoE), _norm_source(nh.NemotronHTopkRouter)
    return (block, router) if router == _norm_source(ds.DeepseekV3TopkRouter) else ("", "")


@lru_cache(maxsize=1)
def _gemma4_router_source() -> str:
    """Normalized source of transformers' ``Gemma4TextRouter`` (proj, scale, per_expert_scale)."""
    from transformers.models.gemma4 import modeling_gemma4 as g4

    return _norm_source(g4.Gemma4TextRouter)


@lru_cache(maxsize=1)
def _scaled_input_reference() -> tuple[str, str, str]:
    """Normalized sources of Llama-4's (MoE block, router, experts): the computation ``ScaledInputMoe`` runs."""
    from transformers.models.llama4 import modeling_llama4 as l4

    return (_norm_source(l4.Llama4TextMoe), _norm_source(l4.Llama4Router), _norm_source(l4.Llama4TextExperts))


def scaled_input_blocks(model: torch.nn.Module) -> int:
    """Replace every MoE block whose code is Llama-4's (block, router and experts classes equal transformers'
    ``Llama4TextMoe`` / ``Llama4Router`` / ``Llama4TextExperts`` up to names: the router's sigmoid scores multiply
    the token copies before the experts) by ``interface.ScaledInputMoe``, the same computation on the experts
    interface (the experts held as [E, 2I, H] / [E, H, I]); returns how many were replaced."""
    from .interface import ScaledInputMoe

    ref, n = _scaled_input_reference(), 0
    for name, mod in list(model.named_modules()):
        ex, router = getattr(mod, "experts", None), getattr(mod, "router", None)
        if not isinstance(ex, torch.nn.Module) or not isinstance(router, torch.nn.Module):
            continue
        if (_norm_source_of(type(mod)), _norm_source_of(type(router)), _norm_source_of(type(ex))) != ref:
            continue
        parts = name.split(".")  # the config of the innermost model holding the block (a wrapper's text model's)
        owners = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1)]
        config = next(o.config for o in owners if hasattr(getattr(o, "config", None), "num_local_experts"))
        parent = owners[0]
        setattr(parent, parts[-1], ScaledInputMoe(mod, config))
        n += 1
    return n


class TextLM(torch.nn.Module):
    """A multimodal wrapper's language model as a causal LM: its text model (``model``) and its ``lm_head``, with the
    state-dict names a text-only causal LM has (``model.layers.*``, ``model.norm.weight``, ``lm_head.weight``): the
    layer stream and the expert view work on it as on any causal LM (calibration is text-only)."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module, config: Any):
        super().__init__()
        self.model, self.lm_head, self.config = body, head, config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        out = self.model(input_ids=input_ids, **kwargs)
        return CausalLMOutput(logits=self.lm_head(out[0]))


def causal_lm(cfg: Any, **kwargs: Any) -> torch.nn.Module:
    """The causal LM of a (text) config: transformers' own class, or for the text config of a multimodal wrapper
    that has none (Qwen3-VL-MoE, GLM-4.5V) its text model with an lm_head (``TextLM``). Llama-4's MoE blocks are
    ``ScaledInputMoe`` (``scaled_input_blocks``): the same computation, with the experts on the experts interface."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    mt = cfg.model_type
    own = _text_model_class(cfg) if mt.endswith("_text") and mt not in MODEL_MAPPING_NAMES else None
    if own is None and (
        mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or mt not in MODEL_MAPPING_NAMES or not mt.endswith("_text")
    ):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, **kwargs)
    else:
        body = own._from_config(cfg, **kwargs) if own else AutoModel.from_config(cfg, trust_remote_code=False, **kwargs)
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        model = TextLM(body, head, cfg)
    scaled_input_blocks(model)
    from .interface import decoder_layer_blocks  # Gemma-4: its layer's router and experts as one block (<layer>.moe)

    decoder_layer_blocks(model)
    return model


def _text_model_class(cfg: Any) -> Any:
    """A wrapper's text model class when transformers maps its text config to no Auto class (DeepSeek-OCR-2's
    DeepseekOcr2TextModel): the base model of the config's own modeling module built from exactly this config class."""
    import importlib

    from transformers import PreTrainedModel

    try:
        mod = importlib.import_module(type(cfg).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    found = [
        c
        for c in vars(mod).values()
        if isinstance(c, type) and issubclass(c, PreTrainedModel) and getattr(c, "config_class", None) is type(cfg)
        and c.__name__.endswith("TextModel")
    ]  # fmt: skip
    return found[0] if len(found) == 1 else None


def unset_config_keys(err: BaseException) -> tuple[Any, list[str]]:
    """Config keys left None (missing from config.json) that the code raising ``err`` reads: the innermost frame of
    its traceback that holds a transformers config (``config`` or ``self.config``) and reads ``config.<key>`` in its
    function, for keys whose value there is None (LFM2-MoE indexes ``config.layer_types[i]``)."""
    from transformers import PretrainedConfig

    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for fr in reversed(frames):
        cfg = fr.f_locals.get("config", getattr(fr.f_locals.get("self"), "config", None))
        if not isinstance(cfg, PretrainedConfig):
            continue
        try:
            src = inspect.getsource(fr.f_code)
        except (OSError, TypeError):
            continue
        keys = [
            k for k in dict.fromkeys(re.findall(r"\bconfig\.(\w+)", src)) if k in vars(cfg) and vars(cfg)[k] is None
        ]
        if keys:
            return cfg, keys
    return None, []


def build_error(err: BaseException, model_type: str) -> str:
    """Why transformers could not build the model config.json describes, in one line: the keys to add to config.json
    when its code read one left unset, else transformers' own first line."""
    cfg, keys = unset_config_keys(err) if isinstance(err, TypeError) else (None, [])
    if keys:
        names = ", ".join(keys)
        sub = getattr(cfg, "base_config_key", "") if getattr(cfg, "model_type", model_type) != model_type else ""
        where = f"config.json's {sub}" if sub else "config.json"  # a wrapper's text_config
        return (
            f"{where} has no {names} (None), which transformers' {model_type} code reads: add {names} to "
            f"{where} as the model's published config.json sets it"
        )
    first = (str(err).splitlines() or [""])[0][:160]
    return f"{type(err).__name__}: {first}"


def meta_model(cfg: Any) -> torch.nn.Module:
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    try:
        with torch.device("meta"):
            return causal_lm(cfg, experts_implementation="eager")
    except Exception as err:  # transformers raises many types for a config it cannot build
        raise Refusal(f"transformers cannot build it from config.json ({build_error(err, cfg.model_type)})") from None


def nests_text(cfg: Any) -> bool:
    """The config is a multimodal wrapper's: its text model's config is nested in it (text_config, or two configs
    deep as Qwen3-Omni's thinker_config.text_config)."""
    if getattr(cfg, "text_config", None) is not None:
        return True
    try:
        text = cfg.get_text_config()
    except Exception:  # a config transformers cannot navigate: not a wrapper
        return False
    return text is not None and text is not cfg


_THINKERS: dict[type, type] = {}


def _with_thinker_forward(cls: type) -> type:
    """``cls`` (Qwen3-Omni's wrapper: a thinker that generates text, and a talker that speaks, with ``generate`` but no
    ``forward``) with a ``forward`` that is its thinker's: the text logits, as transformers' generate computes them."""
    if cls not in _THINKERS:

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.thinker(*args, **kwargs)

        _THINKERS[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _THINKERS[cls]


class _ThinkerAuto:
    """The Auto class for a wrapper whose text model is its thinker's (Qwen3-Omni): transformers' multimodal-LM class
    with the thinker's forward (``_with_thinker_forward``); the checkpoint's names and the talker stay as they are."""

    @staticmethod
    def _cls(cfg: Any) -> type:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING

        return _with_thinker_forward(MODEL_FOR_MULTIMODAL_LM_MAPPING[type(cfg)])

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> Any:
        kwargs.pop("trust_remote_code", None)
        return cls._cls(cfg)._from_config(cfg, **kwargs)

    @classmethod
    def from_pretrained(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
        from transformers import AutoConfig

        kwargs.pop("trust_remote_code", None)
        cfg = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, trust_remote_code=False)
        return cls._cls(cfg).from_pretrained(path, *args, config=cfg, **kwargs)


def wrapper_auto_class(cfg: Any) -> Any:
    """The Auto class transformers loads a multimodal wrapper with (image-text-to-text; Qwen3-Omni's multimodal-LM
    class with its thinker's forward), None for other models."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )

    if not nests_text(cfg):
        return None
    if getattr(cfg, "text_config", None) is not None and cfg.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if getattr(cfg, "thinker_config", None) is not None and cfg.model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES:
        return _ThinkerAuto
    return None


def _wrapper(cfg: Any) -> tuple[torch.nn.Module, TextLM, str, str]:
    """(the wrapper on the meta device, its language model as a ``TextLM``, the text model's and the lm_head's paths
    in the wrapper's state dict) of a multimodal model whose language model is an MoE (Qwen3-VL-MoE:
    model.language_model and lm_head; Llama-4: language_model.model and language_model.lm_head)."""
    auto = wrapper_auto_class(cfg)
    if auto is None:
        raise Refusal("its config nests a text_config and transformers has no image-text-to-text class for it")
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    try:
        with torch.device("meta"):
            wrapper = auto.from_config(cfg, trust_remote_code=False, experts_implementation="eager")
    except Exception as err:  # transformers raises many types for a config it cannot build
        raise Refusal(f"transformers cannot build it from config.json ({build_error(err, cfg.model_type)})") from None
    from .interface import decoder_layer_blocks

    scaled_input_blocks(wrapper)
    decoder_layer_blocks(wrapper)
    bodies = [
        n
        for n, m in wrapper.named_modules()
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and any(map(_experts_modules, m.layers))
    ]
    heads = [n for n, _ in wrapper.named_modules() if n.rsplit(".", 1)[-1] == "lm_head"]
    if not bodies:
        raise Refusal(
            "its language model's layers hold no experts module of transformers' experts interface "
            "(use_experts_implementation): the expert view cannot be derived"
        )
    text = cfg.get_text_config()
    if len(bodies) > 1 and auto is _ThinkerAuto:  # (Qwen3-Omni with its talker, a separate speech model: its MoE
        # text model is built from the talker's config, not the text config; the thinker's alone generates text)
        built = [b for b in bodies if getattr(wrapper.get_submodule(b), "config", None) is not None]
        bodies = [b for b in built if wrapper.get_submodule(b).config.to_dict() == text.to_dict()] or bodies
    if len(bodies) == 1 and len(heads) > 1 and auto is _ThinkerAuto:  # (the talker's code predictor's heads too)
        heads = [h for h in heads if h.split(".", 1)[0] == bodies[0].split(".", 1)[0]] or heads
    if len(bodies) != 1 or len(heads) != 1:
        raise Refusal(f"it nests its language model where moecompress does not find one text model ({bodies}, {heads})")
    if getattr(wrapper.get_submodule(bodies[0]), "config", text).to_dict() != text.to_dict():
        raise Refusal(f"its text model at {bodies[0]} is not built from its text_config")
    lm = TextLM(wrapper.get_submodule(bodies[0]), wrapper.get_submodule(heads[0]), text)
    return wrapper, lm, bodies[0], heads[0]


def _stream_ends(model: torch.nn.Module, H: int) -> tuple[str, str]:
    """(embedding, final norm) module names under ``model.model``: the input embedding, and the one other child
    with parameters besides the layers (Llama's norm, Jamba's final_layernorm, Nemotron-H's norm_f)."""
    inner = model.model
    emb = model.get_input_embeddings()
    embed = next((n for n, c in inner.named_children() if c is emb), None)
    if embed is None:
        raise Refusal("its input embedding is not a child of model.model (the layer stream embeds there)")
    from .stream import per_layer_modules  # Gemma-4's per-layer inputs: the layer stream computes them

    skip = (embed, "layers", *per_layer_modules(inner))
    rest = [n for n, c in inner.named_children() if n not in skip and list(c.parameters())]
    norms = [n for n in rest if tuple(getattr(inner.get_submodule(n), "weight", torch.empty(0)).shape) == (H,)]
    if len(norms) > 1 or not rest:
        raise Refusal(f"it has no single final norm [hidden] beside the layers under model.model ({rest})")
    others = [n for n in rest if n not in norms]
    if others:  # hyper-connections (DeepSeek-V4's hc_head, Qwen4-Exp's mixer): run with the model's own forward
        before = _used_before_layers(type(inner), others)
        if before:
            raise Refusal(
                f"its model.model runs {before} around its decoder layers besides the embedding: the layer stream "
                "runs only modules its forward calls after the last layer"
            )
    return embed, (norms or others)[0]  # (no [hidden] norm: the stream's head is the forward's tail all the same)


def _layers_loop(cls: type) -> Any:
    """The one ``for ... in self.layers...`` loop of ``cls.forward`` (an ``ast.For``), or None."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    loops = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.For) and any(
            isinstance(a, ast.Attribute) and a.attr == "layers" and getattr(a.value, "id", None) == "self"
            for a in ast.walk(n.iter)
        )
    ]  # fmt: skip
    return loops[0] if len(loops) == 1 else None


def layer_carry(cls: type) -> tuple[dict[str, int], int]:
    """What the layer loop of ``cls.forward`` threads from one decoder layer to the next beside the hidden states:
    ({keyword argument: index of the layer output it is taken from}, the number of outputs the loop unpacks), e.g.
    HY-V4 / GLM-5-DSA's ``hidden_states, topk_indices = decoder_layer(..., prev_topk_indices=topk_indices)`` ->
    ({"prev_topk_indices": 1}, 2); ({}, 1) when the loop threads the hidden states only."""
    import ast

    loop = _layers_loop(cls)
    if loop is None:
        return {}, 1
    names = {t.id for t in ast.walk(loop.target) if isinstance(t, ast.Name)}
    carry: dict[str, int] = {}
    arity = 1
    for node in ast.walk(loop):
        call = getattr(node, "value", None)
        if not (isinstance(node, ast.Assign) and isinstance(call, ast.Call) and isinstance(node.targets[0], ast.Tuple)):
            continue
        if not (isinstance(call.func, ast.Name) and call.func.id in names):
            continue  # (another call's tuple: Gemma-4's per-layer inputs)
        elts = node.targets[0].elts
        arity = len(elts)
        for j, t in enumerate(elts[1:], 1):
            for kw in call.keywords:
                if isinstance(t, ast.Name) and isinstance(kw.value, ast.Name) and kw.value.id == t.id and kw.arg:
                    carry[kw.arg] = j
    return carry, arity


def _used_before_layers(cls: type, names: list[str]) -> list[str]:
    """The modules among ``names`` (children of a text model of class ``cls``) that ``cls.forward`` uses anywhere but
    after its loop over ``self.layers`` (all of them when the loop is not found): the others form the model's head,
    which the layer stream runs by calling that forward with the layers replaced (``stream.LayerStream.head``)."""
    import ast
    import textwrap

    loop = _layers_loop(cls)
    if loop is None:
        return list(names)
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    end = loop.end_lineno or 0
    used = [
        (a.attr, a.lineno)
        for a in ast.walk(tree)
        if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "self" and a.attr in names
    ]
    return sorted({n for n, line in used if line <= end} | {n for n in names if n not in {u for u, _ in used}})


# per-layer config overrides of the attention only (Gemma-4's full-attention layers: global head_dim and key-value
# heads): the layer stream builds every layer with transformers' own code, the experts' shapes are checked per layer
# per-layer config overrides that only size a layer's attention (built by transformers from the config, run by the
# layer stream as the family's own modules): Gemma-4's full-attention head_dim / key-value heads, Dots3-Note's
# sliding layers' multi-head latent attention (heads, LoRA ranks, head widths)
_ATTENTION_OVERRIDES = {
    "head_dim", "num_key_value_heads", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim",
}  # fmt: skip


def _layer_parts(block: torch.nn.Module) -> tuple[str, ...]:
    """The decoder-layer modules a ``DecoderLayerMoe`` block holds (saved at ``layers.N.<part>``), else ()."""
    from .interface import _LAYER_PARTS, DecoderLayerMoe

    return _LAYER_PARTS if isinstance(block, DecoderLayerMoe) else ()


# DeepSeek-V4's hash router: a frozen [vocab, top-k] table of expert ids looked up by input id
_HASH_TABLE = "tid2eid"


def _hash_routed(layers: torch.nn.ModuleList, moe: list[int], block_name: str) -> list[int]:
    """The MoE layers whose block routes by a fixed token -> expert table (a module holding ``tid2eid``): their
    experts are chosen by input id, so the layer stream passes them the input ids and removing an expert would
    change which experts tokens reach."""
    return [
        l for l in moe
        if any(n.rsplit(".", 1)[-1] == _HASH_TABLE for n, _ in layers[l].get_submodule(block_name).named_buffers())
    ]  # fmt: skip


def _experts_modules(layer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in layer.named_modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]


def derive(cfg: Any) -> dict[str, Any]:
    """The ``Family`` fields for this config (see ``families.derived_family``), or a ``Refusal`` with the reason."""
    from transformers.integrations.moe import _default_apply_gate
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .experts import own_gate

    mt = cfg.model_type
    nest: tuple[str, str] | None = None
    wrapper: torch.nn.Module | None = None
    entry = cfg.to_json_string(use_diff=False)
    _TEXT_BODY[0] = _TEXT_HEAD[0] = None
    if nests_text(cfg):  # a multimodal wrapper: its language model is the view
        wrapper, model, body, head = _wrapper(cfg)
        nest, cfg = (body, head), model.config
    elif mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise Refusal("transformers has no causal-LM class for it (a multimodal or non-generative model)")
    else:
        model = meta_model(cfg)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise Refusal("its decoder layers are not at model.layers")
    embed_name, norm_name = _stream_ends(model, cfg.hidden_size)
    found = {l: _experts_modules(layer) for l, layer in enumerate(layers)}
    moe = sorted(l for l, f in found.items() if f)
    if not moe:
        raise Refusal("no decoder layer holds a routed experts module")
    paths = {tuple(n for n, _ in found[l]) for l in moe}
    if len(paths) > 1 or len(next(iter(paths))) != 1:
        raise Refusal(f"its layers hold experts modules at {sorted(paths)} (not one block.experts per layer)")
    path = next(iter(paths))[0]
    if path.count(".") != 1:
        raise Refusal(f"its experts module sits at {path}, not directly under the MoE block")
    block_name, experts_name = path.split(".")
    hashed = _hash_routed(layers, moe, path.split(".")[0])
    if len(hashed) == len(moe):
        raise Refusal("every MoE layer routes by a fixed token -> expert table (hash routing): no learned router")
    l0 = next(l for l in moe if l not in hashed)  # a learned router's layer: the view's reference
    ex = found[l0][0][1]
    flags = {
        "is_transposed": bool(ex.is_transposed),
        "has_bias": bool(ex.has_bias),
        "has_gate": bool(ex.has_gate),
        "is_concatenated": bool(getattr(ex, "is_concatenated", True)),
        "has_post_expert_norm": bool(getattr(ex, "has_post_expert_norm", False)),
    }
    gateless = not flags["has_gate"]
    if gateless:  # Nemotron-H: h = act(x up^T) (experts.Ungated); its latent MoE variant is refused
        latent = getattr(cfg, "moe_latent_size", None)
        if latent is not None:
            raise Refusal(
                f"its experts run in a latent space (moe_latent_size={latent}: fc1_latent_proj / fc2_latent_proj "
                "around the experts), which the expert view (experts over the hidden size) does not model"
            )
        if flags["is_transposed"] or flags["has_bias"] or flags["has_post_expert_norm"] or not hasattr(ex, "act_fn"):
            raise Refusal(f"its gateless experts are transposed, biased, post-normed or have no act_fn ({flags})")
    post_norm = flags["has_post_expert_norm"]  # MuseSpark: f = norm(h down^T) (experts.PostNorm)
    if post_norm and (gateless or flags["is_transposed"] or flags["has_bias"] or not flags["is_concatenated"]):
        raise Refusal(f"its experts apply a norm after each expert in a layout not modelled with it ({flags})")
    if post_norm and not isinstance(getattr(ex, "post_expert_norm", None), torch.nn.Module):
        raise Refusal("its experts declare has_post_expert_norm=True but hold no post_expert_norm module")
    gate = "ungated" if gateless else None
    if gateless:
        from .experts import Ungated

        try:
            Ungated(ex.act_fn, mt)
        except ValueError as err:
            raise Refusal(str(err)) from None
    elif getattr(type(ex), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        gate = "clamped_swiglu"  # gpt-oss's, with the experts' alpha and limit
        if _norm_source(type(ex)._apply_gate) != _clamped_swiglu_source():
            try:  # its own gate, used as it is where channel-wise (core.experts.own_gate: Beam, MiniMax-M3, GLM-5)
                own_gate(ex)
            except ValueError as err:
                raise Refusal(str(err)) from None
            gate = "apply_gate"
    elif not hasattr(ex, "act_fn"):
        raise Refusal(f"{type(ex).__name__} has no act_fn")
    if gate == "clamped_swiglu" and not all(isinstance(getattr(ex, a, None), (int, float)) for a in ("alpha", "limit")):
        raise Refusal(f"{type(ex).__name__} has no numeric alpha and limit for its clamped SwiGLU")
    params = {n: tuple(p.shape) for n, p in ex.named_parameters()}
    want = {"gate_up_proj", "down_proj"} | ({"gate_up_proj_bias", "down_proj_bias"} if flags["has_bias"] else set())
    if gateless:
        want = {"up_proj", "down_proj"}
    if post_norm:  # the norm's own weight [H] (one per layer, not per expert): kept as it is
        want |= {f"post_expert_norm.{n}" for n, _ in ex.post_expert_norm.named_parameters()}
    if set(params) != want or list(ex.buffers()):
        raise Refusal(f"its experts hold {sorted(params)}, not exactly {sorted(want)}")
    if gateless:
        E, I, H = params["up_proj"]
        I2, down_shape = 2 * I, (E, H, I)
        if params["down_proj"] != down_shape or H != cfg.hidden_size:
            raise Refusal(f"its gateless experts have shapes {params}, not up [E, I, H] and down [E, H, I]")
    elif flags["is_transposed"]:
        E, H, I2 = params["gate_up_proj"]
        down_shape = (E, I2 // 2, H)
    else:
        E, I2, H = params["gate_up_proj"]
        down_shape = (E, H, I2 // 2)
    if post_norm and any(v != (H,) for k, v in params.items() if k.startswith("post_expert_norm.")):
        raise Refusal(f"its post-expert norm holds {params}, not one weight [H]")
    # MuseSpark's experts run over moe_hidden_size (the block projects into and out of it): the router reads hidden
    width_ok = H == cfg.hidden_size or (post_norm and getattr(cfg, "moe_hidden_size", None) == H)
    if not gateless and (I2 % 2 or params["down_proj"] != down_shape or not width_ok):
        raise Refusal(f"its experts have shapes {params}, not gate_up [E, 2I, H] and down [E, H, I] (or transposed)")
    if flags["has_bias"] and (params["gate_up_proj_bias"] != (E, I2) or params["down_proj_bias"] != (E, H)):
        raise Refusal(f"its expert biases have shapes {params}, not [E, 2I] and [E, H]")
    for l in moe:
        got = {n: tuple(p.shape) for n, p in found[l][0][1].named_parameters()}
        if got != params:
            raise Refusal(f"its layers differ in expert shapes (layer {l0}: {params}, layer {l}: {got})")

    block = layers[l0].get_submodule(block_name)
    hidden = cfg.hidden_size  # the router reads the block input: [E, hidden] (MuseSpark's experts: moe_hidden_size)
    routers = [
        n
        for n, c in block.named_children()
        if n != experts_name and getattr(c, "weight", None) is not None and tuple(c.weight.shape) == (E, hidden)
    ]
    if not routers:  # Hunyuan: the gate module holds the router as a Linear child (gate.wg), and nothing else
        routers = [
            f"{n}.{g}"
            for n, c in block.named_children()
            if n != experts_name and "shared" not in n
            for g, w in c.named_children()
            if getattr(w, "weight", None) is not None and tuple(w.weight.shape) == (E, hidden)
            and {k for k, _ in [*c.named_parameters(), *c.named_buffers()]} <= {f"{g}.weight", f"{g}.bias"}
        ]  # fmt: skip
    expert_scale = None
    if not routers and _norm_source_of(type(getattr(block, "router", None))) == _gemma4_router_source():
        # Gemma-4: proj [E, H] scores the normed, scaled residual (router.scale [H], no per-expert state, is kept as
        # it is); per_expert_scale [E] multiplies the renormalized top-k weights: sliced with the router rows
        routers, expert_scale = ["router.proj"], "router.per_expert_scale"
    if len(routers) != 1:
        kinds = ", ".join(f"{n}: {type(c).__name__}" for n, c in block.named_children() if n != experts_name)
        raise Refusal(f"its MoE block has no single router with weight [E, hidden] ({kinds})")
    router_name = routers[0]
    router = block.get_submodule(router_name)
    owner = block.get_submodule(router_name.split(".")[0])
    if "hash" in type(router).__name__.lower() or "hash" in type(owner).__name__.lower():
        raise Refusal(f"it routes by hash ({type(router).__name__}): removing experts changes the hash table")
    for l in hashed:  # DeepSeek-V4's first layers: the same router weight [E, H], expert ids from tid2eid[input_ids]
        r = layers[l].get_submodule(block_name).get_submodule(router_name)
        held = {n: tuple(t.shape) for n, t in [*r.named_parameters(), *r.named_buffers()]}
        if held.get("weight") != (E, hidden) or set(held) != {"weight", _HASH_TABLE}:
            raise Refusal(
                f"its hash-routed layer {l} holds router tensors {sorted(held)}, not weight and {_HASH_TABLE}"
            )
    tensors = dict(router.named_parameters()) | dict(router.named_buffers())
    corr_module, corr_row = _correction(block, router_name, router, tensors, E)
    extra = sorted(set(tensors) - {"weight", "bias", "e_score_correction_bias", corr_module[len(router_name) + 1 :]})
    if extra:
        raise Refusal(f"its router {type(router).__name__} holds tensors {extra} besides weight/bias/correction bias")
    for n in ("bias", "e_score_correction_bias"):
        if n in tensors and tuple(tensors[n].shape) != (E,):
            raise Refusal(f"its router {n} has shape {list(tensors[n].shape)}, not [E]")
    shared = [n for n, c in block.named_children() if "shared" in n and not n.endswith("gate") and list(c.parameters())]
    skip = (f"{experts_name}.", f"{router_name}.", *(f"{n}." for n in shared))
    for n, t in [*block.named_parameters(), *block.named_buffers()]:
        if not n.startswith(skip) and n not in (corr_module, expert_scale) and t.dim() >= 1 and t.shape[0] == E:
            raise Refusal(
                f"its MoE block holds a per-expert tensor outside the router ({block_name}.{n} "
                f"{list(t.shape)}): removing experts would leave it stale"
            )
    shared_gate = [n for n, c in block.named_children() if "shared" in n and n.endswith("gate")]

    raw = cfg.to_dict()
    count_keys = tuple(
        k
        for k, v in raw.items()
        if isinstance(k, str)
        and "expert" in k.lower()
        and type(v) is int
        and v == E
        and not any(s in k.lower() for s in COUNT_EXCLUDE)
    )
    if not count_keys:
        raise Refusal(f"no config.json key holds its routed expert count {E} (a key naming experts)")
    nested = [f"{k}.{kk}" for k, v in raw.items() if isinstance(v, dict) for kk in v if "expert" in str(kk).lower()]
    if nested:
        raise Refusal(f"its config keeps expert settings in sub-configs ({nested[0]})")
    top_k_key = next(
        (
            k
            for k in ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
            if type(raw.get(k)) is int
        ),
        None,
    )
    if top_k_key is None:
        raise Refusal("its config has no integer num_experts_per_tok (the router's top-k)")

    _ROOT_BODY[0], _BLOCK_PARTS[0] = "model", ()
    disk_block, expert_names, renames, (disk_router, disk_correction), fused_names, view = _disk_layout(
        wrapper or model,
        l0,
        block_name,
        experts_name,
        router_name,
        E,
        nest[0] if nest else "model",
        corr_module,
        gateless,
    )
    if gateless and fused_names is not None:
        raise Refusal("its gateless experts are saved fused on disk: not mapped")
    if view and nest:  # renames outside the layers (Mistral-Large-4's tok_embeddings, lerope.alpha) map; nothing else
        odd = [r for r in view if r[0] or len(r[2]) != 1 or r[2][0][1] != -1 or not r[1].startswith(f"{nest[0]}.")]
        if odd:
            raise Refusal(f"transformers converts its tensor {odd[0][2][0][0]} on disk inside a multimodal wrapper")
        view = tuple(("", f"model.{src[len(nest[0]) + 1 :]}", parts) for _, src, parts in view)  # the view's names
    if nest:
        _NEST_DISK[entry], _NEST_HEAD[entry] = _TEXT_BODY[0], _TEXT_HEAD[0] or ""
    if (flags["is_transposed"] or flags["has_bias"] or not flags["is_concatenated"]) and fused_names is None:
        raise Refusal("its experts are transposed, interleaved or biased in memory but saved per expert: not mapped")
    scaled = bool(getattr(block, "scaled_input", False))
    if scaled:  # Llama-4: transformers' own experts module holds (and saves, unconverted) [E, H, 2I] / [E, I, H]
        if fused_names is None or fused_names[2]:
            raise Refusal("its experts scale their inputs by the router (Llama-4) but are saved in another layout")
        fused_names = (fused_names[0], fused_names[1], "transposed")
        if raw.get(top_k_key) != 1:
            raise Refusal(
                f"its router scales each expert's input (Llama-4) and routes top-{raw.get(top_k_key)}: moecompress "
                "reads these blocks with top-1 routing only (every released Llama-4 model routes top-1), where each "
                "token's one scaled copy is the one row the profile counts for it"
            )

    overrides = sorted({k for v in (cfg.to_dict().get("per_layer_config") or {}).values() for k in v})
    if set(overrides) - _ATTENTION_OVERRIDES:  # (an expert count or width per layer: every operation assumes one)
        raise Refusal(
            f"its config overrides {sorted(set(overrides) - _ATTENTION_OVERRIDES)} per layer (per_layer_config), "
            "which moecompress does not handle (it accepts per-layer attention sizes only)"
        )  # Gemma-4: the full-attention layers' head_dim / key-value heads (built by transformers, checked in tests)
    if len(_VIEWS) > 64:
        _VIEWS.clear()
    _VIEWS[cfg.to_json_string(use_diff=False)] = view
    if nest:  # (also under the wrapper's config, which Checkpoint holds when it asks)
        _VIEWS[entry] = view
    reference = None
    sig = (_norm_source(type(block)), _norm_source(type(router)))
    groups_contiguous = any(_CONTIGUOUS_GROUPS.search(_source(c)) for c in (type(block), type(router)))
    for name, ref in _reference_routing().items():
        if ref == sig:
            reference = name
    if reference is None and gateless and sig == _nemotron_h_routing():
        reference = "deepseek_v3"  # its router is DeepSeek-V3's; its block adds identity latent projections (above)
    return {
        "model_type": mt,
        "count_keys": count_keys,
        "top_k_key": top_k_key,
        "disk_block": disk_block,
        "module_block": block_name,
        "router": router_name,
        "experts": experts_name,
        "expert_names": expert_names,
        "renames": renames,
        "disk_router": disk_router,
        "disk_correction": disk_correction,
        "router_bias": "bias" in tensors,
        "correction_bias": "e_score_correction_bias" if corr_module else None,
        # block-relative module path when it is not the router's own e_score_correction_bias (MiniMax-M2, ERNIE-4.5)
        "correction_module": corr_module if corr_module not in ("", f"{router_name}.{_CORR}") else None,
        "correction_row": corr_row,
        "shared": shared[0] if shared else None,
        "shared_gate": shared_gate[0] if shared_gate else None,
        "norm_topk_key": "norm_topk_prob" if "norm_topk_prob" in raw else None,
        "group_key": next((k for k in ("n_group", "num_expert_group") if raw.get(k) is not None), None),
        "groups_contiguous": groups_contiguous,
        "dense": frozenset(range(len(layers))) - frozenset(moe),
        "routing_like": reference,
        # derive's meta-device MoE block, its layer and the config it was built from (a wrapper's text config):
        # what routing_check runs when the source comparison above finds no reference (families.derived_family)
        "routing_block": block if reference is None else None,
        "routing_layer": l0,
        "routing_config": cfg,
        "flags": flags,
        "embed": embed_name,
        "final_norm": norm_name,
        "gate": gate,
        "post_norm": post_norm,
        "disk_body": _ROOT_BODY[0],
        "fused_names": fused_names,
        "classes": (type(block).__name__, type(router).__name__, type(ex).__name__),
        "nest": nest,
        "scaled_input": scaled,
        "expert_scale": expert_scale,
        "layer_parts": _layer_parts(block) or _BLOCK_PARTS[0],
        "hash_layers": tuple(hashed),
        "text_config": cfg if nest else None,
        "view": view,
    }


def _correction(
    block: torch.nn.Module, router_name: str, router: torch.nn.Module, tensors: dict[str, Any], E: int
) -> tuple[str, bool]:
    """(block-relative module path of the MoE block's routing correction bias, held as [1, E]), or ("", False).

    DeepSeek-V3's router holds ``e_score_correction_bias`` [E]; ERNIE-4.5's holds it in ``moe_statics`` as [1, E]
    (added to the softmax scores for the top-k choice); MiniMax-M2 / HY-V3's block holds it and passes it to its
    router (``self.gate(hidden_states, self.e_score_correction_bias)``). Any of these is carried with the router rows
    (sliced on expert removal); that removal equals masking those experts out of routing is checked per model type
    (tests/families)."""
    found = [n for n in tensors if n.rsplit(".", 1)[-1] == "e_score_correction_bias"]
    own = [n for n, _ in [*block.named_parameters(recurse=False), *block.named_buffers(recurse=False)]]
    held = [n for n in own if n in ("e_score_correction_bias", "expert_bias")]  # AFMoE: expert_bias
    if held:
        owner = router_name.split(".")[0]  # the module the block calls (AFMoE's router, whose gate is the Linear)
        src = _source(type(block))
        # passed as self.<bias>, or through a local alias (LFM2-MoE: expert_bias = self.expert_bias if ... else None)
        names = [rf"self\.{held[0]}", *re.findall(rf"^\s*(\w+)\s*=\s*self\.{held[0]}\b", src, flags=re.M)]
        call = rf"self\.{re.escape(owner)}\([^)]*\b(?:{'|'.join(names)})\b"
        if found or len(held) > 1 or not re.search(call, src):
            raise Refusal(
                f"its MoE block holds {held[0]} and does not pass it to its router {owner} "
                "(the one use moecompress carries it for)"
            )
        t, path = getattr(block, held[0]), held[0]
    elif len(found) == 1:
        t, path = tensors[found[0]], f"{router_name}.{found[0]}"
    elif found:
        raise Refusal(f"its router holds several correction biases ({found})")
    else:
        return "", False
    if tuple(t.shape) not in ((E,), (1, E)):
        raise Refusal(f"its correction bias {path} has shape {list(t.shape)}, not [E] or [1, E]")
    return path, t.dim() == 2


def _disk_layout(
    model: torch.nn.Module,
    l: int,
    block: str,
    experts: str,
    router: str,
    E: int,
    body: str = "model",
    correction: str = "",
    gateless: bool = False,
) -> tuple[str, tuple[str, str, str], tuple[tuple[str, str], ...], tuple[str | None, str | None], Any, Any]:
    """(block name on disk, per-expert (gate, up, down) names, other per-layer renames, (router name, correction
    bias block-relative name) on disk when they differ, the block-relative disk names of the fused (gate_up, down)
    when the experts are fused on disk, else None, the ``view`` rules of the tensors transformers converts beyond a
    per-layer rename) from transformers' own save path.

    Marker tensors stand in for layer l's fused experts; after ``revert_weight_conversion`` each per-expert key is
    matched to its (expert, projection) by value, so a transposed, reordered or renamed layout is seen, not assumed."""
    from transformers.core_model_loading import revert_weight_conversion

    prefix = f"{body}.layers.{l}."  # body: the text model's path (a multimodal wrapper's model.language_model)
    lay = re.compile(rf"^{re.escape(body)}\.layers\.\d+\.")
    routed = (f"{block}.{experts}.", f"{block}.{router}.")

    def other_routed(k: str) -> bool:  # other layers' routed tensors: layer l's markers stand for them
        m = lay.match(k)
        return m is not None and m[0] != prefix and k[m.end() :].startswith(routed)

    sd = {k: v for k, v in model.state_dict().items() if not other_routed(k)}  # every layer type's own tensors
    gu_key, dn_key = f"{prefix}{block}.{experts}.gate_up_proj", f"{prefix}{block}.{experts}.down_proj"
    gate_up = torch.arange(E * 4 * 3, dtype=torch.float64).reshape(E, 4, 3)
    down = torch.arange(E * 3 * 2, dtype=torch.float64).reshape(E, 3, 2) + 1e7
    if gateless:  # up [E, 2, 3] (the view's up rows: gate_up[:, 2:]), no gate
        gu_key = f"{prefix}{block}.{experts}.up_proj"
        gate_up = torch.cat([torch.full((E, 2, 3), -1.0, dtype=torch.float64), gate_up[:, 2:]], dim=1)
        down = down[:, :, :2]
    sd[gu_key], sd[dn_key] = gate_up[:, 2:] if gateless else gate_up, down
    try:
        out = revert_weight_conversion(model, sd)
    except Exception as err:
        raise Refusal(f"transformers' save conversion fails on it ({type(err).__name__}: {str(err)[:120]})") from None
    out = _root_body_on_disk(out, sd, body)
    out = _text_body_on_disk(out, sd, body, l)
    out = _block_parts_on_disk(out, model.get_submodule(f"{prefix}{block}"), body, block, experts)
    marked = {k: v for k, v in out.items() if v.device.type != "meta" and v.dtype == torch.float64}
    fused = [k for k, v in marked.items() if v.shape[0] == E and v.dim() == 3]
    if fused:
        return _fused_layout(out, sd, marked, prefix, block, router, gu_key, dn_key, gate_up, down, body)
    pat = re.compile(
        rf"^{re.escape(prefix)}(?P<block>[\w.]+?)\.{re.escape(experts)}\.(?P<e>\d+)\.(?P<name>\w+)\.weight$"
    )
    names: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    blocks: set[str] = set()
    seen = 0
    for k, v in marked.items():
        m = pat.match(k)
        if m is None:
            raise Refusal(f"transformers saves its experts as {k}, not <block>.{experts}.<e>.<proj>.weight")
        e = int(m["e"])
        want = {0: gate_up[e, :2], 1: gate_up[e, 2:], 2: down[e]} if e < E else {}
        if gateless:
            want.pop(0, None)
        proj = next((p for p, t in want.items() if v.shape == t.shape and torch.equal(v, t)), None)
        if proj is None:
            raise Refusal(f"transformers saves {k} with values that are not one expert's gate/up/down rows")
        names[proj].add(m["name"])
        blocks.add(m["block"])
        seen += 1
    if gateless:  # the view's gate is read from (a copy of) the up key and never written
        names[0] = set(names[1])
        seen += E
    if seen != 3 * E or any(len(n) != 1 for n in names.values()) or len(blocks) != 1:
        raise Refusal(f"transformers saves its experts in a layout moecompress does not map ({sorted(marked)[:3]})")
    disk_block = blocks.pop()
    by_id = {id(v): k for k, v in sd.items()}
    renames: dict[str, str] = {}  # layer-relative disk name -> module name (beyond the block rename)
    unmatched: list[str] = []  # disk keys transformers converts (no module tensor saved as it is)
    view: list[ViewRule] = []
    rw = sd[f"{prefix}{block}.{router}.weight"]
    rdisk = next((k for k, v in out.items() if v is rw), f"{prefix}{disk_block}.{router}.weight")
    m = re.match(rf"^{re.escape(prefix)}{re.escape(disk_block)}\.([\w.]+?)\.weight$", rdisk)
    if m is None:
        raise Refusal(f"transformers saves its router as {rdisk}: not <block>.<router>.weight")
    disk_router = m[1]
    disk_correction = None
    own_corr = bool(correction) and correction != f"{router}.{_CORR}"  # not DeepSeek's router buffer (below)
    for k, v in out.items():
        if k in marked:
            continue
        csrc = by_id.get(id(v)) if own_corr else None
        if csrc is not None and (cm := lay.match(csrc)) and csrc[cm.end() :] == f"{block}.{correction}":
            # a correction bias outside the router's own e_score_correction_bias (MiniMax-M2's block buffer, saved
            # as block_sparse_moe.e_score_correction_bias; HY-V3's as mlp.expert_bias; ERNIE-4.5's gate.moe_statics,
            # saved as mlp.moe_statics.*), in every MoE layer
            if not k.startswith(f"{cm[0]}{disk_block}."):
                raise Refusal(f"transformers saves its correction bias {csrc} outside the MoE block ({k})")
            rel = k[len(f"{cm[0]}{disk_block}.") :]
            if disk_correction not in (None, rel):
                raise Refusal(f"transformers saves its correction bias under two names ({disk_correction}, {rel})")
            disk_correction = rel
            continue
        if disk_router != router and k.startswith(f"{prefix}{disk_block}.{disk_router}."):
            tail = k[len(f"{prefix}{disk_block}.{disk_router}.") :]
            if f"{prefix}{block}.{router}.{tail}" in sd:
                continue
        src = k if disk_block == block else re.sub(rf"\.{re.escape(disk_block)}\.", f".{block}.", k, count=1)
        if src in sd:
            continue
        src = by_id.get(id(v))
        kp, sp = lay.match(k), lay.match(src or "")
        if src is None and body != "model" and not k.startswith(f"{body}."):
            continue  # a multimodal wrapper's other tensors (Dots3-Note's vision experts): copied as they are
        if src is None:
            unmatched.append(k)
            continue
        if kp is None and sp is None and body != "model" and not src.startswith(f"{body}."):
            continue  # a multimodal wrapper's other tensors (its vision tower): copied as they are, never read
        if kp is None and sp is None:  # a rename outside the layers (Bailing-hybrid: word_embeddings)
            view.append(("", src, ((k, -1),)))
            continue
        if kp is None or sp is None or kp[0] != sp[0]:
            raise Refusal(f"transformers moves its tensor {src} to another layer on disk ({k})")
        lp = kp[0]
        if src == f"{lp}{block}.{router}.e_score_correction_bias" and k.startswith(f"{lp}{disk_block}."):
            disk_correction = k[len(f"{lp}{disk_block}.") :]  # (Laguna's: inside the experts, experts.<name>)
            continue
        if src == f"{lp}{block}.{router}.e_score_correction_bias":  # outside the block (Kolibri-1's moe.router.*):
            view.append(("layers", src[len(lp) :], ((k[len(lp) :], -1),)))  # the checkpoint's view renames it
            continue
        if src[len(lp) :].startswith(routed):
            raise Refusal(f"transformers moves a routed tensor on disk ({src} -> {k}): not mapped yet")
        # a relocation (Kimi-Linear's forget_gate.f_a_proj) or a renamed module or parameter (A.X-K2's W_down, Flint's
        # softmax_offset): outputs keep the disk name (transformers renames it on load, a quantized module's
        # weight_packed too), quantization_config targets name both (Checkpoint.output_config)
        renames[k[len(lp) :]] = src[len(lp) :]
    if unmatched:
        view += _converted(model, sd, out, unmatched, lay, body)
    layout = (names[0].pop(), names[1].pop(), names[2].pop())
    routers = None if disk_router == router else disk_router, disk_correction
    return disk_block, layout, tuple(sorted(renames.items())), routers, None, tuple(view)


_ROOT_BODY: list[str] = ["model"]  # the disk root ``_root_body_on_disk`` found in the last derive


def _root_body_on_disk(out: dict[str, Any], sd: dict[str, Any], body: str) -> dict[str, Any]:
    """``out`` (transformers' save conversion) with the model body named as in the module (model.*) where the save
    conversion renames that root (Nemotron-H: ``WeightRenaming("backbone.", "model.")`` saves backbone.*): every
    key under that one root is renamed back; the disk root is recorded (``_ROOT_BODY``, the family's disk_body)."""
    if body != "model" or any(k.startswith("model.") for k in out):
        return out
    roots = {m[1] for k in out if (m := re.match(r"^(\w+)\.layers\.\d+\.", k))}
    if len(roots) != 1:
        return out
    root = roots.pop()
    renamed = {f"model.{k[len(root) + 1 :]}" if k.startswith(f"{root}.") else k: v for k, v in out.items()}
    if any(k.startswith("model.") and k not in sd and ".layers." not in k for k in renamed):
        raise Refusal(f"transformers saves its body as {root}.* with tensors the module does not hold")
    _ROOT_BODY[0] = root
    return renamed


_NEST_DISK: dict[str, str | None] = {}  # a multimodal wrapper's config -> where its checkpoint keeps the text model


def _text_body_on_disk(out: dict[str, Any], sd: dict[str, Any], body: str, l: int) -> dict[str, Any]:
    """``out`` (transformers' save conversion) with a multimodal wrapper's text model named as in the module
    (``body``) where the checkpoint keeps it elsewhere (DeepSeek-OCR-2: model.layers.*, model.embed_tokens, model.norm
    on disk; model.language_model.* in the module); the disk body is recorded (``nest_disk_body``)."""
    marked = [k for k, v in out.items() if v.device.type != "meta" and v.dtype == torch.float64]  # layer l's experts
    found = {m[1] or "" for k in marked if (m := re.match(rf"^(?:(.+)\.)?layers\.{l}\.", k))}
    if body == "model" or len(marked) < 2 or len(found) != 1 or (dbody := found.pop()) == body:
        return out  # ("" is the checkpoint's root: Mistral-Large-4's layers.*, norm.*)
    dpre = f"{dbody}." if dbody else ""
    by_id = {id(v): k for k, v in sd.items()}
    renamed = {}
    for k, v in out.items():
        m = f"{body}.{k[len(dpre) :]}" if k.startswith(dpre) else None
        text = m is not None and (k.startswith(f"{dpre}layers.") or sd.get(m) is v)
        src = by_id.get(id(v))
        if not text and src is not None and src != k and src.rsplit(".", 2)[-2] == "lm_head":
            # the wrapper's head saved elsewhere too (Aria: language_model.lm_head.weight; module: lm_head.weight)
            _TEXT_HEAD[0], m, text = k.rsplit(".", 1)[0], src, True
        renamed[m if text else k] = v
    _TEXT_BODY[0] = dbody
    return renamed


_TEXT_BODY: list[str | None] = [None]  # the disk body ``_text_body_on_disk`` found in the last derive
_TEXT_HEAD: list[str | None] = [None]  # and the disk name of the wrapper's lm_head when not the module's
_NEST_HEAD: dict[str, str] = {}  # a multimodal wrapper's config -> where its checkpoint keeps the lm_head


# the MoE block's modules ``_block_parts_on_disk`` found saved in the decoder layer in the last derive
_BLOCK_PARTS: list[tuple[str, ...]] = [()]


def _block_parts_on_disk(
    out: dict[str, Any], block_module: torch.nn.Module, body: str, block: str, experts: str
) -> dict[str, Any]:
    """``out`` (transformers' save conversion) with the MoE block's modules named as in the module where the checkpoint
    saves them in the decoder layer itself (Mistral-Large-4: ``layers.N.experts.E.w1``, ``layers.N.gate``,
    ``layers.N.shared_experts.*`` for the module's ``layers.N.mlp.*``): every layer-level key of a block child gets the
    block back; the children are recorded (``_BLOCK_PARTS``, the family's ``layer_parts``: the checkpoint maps them
    both ways as Gemma-4's)."""
    lay = re.compile(rf"^{re.escape(body)}\.layers\.\d+\.")
    marked = [k for k, v in out.items() if v.device.type != "meta" and v.dtype == torch.float64]
    at_layer = [m is not None and k[m.end() :].startswith(f"{experts}.") for k in marked for m in [lay.match(k)]]
    if not marked or not all(at_layer):
        return out
    parts = tuple(n for n, _ in block_module.named_children())
    renamed: dict[str, Any] = {}
    for k, v in out.items():
        m = lay.match(k)
        if m is not None and k[m.end() :].split(".", 1)[0] in parts:
            k = f"{m[0]}{block}.{k[m.end() :]}"
            if k in out:
                raise Refusal(f"transformers saves its MoE block's {k[m.end() :]} both in the layer and in {block}")
        renamed[k] = v
    _BLOCK_PARTS[0] = parts
    return renamed


def nest_disk_head(cfg: Any) -> str | None:
    """Where a multimodal wrapper's checkpoint keeps its lm_head when not where the module does (Aria's
    language_model.lm_head), None then."""
    nest_disk_body(cfg)
    return _NEST_HEAD.get(cfg.to_json_string(use_diff=False)) or None


def nest_disk_body(cfg: Any) -> str | None:
    """Where a multimodal wrapper's checkpoint keeps its text model when not where the module does (None then; ""
    for the checkpoint's root: Mistral-Large-4's layers.*)."""
    memo = cfg.to_json_string(use_diff=False)
    if memo not in _NEST_DISK:
        try:
            derive(cfg)
        except Refusal:
            return None
    return _NEST_DISK.get(memo)


# A tensor the checkpoint's view names as transformers' module does, made of disk tensors: (layer-relative scope
# "layers" or "" for a tensor outside the decoder layers, the module-side name (layer-relative for "layers"),
# ((disk name, dim), ...)): the module tensor is the disk tensors concatenated along dim, in order (dim -1: one
# disk tensor, renamed). Kimi-Linear and Bailing-hybrid: self_attn.conv1d.weight = cat(q_conv1d, k_conv1d, v_conv1d)
ViewRule = tuple[str, str, tuple[tuple[str, int], ...]]
_VIEWS: dict[str, tuple[ViewRule, ...]] = {}


def view_rules(cfg: Any) -> tuple[ViewRule, ...]:
    """The ``view`` rules ``derive`` found for this config (none for a config it refuses)."""
    memo = cfg.to_json_string(use_diff=False)
    if memo not in _VIEWS:
        try:
            derive(cfg)
        except Refusal:
            _VIEWS[memo] = ()
    return _VIEWS.get(memo, ())


MAX_MARKER_ELEMENTS = 1 << 25  # bound on the converted tensors' elements markers are made for (256 MiB float64)


def _converted(
    model: torch.nn.Module,
    sd: dict[str, Any],
    out: dict[str, Any],
    unmatched: list[str],
    lay: re.Pattern[str],
    body: str = "model",
) -> list[ViewRule]:
    """The view rules of disk tensors transformers' save conversion makes from module tensors other than by renaming
    them (``unmatched``). One layer's (and every global) consumed module tensor gets marker values (unique numbers);
    transformers' own ``revert_weight_conversion`` splits them; each disk tensor is then found as a slice of one
    module tensor along one dimension by value, and the slices must tile it in order. Anything else is refused."""
    from transformers.core_model_loading import revert_weight_conversion

    kept = {id(v) for v in out.values()}
    consumed = [
        k
        for k, v in sd.items()
        if k not in out and id(v) not in kept and v.device.type == "meta" and (body == "model" or k.startswith(body))
    ]  # (a multimodal wrapper: its text model's only)
    reps: dict[str, str] = {}  # layer-relative (or global) name -> one representative module key
    for k in consumed:
        m = lay.match(k)
        reps.setdefault(f"layers:{k[m.end() :]}" if m else k, k)
    markers: dict[str, torch.Tensor] = {}
    start = 0
    for k in reps.values():
        n = sd[k].numel()
        if start + n > MAX_MARKER_ELEMENTS:
            raise Refusal(f"transformers converts its tensor {k} on disk and it is too large to map by markers")
        markers[k] = (torch.arange(n, dtype=torch.float64) + start).reshape(sd[k].shape)
        start += n
    try:
        split = revert_weight_conversion(model, dict(markers))
    except Exception as err:
        raise Refusal(f"transformers' save conversion fails on its converted tensors ({type(err).__name__})") from None
    owners = sorted((float(t.reshape(-1)[0]), k) for k, t in markers.items())
    pieces: dict[str, list[tuple[int, int, str]]] = {}  # module key -> [(dim, start, disk key)]
    for dk, p in split.items():
        if p.device.type == "meta" or p.dtype != torch.float64 or p.numel() == 0:
            continue
        first = float(p.reshape(-1)[0])
        mk = max((o for o in owners if o[0] <= first), default=(0.0, ""))[1]
        m = markers.get(mk)
        if m is None or p.dim() != m.dim():
            raise Refusal(f"transformers converts {dk} on disk in a way moecompress does not map (not a slice)")
        at = torch.unravel_index(torch.tensor(int(first - float(m.reshape(-1)[0]))), m.shape)
        dims = [d for d in range(m.dim()) if p.shape[d] != m.shape[d]] or [0]
        d = dims[0]
        s0 = int(at[d])
        if len(dims) != 1 or any(int(a) for i, a in enumerate(at) if i != d):
            raise Refusal(f"transformers converts {dk} on disk in a way moecompress does not map (not one slice)")
        if not torch.equal(m.narrow(d, s0, p.shape[d]), p):
            raise Refusal(f"transformers converts {dk} on disk in a way moecompress does not map (values reordered)")
        pieces.setdefault(mk, []).append((d, s0, dk))
    rules: list[ViewRule] = []
    for mk, ps in pieces.items():
        ps.sort()
        m = markers[mk]
        d = ps[0][0]
        ends = [s + split[dk].shape[d] for _, s, dk in ps]
        if {p[0] for p in ps} != {d} or [s for _, s, _ in ps] != [0, *ends[:-1]] or ends[-1] != m.shape[d]:
            raise Refusal(f"transformers converts {mk} on disk into pieces that do not tile it: not mapped")
        km = lay.match(mk)
        if km is None:
            rules.append(("", mk, tuple((dk, d) for _, _, dk in ps)))
            continue
        if any(not dk.startswith(km[0]) for _, _, dk in ps):
            raise Refusal(f"transformers converts {mk} on disk into tensors of another layer: not mapped")
        rules.append(("layers", mk[km.end() :], tuple((dk[km.end() :], d) for _, _, dk in ps)))
    done = {dk for _, _, ps in rules for dk, _ in ps}
    left = [
        k
        for k in unmatched
        if (lay.match(k) is None and k not in done) or (lay.match(k) and k[lay.match(k).end() :] not in done)
    ]
    if left:
        raise Refusal(f"transformers converts its tensor {left[0]} on disk in a way moecompress does not map")
    return rules


def _fused_layout(
    out: dict[str, Any],
    sd: dict[str, Any],
    marked: dict[str, Any],
    prefix: str,
    block: str,
    router: str,
    gu_key: str,
    dn_key: str,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    body: str = "model",
) -> tuple[str, tuple[str, str, str], tuple[tuple[str, str], ...], tuple[str | None, str | None], Any, Any]:
    """``_disk_layout`` for experts saved fused: the marker tensors come back whole (same values, maybe renamed, as
    Granite's input_linear/output_linear), the router maybe renamed (Granite's router.layer), nothing else."""
    names: dict[str, str] = {}
    inside = f"{prefix}{block}."
    flips: set[bool] = set()  # the save conversion transposes both fused tensors (Qwen3-VL-MoE: [E, H, 2I] on disk)
    for k, v in marked.items():
        which = None
        for flip in (False, True):
            for name, t in (("gate_up", gate_up), ("down", down)):
                t = t.transpose(1, 2) if flip else t
                if which is None and v.shape == t.shape and torch.equal(v, t):
                    which = name
                    flips.add(flip)
        if which is None or not k.startswith(inside) or which in names:
            raise Refusal(f"its experts are fused on disk and converted on save ({k}): moecompress cannot write it")
        names[which] = k[len(inside) :]
    if len(flips) != 1:
        raise Refusal("its save conversion transposes one fused experts tensor and not the other: not mapped")
    if set(names) != {"gate_up", "down"}:
        raise Refusal(f"its experts are fused on disk in a layout moecompress does not map ({sorted(marked)[:2]})")
    rkey = f"{inside}{router}.weight"
    rdisk = next((k for k, v in out.items() if v is sd[rkey]), rkey)
    m = re.match(rf"^{re.escape(inside)}([\w.]+)\.weight$", rdisk)
    if m is None:
        raise Refusal(f"transformers saves its router as {rdisk}: not <block>.<router>.weight")
    others, want = set(out) - set(marked) - {rdisk}, set(sd) - {gu_key, dn_key, rkey}
    renames: dict[str, str] = {}  # layer-relative disk name -> module name
    view: list[ViewRule] = []  # renames outside the layers (HY-V4's hc_head: hc_pre.hc_head.hc_head_fn on disk)
    by_id = {id(v): k for k, v in sd.items()}
    lay = re.compile(rf"^{re.escape(body)}\.layers\.\d+\.")
    for k in sorted(others - want):  # tensors saved as they are under another name (the same tensor object)
        src = by_id.get(id(out[k]))
        kp, sp = lay.match(k), lay.match(src or "")
        if src is not None and body != "model" and kp is None and sp is None and not src.startswith(f"{body}."):
            want.discard(src)  # a multimodal wrapper's other tensors (Aria's vision tower): copied as they are
            others.discard(k)
            continue
        if src is None or src not in want - others or (kp is None) != (sp is None) or (kp and sp and kp[0] != sp[0]):
            raise Refusal(f"transformers renames tensors on disk besides its fused experts ({k}, from {src})")
        routed = (f"{block}.{router}.", f"{block}.{gu_key.rsplit('.', 2)[1]}.")  # (the router's, the experts')
        if sp is not None and src[sp.end() :].startswith(routed):
            raise Refusal(f"transformers moves a routed tensor on disk ({src} -> {k}): not mapped yet")
        if kp is None:
            view.append(("", src, ((k, -1),)))
        elif renames.setdefault(k[kp.end() :], src[kp.end() :]) != src[kp.end() :]:
            raise Refusal(f"transformers renames {k[kp.end() :]} differently in different layers")
        want.discard(src)
        others.discard(k)
    if others != want:
        odd = sorted(others ^ want)[:2]
        raise Refusal(f"transformers renames tensors on disk besides its fused experts ({odd})")
    disk_router = None if m[1] == router else m[1]
    fused_names = (names["gate_up"], names["down"], "transposed" if flips.pop() else "")
    layout = ("gate_up_proj", "gate_up_proj", "down_proj")
    return block, layout, tuple(sorted(renames.items())), (disk_router, None), fused_names, tuple(view)
