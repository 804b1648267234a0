"""The sizes a cost prediction needs, read from config.json alone (no weights: a 700 GB model's config suffices).

shape = shape_of_folder("./DeepSeek-V3")     # config.json (+ the index's total_size when present)
shape.moe_layer_params                       # 3 E H I routed parameters per MoE layer
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..core.checkpoint import resolve_model
from ..core.errors import UserError
from ..core.families import family_for
from ..core.jsonfile import read_json_file

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelShape:
    """One decoder stack's sizes: L layers (``moe_layers`` of them MoE), hidden H, E routed experts of width I,
    top-k, shared-expert width (0 when none), dense MLP width, attention parameters per layer, vocabulary, bytes
    per stored weight."""

    model_type: str
    layers: int
    moe_layers: int
    hidden: int
    experts: int
    width: int
    top_k: int
    shared_width: int
    dense_width: int
    attn_params: int
    vocab: int
    dtype_bytes: int

    @property
    def moe_layer_params(self) -> int:
        """Routed expert parameters of one MoE layer (gate, up, down: 3 E H I)."""
        return 3 * self.experts * self.hidden * self.width

    @property
    def layer_params(self) -> int:
        """Parameters of the largest decoder layer (the one the engine holds at a time)."""
        moe = self.moe_layer_params + 3 * self.hidden * self.shared_width + self.experts * self.hidden
        dense = 3 * self.hidden * self.dense_width if self.moe_layers < self.layers else 0
        return self.attn_params + max(moe, dense)

    @property
    def active_params_per_token(self) -> int:
        """Multiply-adds per token through one MoE layer: attention projections, router, top-k + shared experts."""
        routed = 3 * self.hidden * (self.top_k * self.width + self.shared_width)
        return self.attn_params + self.experts * self.hidden + routed

    @property
    def params(self) -> int:
        """All parameters (embeddings, lm_head, every layer), from the config's sizes."""
        moe = self.moe_layer_params + 3 * self.hidden * self.shared_width + self.experts * self.hidden
        dense = 3 * self.hidden * self.dense_width
        per_layer = self.moe_layers * moe + (self.layers - self.moe_layers) * dense
        return self.layers * self.attn_params + per_layer + 2 * self.vocab * self.hidden


def _int(cfg: Any, *keys: str, default: int | None = None) -> int:
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    if default is None:
        raise UserError(f"config.json has none of {', '.join(keys)}: cannot size the model")
    return default


def _attn_params(cfg: Any, H: int) -> int:
    raw = cfg.to_dict()
    over = [v for v in (raw.get("per_layer_config") or {}).values() if isinstance(v, dict)]
    if over and raw.get("kv_lora_rank"):  # Dots3-Note: per-layer latent-attention sizes (global reads raise): widest
        keys = set().union(*over)
        cfg = SimpleNamespace(**(raw | {k: max(v for v in [raw.get(k), *(o.get(k) for o in over)] if v) for k in keys}))
    heads = _int(cfg, "num_attention_heads")
    if getattr(cfg, "kv_lora_rank", None):  # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2)
        nope, rope, v = (_int(cfg, k, default=0) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        qr, kvr = _int(cfg, "q_lora_rank", default=0), _int(cfg, "kv_lora_rank")
        q = H * qr + qr * heads * (nope + rope) if qr else H * heads * (nope + rope)
        return q + H * (kvr + rope) + kvr * heads * (nope + v) + heads * v * H
    raw = cfg.to_dict()
    if raw.get("per_layer_config"):  # Gemma-4: per-layer head_dim / key-value heads (global reads raise): the widest
        over = list(raw["per_layer_config"].values())
        keys = ("head_dim", "num_key_value_heads")
        hd, kv = ([v for v in [raw.get(k), *(o.get(k) for o in over)] if v] for k in keys)
        return H * max(hd or [H // heads]) * (2 * heads + 2 * max(kv or [heads]))
    hd = getattr(cfg, "head_dim", None) or H // heads
    kv = _int(cfg, "num_key_value_heads", default=heads)
    return H * hd * (2 * heads + 2 * kv)


def _dtype_bytes(raw: dict[str, Any]) -> int:
    q = raw.get("quantization_config") or {}
    if isinstance(q, dict) and q.get("quant_method") == "fp8":
        return 1
    name = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return _DTYPE_BYTES.get(name, 2)


def shape_of_config(config: PretrainedConfig | dict[str, Any]) -> ModelShape:
    """The shape of a transformers config (or its config.json as a dict)."""
    raw = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    if not isinstance(raw.get("model_type"), str):
        raise UserError("config.json has no model_type: not a transformers model config")
    if isinstance(config, PretrainedConfig):
        cfg = config
    else:
        try:
            cfg = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
        except Exception as err:  # transformers raises many types for a config it cannot read
            raise UserError(f"transformers cannot read config.json (model_type {raw['model_type']!r}): {err}") from None
    fam = family_for(cfg)
    cfg = cfg.get_text_config()  # a multimodal wrapper: its language model's sizes
    H = _int(cfg, "hidden_size")
    E, k = fam.num_experts(cfg), fam.top_k(cfg)
    width = _int(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
    dense = _int(cfg, "intermediate_size", default=width)
    shared = _int(cfg, "shared_expert_intermediate_size", default=0)
    if not shared and getattr(cfg, "n_shared_experts", None):
        shared = _int(cfg, "n_shared_experts") * width
    L = _int(cfg, "num_hidden_layers")
    return ModelShape(
        model_type=raw["model_type"], layers=L, moe_layers=len(fam.moe_layers(cfg)), hidden=H, experts=E,
        width=width, top_k=k, shared_width=shared, dense_width=dense, attn_params=_attn_params(cfg, H),
        vocab=_int(cfg, "vocab_size"), dtype_bytes=_dtype_bytes(raw),
    )  # fmt: skip


def shape_of_folder(path: str | Path | None) -> ModelShape:
    """The shape of a model folder from its config.json alone (weights may be absent); None = the built-in model."""
    folder = resolve_model(path)
    raw = read_json_file(folder / "config.json", "config.json (JSON)")
    if not isinstance(raw, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object: not a transformers model config")
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # transformers/huggingface_hub raise many types for a config they cannot read
        lines = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())[:300]
        raise UserError(f"transformers cannot read {folder / 'config.json'}: {lines}") from None
    shape = shape_of_config(cfg)
    return shape if shape.dtype_bytes == _dtype_bytes(raw) else _with_dtype(shape, _dtype_bytes(raw))


def _with_dtype(shape: ModelShape, nbytes: int) -> ModelShape:
    from dataclasses import replace

    return replace(shape, dtype_bytes=nbytes)


def index_total_size(path: str | Path) -> int | None:
    """``metadata.total_size`` of the folder's safetensors index (bytes of all weights), when it says."""
    index = Path(path) / "model.safetensors.index.json"
    if not index.exists():
        return None
    try:
        size = json.loads(index.read_text()).get("metadata", {}).get("total_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None
