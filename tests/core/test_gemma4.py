"""Gemma-4 (``gemma4``, issue 12): what the layer stream needs beyond the hidden states.

Every Gemma-4 decoder layer takes a per-layer input besides the hidden states: the text model combines a per-layer
token embedding (``embed_tokens_per_layer``) with a projection of the input embedding (``per_layer_model_projection``,
``per_layer_projection_norm``) into [B, S, L, D] before its first layer and passes layer l the slice [:, :, l]. The
stream records that tensor from the model's own ``project_per_layer_inputs`` during capture and passes each layer its
slice (``LayerStream.layer_kwargs``). Checked here on a tiny Gemma-4 text model from its config class: a
layer-by-layer pass fed the recorded slices reproduces the full model's hidden states bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4 import Gemma4ForCausalLM, Gemma4TextConfig

from moecompress.core.stream import ActivationCache, per_layer_modules, recording_per_layer_inputs


def _tiny(seed: int = 0, **over) -> Gemma4ForCausalLM:
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=96,
        vocab_size_per_layer_input=96,
        hidden_size=64,
        hidden_size_per_layer_input=16,
        intermediate_size=72,
        moe_intermediate_size=40,
        num_experts=8,
        top_k_experts=2,
        enable_moe_block=True,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=0,
        pad_token_id=0,
    )
    cfg = Gemma4TextConfig(**(kw | over))
    model = Gemma4ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.eval()


@torch.no_grad()
def test_a_layer_by_layer_pass_fed_the_recorded_per_layer_inputs_is_the_model():
    model = _tiny()
    inner = model.model
    assert per_layer_modules(inner) == (
        "embed_tokens_per_layer",
        "per_layer_model_projection",
        "per_layer_projection_norm",
    )
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    firsts: dict[int, tuple[torch.Tensor, dict]] = {}
    last: list[torch.Tensor] = []

    def pre(layer_idx):
        def hook(mod, args, kwargs):
            if layer_idx not in firsts:
                kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
                firsts[layer_idx] = (args[0], kw)

        return hook

    hooks = [layer.register_forward_pre_hook(pre(l), with_kwargs=True) for l, layer in enumerate(inner.layers)]
    hooks.append(inner.norm.register_forward_pre_hook(lambda m, a: last.append(a[0])))
    store = ActivationCache(spill=False)
    try:
        with recording_per_layer_inputs(inner, store):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert "project_per_layer_inputs" not in vars(inner)  # the model's own method is back
    assert len(store) == 1 and tuple(store[0].shape) == (2, 12, 4, 16)
    # the stream's pass: the first layer's hidden states, each layer with its type's keyword arguments and its slice
    h = firsts[0][0]
    for l, layer in enumerate(inner.layers):
        h = layer(h, **firsts[l][1], per_layer_input=store[0][:, :, l, :])
    assert torch.equal(h, last[0])
    # and the slices matter: another token's per-layer inputs change the output
    h2 = firsts[0][0]
    for l, layer in enumerate(inner.layers):
        h2 = layer(h2, **firsts[l][1], per_layer_input=store[0].flip(1)[:, :, l, :])
    assert not torch.allclose(h2, last[0])


def test_models_without_per_layer_inputs_have_no_per_layer_modules():
    model = _tiny(hidden_size_per_layer_input=0)
    assert per_layer_modules(model.model) == ()
    with pytest.raises(AttributeError):
        model.model.embed_tokens_per_layer  # noqa: B018
