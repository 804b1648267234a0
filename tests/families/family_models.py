"""Tiny real models of every MoE model type the installed transformers ships, built from their config classes."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320
E = 8  # routed experts
MOE_WIDTH = 40  # expert width, not a multiple of 16 on purpose
EXCLUDE = ("per_tok", "shared", "top", "group", "layer", "capacity")


# MoE model types whose experts module predates ``use_experts_implementation`` (Llama-4: the router's scores
# multiply the experts' inputs; moecompress reads its block as ``interface.ScaledInputMoe``), when installed
PRE_INTERFACE = ("llama4", "llama4_text")


def installed_moe_types() -> list[str]:
    """Model types whose modeling file wraps an experts class with ``use_experts_implementation``, and the
    installed ``PRE_INTERFACE`` types."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = os.path.dirname(transformers.__file__)
    out = {t for t in PRE_INTERFACE if t in CONFIG_MAPPING_NAMES}
    for p in glob.glob(os.path.join(root, "models", "*", "modeling_*.py")):
        with open(p, encoding="utf-8") as f:
            if "use_experts_implementation" in f.read():
                out.add(os.path.basename(os.path.dirname(p)))
    return sorted(out)


# config fields the config class leaves None but its modeling code reads, which every published config.json of the
# model type holds (LFM2-8B-A1B: layer_types; DeepSeek-OCR-2: mlp_layer_types; Qwen4-Exp: its sparse-attention
# indexer's sizes): set in the tiny configs as the real ones set them (a layer count -> the per-layer list)
REAL_FIELDS: dict[str, dict[str, Any]] = {
    "lfm2_moe": {"layer_types": lambda L: ["conv", "full_attention"] * (L // 2)},
    "deepseek_ocr2_text": {"mlp_layer_types": lambda L: ["dense"] + ["sparse"] * (L - 1)},
    "unlimited_ocr_text": {"mlp_layer_types": lambda L: ["dense"] + ["sparse"] * (L - 1)},
    "dots3_note_text": {"mlp_layer_types": lambda L: ["dense"] + ["sparse"] * (L - 1)},
    # MuseSpark: experts over their own width (moe_hidden_size, projected into and out of the hidden size)
    "muse_spark_text": {"mlp_layer_types": lambda L: ["dense"] + ["sparse"] * (L - 1), "moe_hidden_size": 48},
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4
    ),
    # Mistral-Large-4: its defaults hold 72-entry per-layer lists (the config refuses another layer count)
    "mistral_large4_text": {
        "kv_source_layers": lambda L: list(range(L)),
        "indexer_types": lambda L: ["full"] * L,
        "no_rope_layers": lambda L: [1] * L,
        "mlp_layer_types": lambda L: ["dense"] + ["sparse"] * (L - 1),
    },
}


# small sizes for fields only one model type has (Nemotron-H's Mamba-2 mixer: 128 heads of 64 by default, its shared
# expert 7688 wide), set in its tiny config beside the common ones
# per-layer attention overrides of multi-head latent attention layers (Dots3-Note's sliding layers)
_MLA_OVERRIDES = {"num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "head_dim",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}  # fmt: skip
SMALL_FIELDS: dict[str, dict[str, Any]] = {
    "nemotron_h": dict(
        mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=8,
        moe_shared_expert_intermediate_size=48,
    ),
}  # fmt: skip


def _overrides(defaults: dict[str, Any], width: int = MOE_WIDTH) -> dict[str, Any]:
    """Small sizes for the keys this config class has; the structure (top-k, shared experts, groups, dense
    layers, layer types) is kept."""
    want: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        num_experts_per_tok=2,
        num_experts_per_token=2,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=48,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        decoder_sparse_step=1,
        sliding_window=8,
    )
    out = {k: v for k, v in want.items() if k in defaults}
    model_type = defaults.get("model_type")
    if defaults.get("num_experts_per_tok") == 1:  # top-1 routers (Llama-4) are part of the structure: kept
        out["num_experts_per_tok"] = 1
    if "moe_intermediate_size" not in defaults and "intermediate_size" in defaults:
        out["intermediate_size"] = width  # the family keeps its expert width in intermediate_size
    elif "intermediate_size" in defaults:
        out["intermediate_size"] = 72
    if isinstance(defaults.get("q_lora_rank"), int) is False and "q_lora_rank" in out:
        out["q_lora_rank"] = defaults["q_lora_rank"]
    for k, v in defaults.items():
        if isinstance(k, str) and "expert" in k.lower() and type(v) is int and v > 1:
            if not any(s in k.lower() for s in EXCLUDE):
                out[k] = E
    for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if k in defaults and not isinstance(defaults[k], (list, dict)):
            out[k] = E
    if "n_shared_experts" in defaults and defaults["n_shared_experts"] is None:
        out["n_shared_experts"] = 1  # keep shared experts in the structure
    if "kv_lora_rank" in defaults:  # multi-head latent attention: as many key/value heads as query heads
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
        if "head_dim" in out and "qk_rope_head_dim" in defaults:
            out["head_dim"] = out["qk_rope_head_dim"]  # DeepSeek-V3 takes its rotary width from head_dim
    kinds = defaults.get("layer_types")
    if isinstance(kinds, list) and len(set(kinds)) > 1:  # every layer type early, so a later MoE layer sees it
        order = list(dict.fromkeys(kinds))
        out["layer_types"] = [order[i % len(order)] for i in range(out["num_hidden_layers"])]
    elif isinstance(kinds, list) and set(kinds) == {"linear_attention"}:  # Granite-4.0-H: Mamba with attention
        out["layer_types"] = ["linear_attention", "attention"] * (out["num_hidden_layers"] // 2)
    elif isinstance(kinds, list) and len(set(kinds)) == 1:  # one kind (Unlimited-OCR): one entry per tiny layer
        out["layer_types"] = kinds[:1] * out["num_hidden_layers"]
    out |= SMALL_FIELDS.get(model_type, {})
    for k, v in REAL_FIELDS.get(model_type, {}).items():
        out[k] = v(out["num_hidden_layers"]) if callable(v) else v
    if "attn_layer_period" in defaults:  # Jamba: attention at layers 0, 2; MoE (Mamba) at 1, 3
        out |= dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1)
    if "topk_method" in defaults:  # DeepSeek-V2: route within groups (its default "greedy" ignores them)
        out["topk_method"] = "group_limited_greedy"
    if (defaults.get("num_expert_group") or 1) > 1:  # Bailing-hybrid: group-limited routing kept, 2 groups of 4
        out["num_expert_group"] = 2
    if "mlp_only_layers" in defaults:
        out["mlp_only_layers"] = [1]
    if defaults.get("enable_moe_block") is False:  # Gemma-4: the MoE variant's structure (experts beside the MLP)
        out |= dict(enable_moe_block=True, top_k_experts=2)
    if isinstance(defaults.get("per_layer_config"), dict):  # Gemma-4: per-layer overrides of the layers kept
        out["per_layer_config"] = {k: v for k, v in defaults["per_layer_config"].items() if int(k) < 4}
        kinds, over = defaults.get("layer_types") or [], defaults["per_layer_config"]
        odd = {kinds[int(k)] for k in over if int(k) < len(kinds)}  # Dots3-Note: the sliding layers' own attention
        if (
            odd
            and all(set(v) <= _MLA_OVERRIDES for v in over.values())
            and defaults.get("kv_lora_rank")
            and "vocab_size_per_layer_input" not in defaults
        ):
            small = dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=24, qk_nope_head_dim=8, head_dim=16)
            out["per_layer_config"] = {i: small for i, t in enumerate(out.get("layer_types") or []) if t in odd}
        if "vocab_size_per_layer_input" in defaults:  # Gemma-4: full-attention layers' own head_dim, key-value heads
            full = [i for i, t in enumerate(out.get("layer_types") or []) if t == "full_attention"]
            out["per_layer_config"] = {i: {"head_dim": 32, "num_key_value_heads": 1} for i in full}  # (others: 16, 2)
    if defaults.get("vocab_size_per_layer_input"):  # per-layer input embeddings (Gemma-3n / Gemma-4), small
        out |= dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16)
    return out


# small vision towers for multimodal wrappers whose language model is an MoE (the keys each vision config has)
_VISION = dict(
    depth=1, num_hidden_layers=1, hidden_size=32, num_heads=2, num_attention_heads=2, intermediate_size=48,
    out_hidden_size=64, deepstack_visual_indexes=[0], num_position_embeddings=16, image_size=28, patch_size=14,
    vision_output_dim=64, projector_input_dim=64, projector_output_dim=64, spatial_merge_size=2,
)  # fmt: skip
# wrappers whose vision tower nests sub-configs (DeepSeek-OCR-2: a SAM encoder and a Qwen2 encoder, 7B by default):
# small sizes per sub-config (the last SAM downsample width is the encoder's hidden size)
VISION_FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "deepseek_ocr2": {
        "sam_config": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, global_attn_indexes=[1],
            image_size=64, window_size=2, output_channels=16, downsample_channels=[32, 48],
        ),
        "encoder_config": dict(
            hidden_size=48, vocab_size=VOCAB, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, layer_types=["full_attention"], max_window_layers=1,
        ),
    },
    "unlimited_ocr": {
        "sam_config": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, global_attn_indexes=[1],
            image_size=64, window_size=2, output_channels=16, downsample_channels=[32, 48],
        ),
        "encoder_config": dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        ),
    },
}  # fmt: skip
# token ids of a wrapper's image/video markers: inside the tiny vocabulary (the text windows never hold them)
_MARKERS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_start_token_id",
            "image_end_token_id", "video_start_token_id", "video_end_token_id", "boi_token_index", "eoi_token_index",
            "image_token_index")  # fmt: skip


def _uses_mrope(model_type: str) -> bool:
    """The model type's modeling code reads multimodal rotary sections (Qwen-VL, GLM-4.5V; not Llama-4)."""
    root = os.path.dirname(transformers.__file__)
    for p in glob.glob(os.path.join(root, "models", model_type, "modeling_*.py")):
        with open(p, encoding="utf-8") as f:
            if "mrope_section" in f.read():
                return True
    return False


def tiny_config(model_type: str, width: int = MOE_WIDTH):
    defaults = AutoConfig.for_model(model_type).to_dict()
    if isinstance(defaults.get("thinker_config"), dict):  # Qwen3-Omni: the thinker (text, vision, audio), no talker
        thinker = tiny_config(defaults["thinker_config"]["model_type"], width).to_dict()
        small = dict(
            encoder_layers=1, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=48, downsample_hidden_size=16
        )
        thinker["audio_config"] |= small | {"output_dim": thinker["text_config"]["hidden_size"]}
        return AutoConfig.for_model(model_type, thinker_config=thinker, enable_audio_output=False)
    text = defaults.get("text_config")
    if not isinstance(text, dict):
        return AutoConfig.for_model(model_type, **_overrides(defaults, width))
    # a multimodal wrapper: the tiny sizes go into its text config, a one-block vision tower beside it
    vision = defaults.get("vision_config") or {}
    small = text | _overrides(text, width)
    rope = dict(small.get("rope_parameters") or {})
    if rope and _uses_mrope(model_type):  # multimodal rotary sections (t, h, w) fitting the tiny head: half the width
        head = small.get("head_dim") or small["hidden_size"] // small["num_attention_heads"]
        half = int(head * rope.get("partial_rotary_factor", small.get("partial_rotary_factor") or 1.0)) // 2
        small["rope_parameters"] = rope | {"mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    kw: dict[str, Any] = {"text_config": small}
    if isinstance(vision, dict):
        kw["vision_config"] = vision | {k: v for k, v in _VISION.items() if k in vision}
        n = kw["vision_config"].get("num_hidden_layers", 1)
        for k in ("layer_types", "mlp_layer_types"):  # (MuseSpark's, Dots3-Note's vision towers: the kept blocks')
            if isinstance(vision.get(k), list):
                kw["vision_config"][k] = vision[k][:n]
        if "adapter_in_dim" in vision:  # Dots3-Note's vision adapter: vision width -> text width
            kw["vision_config"] |= {
                "adapter_in_dim": kw["vision_config"]["hidden_size"],
                "adapter_out_dim": small["hidden_size"],
            }
        if isinstance(vision.get("per_layer_config"), dict):
            kw["vision_config"]["per_layer_config"] = {
                k: v for k, v in vision["per_layer_config"].items() if int(k) < n
            }
        for sub, small_sub in VISION_FIELDS.get(model_type, {}).items():  # nested vision sub-configs
            kw["vision_config"][sub] = vision[sub] | small_sub
    if isinstance(defaults.get("audio_config"), dict):  # MuseSpark: a one-block audio tower onto the tiny text width
        audio = defaults["audio_config"]
        kw["audio_config"] = audio | {"out_hidden_size": small["hidden_size"]}
        if "adapter_out_dim" in audio:  # Dots3-Note's audio encoder: one narrow block onto the text width
            small_audio = dict(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                downsample_hidden_size=16,
                adapter_input_size=32,
                conv_output_size=16 * audio["feature_size"] // 8,
                adapter_out_dim=small["hidden_size"],
            )
            kw["audio_config"] |= {k: v for k, v in small_audio.items() if k in audio}  # fmt: skip
        if isinstance(audio.get("hidden_sizes"), list):  # its blocks: one narrow block per stage
            kw["audio_config"] |= {
                "hidden_sizes": [16] * len(audio["hidden_sizes"]),
                "depths": [1] * len(audio["depths"]),
            }
        kw |= {k: small["hidden_size"] for k in ("out_hidden_size", "projector_hidden_size") if k in defaults}
    for i, k in enumerate(m for m in _MARKERS if m in defaults):
        kw[k] = VOCAB - 1 - i
    if "tie_word_embeddings" in defaults:
        kw["tie_word_embeddings"] = False
    return AutoConfig.for_model(model_type, **kw)


def model_class(cfg: Any) -> Any:
    """The Auto class transformers loads this model type with: causal LM, or image-text-to-text for a wrapper."""
    from moecompress.core.derive import wrapper_auto_class  # (Qwen3-Omni: its multimodal-LM class, thinker forward)

    return wrapper_auto_class(cfg) or AutoModelForCausalLM


def build(
    model_type: str, folder: Path, tokenizer_dir: Path | None = None, seed: int = 0, width: int = MOE_WIDTH
) -> Path:
    """Save a tiny randomly initialized model of ``model_type`` (routers and biases non-trivial)."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, width)
    model = model_class(cfg).from_config(cfg, experts_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")) and b.dim() == 1:  # AFMoE: a parameter
                b.uniform_(-0.05, 0.05)
            if name.endswith(("router.per_expert_scale", "router.scale")):  # Gemma-4: its router's own scales
                b.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def make_tokenizer(folder: Path) -> Path:
    """The test suite's tokenizer (conftest.make_tokenizer), for use outside pytest too (bench/families.py)."""
    import sys

    tests = str(Path(__file__).resolve().parents[1])  # tests/, where conftest.py lives (also outside pytest)
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from conftest import make_tokenizer as make

    return make(folder)
