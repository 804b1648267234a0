"""atomic_prune end to end on tiny models of every family: outputs load, equal the in-memory pruned model, refuse
bad input."""

import json
import logging
import warnings

import pytest
import torch
from conftest import build_tiny
from transformers import AutoModelForCausalLM

from moecompress.atomic import run as ap
from moecompress.atomic.load import load_exact_atomic
from moecompress.core.errors import UserError
from moecompress.core.families import family_for
from moecompress.profile.run import run_profile

FAST = dict(samples=4, seq_len=32, batch_size=4, refit=False)  # slicing exactness; refit: test_atomic_compensate


def _masked_reference(model_dir, channels):
    """The source model (float32, eager) with every removed channel zeroed in place."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()
    fam = family_for(model.config)
    with torch.no_grad():
        for l, per_expert in channels.items():
            ex = getattr(getattr(model.model.layers[int(l)], fam.module_block), fam.experts)
            I = ex.down_proj.shape[-1]
            for e, kept in enumerate(per_expert):
                drop = torch.ones(I, dtype=torch.bool)
                drop[kept] = False
                ex.gate_up_proj[e, :I][drop] = 0
                ex.gate_up_proj[e, I:][drop] = 0
                ex.down_proj[e][:, drop] = 0
    return model


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


def test_uniform_output_loads_in_transformers_and_equals_the_pruned_model(tiny_model, tmp_path, caplog):
    out = tmp_path / "out"  # deepseek_v3: its shared experts (moe_intermediate_size wide) are zero-padded to 2 x 16
    man = ap.atomic_prune(tiny_model, out, 0.3, hessian="diag", layout="uniform", **FAST)
    assert man["width"] == 16 and man["original_width"] == 24  # 24 * 0.7 -> nearest multiple of 16
    assert man["routed_channels_removed_fraction"] == pytest.approx(8 / 24)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[man["width_key"]] == 16
    assert man["bytes_after"] < man["bytes_before"]
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("transformers")]
    assert not [w for w in warned if "transformers" in str(w.filename)]
    channels = json.loads((out / "atomic_channels.json").read_text())
    assert all(len(k) == 16 for per in channels.values() for k in per)
    ref = _masked_reference(tiny_model, channels)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got = model.eval()(input_ids=ids).logits
        assert torch.isfinite(got).all()
        assert torch.allclose(got, ref(input_ids=ids).logits, atol=1e-5)


def test_exact_output_round_trips_through_the_loader(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    man = ap.atomic_prune(src, out, 0.25, hessian="full", layout="exact", **FAST)
    assert man["layout"] == "atomic_exact"
    widths = [w for info in man["layers"].values() for w in info["widths"]]
    assert len(set(widths)) > 1  # unequal widths: the global ranking moves channels between experts
    assert man["routed_channels_removed"] == round(0.25 * 3 * 6 * 24)
    channels = json.loads((out / "atomic_channels.json").read_text())
    model = load_exact_atomic(out)
    again = load_exact_atomic(out)
    ref = _masked_reference(src, channels)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert torch.equal(got, again(input_ids=ids).logits)
        if not man["experts_removed_from_routing"]:
            assert torch.allclose(got, ref(input_ids=ids).logits, atol=1e-5)
    # bit-exact weights: every kept channel equals the source's, every pad is zero
    src_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    for l, info in man["layers"].items():
        ex, sx = model.model.layers[int(l)].mlp.experts, src_model.model.layers[int(l)].mlp.experts
        W, I = ex.down_proj.shape[-1], sx.down_proj.shape[-1]
        for new, old in enumerate(info["kept_experts"]):
            k = torch.tensor(channels[l][old])
            assert torch.equal(ex.down_proj[new][:, : len(k)], sx.down_proj[old][:, k])
            assert torch.equal(ex.gate_up_proj[new][: len(k)], sx.gate_up_proj[old][k])
            assert torch.equal(ex.gate_up_proj[new][W : W + len(k)], sx.gate_up_proj[old][I + k])
            assert not ex.down_proj[new][:, len(k) :].any()


def test_exact_layout_removes_empty_experts_from_routing(tmp_path, tokenizer_dir, monkeypatch):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)

    def scores(ckpt, m, score, *_):  # expert 1 of every layer ranks lowest; ratio 1/6 removes exactly it
        out = {}
        for l in ckpt.moe_layers:
            s = torch.rand(6, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(l)) + 1
            s[1] = 0
            out[l] = s
        return out

    monkeypatch.setattr(ap, "channel_scores", scores)
    out = tmp_path / "out"
    man = ap.atomic_prune(src, out, 1 / 6, hessian="diag", layout="exact", **FAST)
    assert man["experts_removed_from_routing"] == {"0": [1], "1": [1], "2": [1]}
    model = load_exact_atomic(out)
    blk = model.model.layers[0].mlp
    assert blk.gate.weight.shape[0] == 5 and blk.experts.num_experts == 5
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager").eval()
    for layer in ref.model.layers:  # reference: expert 1 unroutable (logit -inf), everything else untouched
        router = layer.mlp.gate
        orig = router.forward

        def masked(hidden, _r=router):
            logits = torch.nn.functional.linear(hidden.reshape(-1, _r.hidden_dim), _r.weight)
            logits[:, 1] = -torch.inf
            probs = logits.softmax(-1)
            top, idx = probs.topk(_r.top_k, dim=-1)
            top = top / top.sum(-1, keepdim=True)
            return logits, top, idx

        assert orig is not None
        router.forward = masked
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_exact_layout_keeps_protected_experts_whole(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    run_profile(src, tmp_path / "prof", samples=4, seq_len=32)
    meta = json.loads((tmp_path / "prof" / "profile.json").read_text())
    meta["super_experts"] = [[0, 2], [1, 4]]  # planted: the pass finds none in a random tiny model
    (tmp_path / "prof" / "profile.json").write_text(json.dumps(meta))
    man = ap.atomic_prune(src, tmp_path / "out", 0.5, hessian="diag", layout="exact", profile=tmp_path / "prof")
    channels = json.loads((tmp_path / "out" / "atomic_channels.json").read_text())
    assert channels["0"][2] == list(range(24)) and channels["1"][4] == list(range(24))
    assert man["protected"] == [[0, 2], [1, 4]]
    ap.atomic_prune(src, tmp_path / "u", 0.3, hessian="diag", profile=tmp_path / "prof")
    assert "protected experts" in json.loads((tmp_path / "u" / "moecompress.json").read_text())["warnings"][0]


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(ratio=0.0), "between 0 and 1"),
        (dict(ratio=1.0), "between 0 and 1"),
        (dict(ratio=0.3, hessian="kfac"), "--hessian"),
        (dict(ratio=0.3, layout="ragged"), "--layout"),
        (dict(ratio=0.02), "less than one block"),
    ],
)
def test_refusals_write_nothing(tmp_path, tokenizer_dir, kwargs, msg):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir, moe_intermediate_size=64)
    with pytest.raises(UserError, match=msg):
        ap.atomic_prune(src, tmp_path / "out", **{"hessian": "diag", **kwargs}, **FAST)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_output_inside_model_or_existing(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    with pytest.raises(UserError, match="inside"):
        ap.atomic_prune(src, src / "out", 0.3, **FAST)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        ap.atomic_prune(src, tmp_path / "taken", 0.3, **FAST)


def test_refuses_a_profile_of_another_model(tmp_path, tokenizer_dir):
    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    other = build_tiny("qwen3_moe", tmp_path / "other", tokenizer_dir, moe_intermediate_size=32)
    run_profile(other, tmp_path / "prof", samples=2, seq_len=16)
    with pytest.raises(UserError, match="another model"):
        ap.atomic_prune(src, tmp_path / "out", 0.3, profile=tmp_path / "prof")
    assert not (tmp_path / "out").exists()


def test_exact_loader_builds_the_model_on_the_meta_device(tmp_path, tokenizer_dir, monkeypatch):
    """No full-size random model first: every parameter is on the meta device until the weights on disk arrive."""
    import moecompress.atomic.load as load_mod

    src = build_tiny("qwen3_moe", tmp_path / "src", tokenizer_dir)
    out = tmp_path / "out"
    ap.atomic_prune(src, out, 0.25, hessian="diag", layout="exact", score="magnitude", **FAST)
    built = []
    real = load_mod.AutoModelForCausalLM.from_config

    def from_config(*a, **k):
        model = real(*a, **k)
        built.append({p.is_meta for p in model.parameters()})
        return model

    monkeypatch.setattr(load_mod.AutoModelForCausalLM, "from_config", from_config)
    model = load_exact_atomic(out)
    assert built and all(s == {True} for s in built)
    assert not any(p.is_meta for p in model.parameters())
