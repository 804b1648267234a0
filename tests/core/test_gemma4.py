"""Gemma-4 (``gemma4``, issue 12): what the layer stream needs beyond the hidden states.

Every Gemma-4 decoder layer takes a per-layer input besides the hidden states: the text model combines a per-layer
token embedding (``embed_tokens_per_layer``) with a projection of the input embedding (``per_layer_model_projection``,
``per_layer_projection_norm``) into [B, S, L, D] before its first layer and passes layer l the slice [:, :, l]. The
stream records that tensor from the model's own ``project_per_layer_inputs`` during capture and passes each layer its
slice (``LayerStream.layer_kwargs``). Checked here on a tiny Gemma-4 text model from its config class: a
layer-by-layer pass fed the recorded slices reproduces the full model's hidden states bit for bit.

Its decoder layer also holds its router and routed experts itself, beside its dense MLP: ``interface.
decoder_layer_blocks`` moves them into one block (``DecoderLayerMoe`` at ``<layer>.moe``) that the layer calls;
the logits stay bit for bit those of transformers' model, and the experts dispatch through the experts interface.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4 import Gemma4ForCausalLM, Gemma4TextConfig

from moecompress.core.experts import routed_forward
from moecompress.core.interface import DecoderLayerMoe, decoder_layer_blocks, observing
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


@torch.no_grad()
def test_the_decoder_layer_block_computes_what_the_layer_does():
    model = _tiny(seed=2)
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    want = model(input_ids=ids, use_cache=False).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert decoder_layer_blocks(model) == 4
    assert decoder_layer_blocks(model) == 0  # (done once)
    layer = model.model.layers[1]
    assert isinstance(layer.moe, DecoderLayerMoe) and not hasattr(layer, "router") and not hasattr(layer, "experts")
    moved = ("router.", "experts.", "pre_feedforward_layernorm_2.", "post_feedforward_layernorm_2.")
    renamed = {k.replace("layers.1.", "layers.1.moe.", 1) if k.startswith("model.layers.1.") and
               k[len("model.layers.1."):].startswith(moved) else k for k in before if "layers.1." in k}  # fmt: skip
    assert renamed == {k for k in model.state_dict() if "layers.1." in k}
    got = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)
    seen: list[int] = []

    def fwd(hidden, top_k_index, top_k_weights):  # the observation sees the experts' normed inputs
        seen.append(hidden.shape[0])
        ex = layer.moe.experts
        return routed_forward(ex.gate_up_proj, ex.down_proj, ex.act_fn, hidden, top_k_index, top_k_weights)

    with observing(layer.moe.experts, fwd) as how:
        again = model(input_ids=ids, use_cache=False).logits
    assert how == "interface" and seen == [20] and torch.equal(again, want)
    # a changed router row changes the output: the block is what the layer runs
    layer.moe.router.proj.weight[0].mul_(-3)
    assert not torch.equal(model(input_ids=ids, use_cache=False).logits, want)


def test_a_text_only_gemma4_checkpoint_prunes_by_frequency_with_its_per_expert_scale_sliced(tmp_path, tokenizer_dir):
    """The checkpoint keeps the router and experts at layers.N.*, the view at layers.N.moe.*; a frequency prune
    writes them back under the disk names, with per_expert_scale sliced as the router rows, and loads cleanly."""
    from conftest import reload_clean
    from typer.testing import CliRunner

    from moecompress.cli.main import app
    from moecompress.core.checkpoint import Checkpoint

    model = _tiny(vocab_size=320, vocab_size_per_layer_input=320)  # the test tokenizer's ids
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("router.per_expert_scale", "router.scale")):
                p.uniform_(0.5, 1.5)
    src, out = tmp_path / "g4", tmp_path / "pruned"
    model.save_pretrained(src)
    for f in tokenizer_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    ck = Checkpoint(src)
    assert ck.family.router == "router.proj" and ck.family.expert_scale == "router.per_expert_scale"
    assert "model.layers.1.moe.router.per_expert_scale" in ck.weight_map
    assert ck.disk_key("model.layers.1.moe.router.proj.weight") == "model.layers.1.router.proj.weight"
    args = ["prune", src, "--ratio", "0.25", "--method", "frequency", "--samples", "2", "--seq-len", "16", "-o", out]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    pruned = reload_clean(out)
    removed = Checkpoint(out).manifest.stage("prune")["layers"]
    for l, layer in enumerate(pruned.model.layers):
        gone = set(removed[str(l)]["removed"])
        kept = [e for e in range(8) if e not in gone]
        assert len(kept) == 6
        assert torch.equal(layer.router.per_expert_scale, model.model.layers[l].router.per_expert_scale[kept])
        assert torch.equal(layer.router.proj.weight, model.model.layers[l].router.proj.weight[kept])
