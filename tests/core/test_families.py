"""The per-layer view reads and writes every family's checkpoint exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError
from moecompress.core.families import FAMILIES, family_for


def test_view_write_roundtrip_is_bit_identical(tiny_model):
    ck = Checkpoint(tiny_model)
    disk = load_file(str(tiny_model / "model.safetensors"))
    rebuilt = dict(disk)
    for l in ck.moe_layers:
        w = ck.moe_weights(l)
        E, I, H = w.gate.shape
        assert w.down.shape == (E, H, I) and w.router.shape == (E, H) and E == ck.num_experts
        written = ck.family.write_layer(w, l)
        for k, v in written.items():
            assert k in disk, k
            rebuilt[k] = v
        assert set(written) == {k for k in disk if ck.family.routed_key_pattern(l).match(k)}
    assert rebuilt.keys() == disk.keys()
    for k in disk:
        assert torch.equal(rebuilt[k], disk[k]) and rebuilt[k].dtype == disk[k].dtype, k


def test_fused_in_memory_view_equals_disk_view(tiny_model):
    ck = Checkpoint(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, experts_implementation="eager")
    sd = model.state_dict()
    for l in ck.moe_layers:
        a, b = ck.moe_weights(l), ck.family.read_layer(sd, l, ck.num_experts)
        for name in ("gate", "up", "down", "router"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (l, name)
        if ck.family.correction_bias:
            assert torch.equal(a.correction_bias, b.correction_bias)


def test_select_keeps_router_rows_and_biases(tmp_path, tokenizer_dir):
    ck = Checkpoint(build_tiny("deepseek_v3", tmp_path / "ds", tokenizer_dir))
    w = ck.moe_weights(ck.moe_layers[0])
    sub = w.select([5, 1])
    assert torch.equal(sub.gate[0], w.gate[5]) and torch.equal(sub.down[1], w.down[1])
    assert torch.equal(sub.router, w.router[[5, 1]])
    assert torch.equal(sub.correction_bias, w.correction_bias[[5, 1]])


def test_family_facts(tmp_path, tokenizer_dir):
    qwen2 = Checkpoint(build_tiny("qwen2_moe", tmp_path / "q2", tokenizer_dir))
    assert qwen2.moe_layers == [0, 2]  # mlp_only_layers=[1] is dense
    assert qwen2.family.shared == "shared_expert"
    ds = Checkpoint(build_tiny("deepseek_v3", tmp_path / "ds", tokenizer_dir))
    assert ds.moe_layers == [1, 2] and ds.family.n_group(ds.config) == 2
    q3 = family_for(AutoConfig.for_model("qwen3_moe", num_experts=8))
    assert q3.expert_count_updates(6) == {"num_experts": 6, "num_local_experts": 6}
    mix = Checkpoint(build_tiny("mixtral", tmp_path / "mx", tokenizer_dir))
    assert mix.family.expert_key(0, 3, 0) == "model.layers.0.block_sparse_moe.experts.3.w1.weight"


def test_every_family_has_distinct_model_types():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))


@pytest.mark.parametrize(
    ("model_type", "kwargs", "message"),
    [
        ("llama", {}, "not a Mixture-of-Experts model"),
        ("qwen3_moe", {"num_experts": 0}, "has no routed experts"),
        ("zaya", {}, "no moecompress adapter for model_type 'zaya'.*no single router"),
        (
            "dbrx",
            {},
            r"no moecompress adapter for model_type 'dbrx' yet: it is a Mixture-of-Experts family "
            r"\(ffn_config.moe_num_experts=4\).*supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3",
        ),
    ],
)
def test_unsupported_models_name_what_is_missing(model_type, kwargs, message):
    with pytest.raises(UserError, match=message):
        family_for(AutoConfig.for_model(model_type, **kwargs))


def test_fingerprint_sees_weights_not_only_shapes(tmp_path, tokenizer_dir):
    a = Checkpoint(build_tiny("qwen3_moe", tmp_path / "a", tokenizer_dir, seed=0))
    b = Checkpoint(build_tiny("qwen3_moe", tmp_path / "b", tokenizer_dir, seed=1))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == Checkpoint(tmp_path / "a").fingerprint


@pytest.mark.parametrize(
    ("model_type", "kwargs", "message"),
    [
        ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok is 9: it must be 1..8"),
        ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok is 0: it must be 1..8"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step is 0: it must be at least 1"),
        ("qwen3_moe", {"num_experts": -4}, "num_experts is -4: it must be at least 1"),
        ("mixtral", {"num_hidden_layers": -1}, "num_hidden_layers is -1: it must be at least 1"),
        ("deepseek_v3", {"n_group": 3}, "n_group is 3, which does not divide the 8 routed experts"),
        ("deepseek_v3", {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "more than the 2 experts"),
        ("deepseek_v3", {"first_k_dense_replace": -1}, "first_k_dense_replace is -1: it must be at least 0"),
    ],
)
def test_config_counts_are_checked_where_they_are_read(model_type, kwargs, message):
    base = {"num_local_experts": 8} if model_type == "mixtral" else {}
    base |= {"num_experts": 8} if model_type == "qwen3_moe" else {}
    base |= (
        {"n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}
        if model_type == "deepseek_v3"
        else {}
    )
    cfg = AutoConfig.for_model(model_type, **{"num_hidden_layers": 2, **base, **kwargs})
    with pytest.raises(UserError, match=message):
        family_for(cfg).check_config(cfg)


def test_every_family_opens_with_its_shapes_checked(tiny_model):
    """The shape check accepts every real family as transformers writes it (no false alarms)."""
    ck = Checkpoint(tiny_model)
    state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert ck.num_params == sum(t.numel() for t in state.values())
