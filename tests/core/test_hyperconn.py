"""Hyper-connection models (DeepSeek-V4, issue 12): the residual is [B, S, hc, D] streams, the head is the model's own.

``DeepseekV4DecoderLayer`` keeps its residual as ``hc_mult`` parallel streams mixed in and out by hyper-connections;
the MoE block sees the collapsed stream after ``post_attention_layernorm``; the text model ends in
``norm(hc_head(h))``; its first ``mlp_layer_types == "hash_moe"`` layers pick experts by a frozen table
``router.tid2eid[input_ids]``. The layer stream carries whatever shape the layers produce, passes every layer the
keyword arguments the model's forward passes it (``input_ids`` included), and runs the head with the model's own
forward (``LayerStream._tail``). Checked on tiny models built from the config class: view -> write bit-exact, the
streamed logits equal transformers', profile = brute force on hash and learned layers, pruning of a model whose
layers all learn their routing equals the base model with those experts masked out of routing, quantized outputs
load cleanly, and expert removal is refused in one line where a layer routes by its table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import (  # noqa: E402
    CALIB,
    check_masked,
    check_profile,
    check_view_write,
    family_or_refusal,
    from_pretrained,
    reload_clean,
)
from family_models import tiny_config  # noqa: E402

from moecompress import load  # noqa: E402
from moecompress.cli.main import app  # noqa: E402
from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.stream import LayerStream  # noqa: E402


def _build(folder: Path, tokenizer_dir: Path, hash_layers: int, seed: int = 0) -> Path:
    """A tiny DeepSeek-V4 (4 layers, 8 experts top-2, 4 streams) whose first ``hash_layers`` layers route by a
    random token -> expert table (distinct experts per token), with non-trivial hyper-connections and head."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("deepseek_v4")
    cfg.mlp_layer_types = ["hash_moe"] * hash_layers + ["moe"] * (cfg.num_hidden_layers - hash_layers)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("tid2eid"):
                p.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[: p.shape[1]] for _ in range(p.shape[0])]))
            elif p.is_floating_point() and p.dim() >= 2:
                p.normal_(0, 0.08)
            elif p.is_floating_point() and name.endswith(("hc_base", ".base", "bias")):
                p.uniform_(-0.3, 0.3)  # (the correction bias too: sigmoid-free sqrtsoftplus scores + bias for top-k)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def hashed(tmp_path_factory, tokenizer_dir) -> Path:
    return _build(tmp_path_factory.mktemp("dsv4") / "hashed", tokenizer_dir, hash_layers=2)


def _streamed(ck: Checkpoint, ids: torch.Tensor) -> tuple[LayerStream, torch.Tensor]:
    """The layer stream run over every layer of ``ck`` on ``ids`` (closed) and the logits of its one batch."""
    ls = LayerStream(ck, ids, batch_size=ids.shape[0])
    try:
        for _, layer in ls.layers():
            ls.forward_layer(layer)
        return ls, ls.logits(0)
    finally:
        ls.close()


def _cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_deepseek_v4_is_derived_with_its_hash_layers_and_round_trips_bit_exactly(hashed):
    ck = Checkpoint(hashed)
    fam = ck.family
    assert fam.derived and fam.hash_layers == (0, 1) and ck.moe_layers == [0, 1, 2, 3]
    assert fam.gate == "apply_gate"  # the clamped SwiGLU (swiglu_limit) of its experts, run as the family's own
    assert not fam.routing_known  # sqrtsoftplus scores: operations that re-implement routing refuse it
    check_view_write(ck)
    assert "model.layers.0.ffn.gate.tid2eid" in ck.weight_map  # passed through with the layer, never as routed


@torch.no_grad()
def test_the_streamed_logits_are_transformers_logits(hashed):
    """[B, S, hc, D] activations between layers, input_ids to the hash layers, the head run by the model's forward
    (norm(hc_head(h))) -> the full transformers model's logits."""
    ck = Checkpoint(hashed)
    ids = (torch.arange(2 * 20).reshape(2, 20) * 11 + 5) % 300
    ls = LayerStream(ck, ids, batch_size=2)
    try:
        for _, layer in ls.layers():
            ls.forward_layer(layer)
            assert ls.cache[0].shape == (2, 20, 4, 64)
        got = ls.logits(0)
    finally:
        ls.close()
    want = from_pretrained(hashed)(input_ids=ids).logits
    assert ls._tail_names == ("hc_head",)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_profile_equals_brute_force_on_hash_and_learned_layers(hashed):
    check_profile(Checkpoint(hashed))


def test_expert_removal_is_refused_in_one_line_where_a_layer_routes_by_its_table(hashed, tmp_path):
    for cmd in (["prune", hashed, "--ratio", "0.25", "--method", "frequency"], ["merge", hashed, "--ratio", "0.25"]):
        res = _cli(*cmd, *CALIB, "-o", tmp_path / cmd[0])
        assert res.exit_code == 2, res.output
        line = " ".join(res.output.split())
        assert "layers [0, 1] pick experts by a fixed token -> expert table" in line, line
        assert not (tmp_path / cmd[0]).exists()


def test_gptq_output_loads_cleanly(hashed, tmp_path):
    """GPTQ replays each MoE block alone on its captured inputs: a hash-routed block gets its input ids with them."""
    out = tmp_path / "q4"
    res = _cli("quantize", hashed, "--bits", "4", *CALIB, "-o", out)
    assert res.exit_code == 0, res.output
    model = reload_clean(out)  # plain transformers + compressed-tensors: no missing/unexpected keys
    ids = torch.arange(12)[None] % 300
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        assert torch.isfinite(want).all()
        got = load(out)(input_ids=ids).logits  # moecompress.load reads head.weight (disk) as lm_head.weight
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_channel_pruning_runs_its_gradient_through_the_models_head(hashed, tmp_path):
    """HEAPr's gradient pass differentiates the next-token loss through norm(hc_head(h)) (the stream's head);
    channels are pruned on hash and learned layers alike (no expert is removed)."""
    from moecompress import load

    out = tmp_path / "atom"
    res = _cli("prune", hashed, "--granularity", "atom", "--ratio", "0.25", "--layout", "exact", "--refit", "none",
               *CALIB, "-o", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        assert torch.isfinite(load(out)(input_ids=torch.arange(12)[None] % 300).logits).all()


def test_learned_router_layers_prune_to_the_base_model_with_those_experts_masked(tmp_path, tokenizer_dir):
    path = _build(tmp_path / "learned", tokenizer_dir, hash_layers=0, seed=1)
    ck = Checkpoint(path)
    assert ck.family.hash_layers == ()
    out = tmp_path / "pruned"
    res = _cli("prune", path, "--ratio", "0.25", "--method", "frequency", *CALIB, "-o", out)
    assert res.exit_code == 0, res.output
    model = reload_clean(out)
    assert Checkpoint(out).num_experts == 6 and model.config.n_routed_experts == 6
    check_masked(ck, out, model)  # pruned logits == base logits with the removed experts masked out of routing
    from moecompress import load

    ids = torch.arange(16)[None] % 300
    with torch.no_grad():
        a, b = load(out)(input_ids=ids).logits, model.float()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    js = tmp_path / "eval.json"  # the pruned model against its base, both run by the layer stream
    res = _cli("eval", out, "--base", path, "--seq-len", "16", "--max-windows", "2", "--device", "cpu", "--json", js)
    assert res.exit_code == 0, res.output
    got = json.loads(js.read_text())
    assert got["kl_to_base"] > 0, got


def test_inkling2_is_refused_naming_its_reason():
    cfg, why = family_or_refusal("inkling2")
    assert cfg is None and "converted on save" in why, why


@torch.no_grad()
def test_hy_v4_streams_the_top_k_its_full_indexer_layers_hand_to_the_shared_ones(tmp_path, tokenizer_dir):
    """HY-V4: hyper-connections ([B, S, hc, D], hc_head renamed on disk beside experts fused on disk) and layers
    that thread ``hidden_states, topk_indices = layer(..., prev_topk_indices=topk_indices)`` ("shared" indexer
    layers reuse the previous "full" layer's top-k): the stream carries them from layer to layer; its logits are
    transformers' and the view round-trips bit-exactly."""
    from family_models import build

    path = build("hy_v4", tmp_path / "hy_v4", tokenizer_dir)
    ck = Checkpoint(path)
    assert ck.config.indexer_types[2:] == ["shared", "shared"]
    check_view_write(ck)
    ids = (torch.arange(2 * 20).reshape(2, 20) * 5 + 1) % 300
    ls, got = _streamed(ck, ids)
    assert ls._carry == {"prev_topk_indices": 1} and ls._tail_names == ("hc_head",)
    want = from_pretrained(path)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.fixture(scope="module")
def qwen4_exp(tmp_path_factory, tokenizer_dir) -> Path:
    from family_models import build

    return build("qwen4_exp", tmp_path_factory.mktemp("q4x") / "qwen4_exp", tokenizer_dir)


@torch.no_grad()
def test_qwen4_exp_streams_its_hyper_connection_mixer_as_its_head(qwen4_exp):
    """Qwen4-Exp (a multimodal wrapper) repeats the embedding into hc_count streams [B, S, hc * D] and ends in
    ``hyper_connection_mixer`` (no [hidden] final norm): the streamed logits are its language model's logits."""
    ck = Checkpoint(qwen4_exp)
    ids = (torch.arange(2 * 20).reshape(2, 20) * 7 + 2) % 300
    ls, got = _streamed(ck, ids)
    assert ls._own_head and ck.family.final_norm == "hyper_connection_mixer"
    want = from_pretrained(qwen4_exp)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.mark.slow
def test_qwen4_exp_prunes_to_the_base_model_with_those_experts_masked(qwen4_exp, tmp_path):
    from family_checks import check_prune

    check_prune(Checkpoint(qwen4_exp), tmp_path)


@pytest.mark.slow
def test_hy_v4_channel_pruning_re_runs_each_layer_with_what_the_layer_before_handed_on(tmp_path, tokenizer_dir):
    """HEAPr's backward pass re-runs every layer on its kept inputs: the stream keeps each layer's carried top-k
    indices for it (``keep_carries``); the output loads and runs."""
    from family_models import build

    from moecompress import load

    path = build("hy_v4", tmp_path / "hy_v4", tokenizer_dir)
    out = tmp_path / "atom"
    res = _cli("prune", path, "--granularity", "atom", "--ratio", "0.25", "--refit", "none", *CALIB, "-o", out)
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        assert torch.isfinite(load(out)(input_ids=torch.arange(12)[None] % 300).logits).all()
