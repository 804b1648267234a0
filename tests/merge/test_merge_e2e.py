import json

import pytest
import torch
from conftest import reload_clean
from moecompress.calibration.sets import TokenSet
from safetensors import safe_open
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError
from moecompress.core.writer import dir_bytes
from moecompress.merge.run import MergeOptions, expected_bytes, merge_model
from moecompress.merge.subspace import merge_average

E, TOPK = 8, 2
CPU = torch.device("cpu")


def _qwen(tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=E, num_experts_per_tok=TOPK,
        max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(cfg).to(dtype)
    path = tmp_path / "qwen"
    model.save_pretrained(path)
    return path


def _mixtral(tmp_path):
    torch.manual_seed(1)
    cfg = MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=E, num_experts_per_tok=TOPK, max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path / "mixtral"
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _tokens(n=6, s=16):
    ids = torch.randint(0, 96, (n, s), generator=torch.Generator().manual_seed(0))
    return TokenSet(ids, ["rand"] * n, "random", 0)


@pytest.mark.parametrize("method,choose", [("subspace", False), ("average", False), ("subspace", True)])
def test_merge_qwen_shrinks_and_reloads(tmp_path, method, choose):
    src = _qwen(tmp_path)
    out = tmp_path / f"out-{method}-{choose}"
    sub = method == "subspace"
    opts = MergeOptions(ratio=0.5, method=method, rank_fraction=0.5 if sub else None, sim_tokens=32, choose=choose)
    manifest = merge_model(src, out, opts, tokens=_tokens(), device=CPU).stage("merge")
    K = E // 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == K and cfg["num_local_experts"] == K
    model = reload_clean(out)
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == K and layer.mlp.gate.weight.shape[0] == K
    with torch.no_grad():
        logits = model(torch.randint(0, 96, (1, 12))).logits
    assert torch.isfinite(logits).all()
    # File size shrinks exactly as computed.
    ckpt = Checkpoint(src)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == expected_bytes(ckpt, K) == manifest["expected_tensor_bytes_after"]
    routed = sum(p.numel() for n, p in Qwen3MoeForCausalLM.from_pretrained(src).named_parameters() if "experts" in n)
    assert ckpt.bytes_on_disk - dir_bytes(out) >= 0.95 * routed * 4 * (E - K) / E
    # Manifest: every old expert lands in exactly one new expert.
    written = json.loads((out / "moecompress.json").read_text())
    assert written["schema"] == 2 and [s["op"] for s in written["stages"]] == ["merge"]
    written = written["stages"][0]
    assert written["down_refit"] is sub and written["neuron_alignment"] is sub
    for info in written["layers"].values():
        assert sorted(e for c in info["clusters"] for e in c) == list(range(E))
        assert len(info["clusters"]) == K
        for new, members in enumerate(info["clusters"]):
            assert all(info["old_to_new"][e] == new for e in members)
        if method == "subspace" and not choose:
            assert any(r is not None and r["gate"] == 8 for r in info["ranks"])  # ceil(0.5 * min(16, n*32))
        if choose:
            assert all(r is None or r["gate"] == 8 for r in info["ranks"])
            assert info["output_error"] <= info["output_error_pruning"]


def test_average_merge_writes_the_weighted_average(tmp_path):
    src = _qwen(tmp_path)
    out = tmp_path / "avg"
    merge_model(src, out, MergeOptions(ratio=0.25, method="average", router="average", sim_tokens=32, choose=False),
                tokens=_tokens(), device=CPU)  # fmt: skip
    before, after = Checkpoint(src), Checkpoint(out)
    info = json.loads((out / "moecompress.json").read_text())["stages"][0]["layers"]["1"]
    w0, w1 = before.moe_weights(1), after.moe_weights(1)
    f = torch.tensor(info["frequency"], dtype=torch.float64)
    for new, members in enumerate(info["clusters"]):
        assert torch.allclose(w1.gate[new], merge_average(w0.gate[members], f[members]), atol=1e-6)
        assert torch.allclose(w1.down[new], merge_average(w0.down[members], f[members]), atol=1e-6)
        if len(members) == 1:
            assert torch.equal(w1.router[new], w0.router[members[0]])
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as fh:
        assert not [k for k in fh.keys() if ".experts.6." in k or ".experts.7." in k]


def test_merge_mixtral_reloads(tmp_path):
    src = _mixtral(tmp_path)
    out = tmp_path / "mx"
    merge_model(src, out, MergeOptions(ratio=0.25, sim_tokens=32), tokens=_tokens(), device=CPU)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 6
    model = reload_clean(out)
    assert model.model.layers[1].mlp.experts.down_proj.shape[0] == 6


def test_merge_refuses_bad_targets(tmp_path):
    src = _qwen(tmp_path)
    with pytest.raises(UserError, match="top-k"):
        merge_model(src, tmp_path / "o1", MergeOptions(ratio=0.9), tokens=_tokens())
    with pytest.raises(UserError, match="ratio"):
        merge_model(src, tmp_path / "o2", MergeOptions(ratio=1.0), tokens=_tokens())
    with pytest.raises(UserError, match="subspace only"):
        merge_model(src, tmp_path / "o3", MergeOptions(ratio=0.5, method="average", rank=4), tokens=_tokens())
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        merge_model(src, tmp_path / "exists", MergeOptions(ratio=0.5), tokens=_tokens())
    assert not (tmp_path / "o1").exists()


def test_merge_every_family(tiny_model, tmp_path):
    """All five adapter families: merged output reloads without warnings, shrinks as computed, keeps groups."""
    ckpt = Checkpoint(tiny_model)
    E0 = ckpt.num_experts
    out = tmp_path / "merged"
    man = merge_model(tiny_model, out, MergeOptions(ratio=0.5, rank_fraction=0.75, sim_tokens=64), samples=4,
                      seq_len=32, device=CPU)  # fmt: skip
    sec = man.stage("merge")
    K = E0 // 2
    assert sec["experts_after"] == K and man.layout == "uniform"
    model = reload_clean(out)
    assert Checkpoint(out).num_experts == K
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == expected_bytes(ckpt, K)
    assert man.params_after == Checkpoint(out).num_params < ckpt.num_params
    assert man.bytes_after < man.bytes_before
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 10))).logits).all()
    if sec["n_group"] > 1:  # DeepSeek: every cluster stays inside one routing group
        Eg = E0 // sec["n_group"]
        for info in sec["layers"].values():
            assert all(len({e // Eg for e in c}) == 1 for c in info["clusters"])


def test_merge_uses_the_profile_and_protects_super_experts(tmp_path, tokenizer_dir, monkeypatch):
    from conftest import build_tiny

    from moecompress.profile.run import Profile, run_profile

    src = build_tiny("qwen3_moe", tmp_path / "q", tokenizer_dir)
    prof = run_profile(src, tmp_path / "prof", "mixed", 4, 32, 0, 4, torch.device("cpu"), 64)
    monkeypatch.setattr(Profile, "super_experts", property(lambda self: [(0, 3), (2, 5)]))
    man = merge_model(src, tmp_path / "m", MergeOptions(ratio=0.5), tmp_path / "prof", samples=4, seq_len=32,
                      device=CPU).stage("merge")  # fmt: skip
    assert man["protected"] == [[0, 3], [2, 5]]
    assert [3] in man["layers"]["0"]["clusters"] and [5] in man["layers"]["2"]["clusters"]
    freq = prof.layer(1, "frequency")
    assert man["layers"]["1"]["frequency"] == [round(float(v), 6) for v in freq]
    other = build_tiny("qwen3_moe", tmp_path / "q2", tokenizer_dir, seed=1, num_experts=8)
    with pytest.raises(UserError, match="another model"):
        merge_model(other, tmp_path / "m2", MergeOptions(ratio=0.5), tmp_path / "prof", samples=4, seq_len=32)


def test_merge_refuses_a_profile_without_its_similarity_before_the_pass(tmp_path, tokenizer_dir, monkeypatch):
    """The profile `moecompress prune` writes for itself has no output similarity: merge --profile on it stops in one
    line before any layer is merged, and writes nothing."""
    from conftest import build_tiny

    from moecompress.merge import transform
    from moecompress.prune.run import PruneOptions, prune_model

    src = build_tiny("qwen3_moe", tmp_path / "q", tokenizer_dir)
    prune_model(src, tmp_path / "pruned", PruneOptions(ratio=0.25), tokens=_tokens())
    called = []
    monkeypatch.setattr(transform.MergeTransform, "moe_layer", lambda self, ctx: called.append(ctx.index))
    with pytest.raises(UserError, match="no output similarity"):
        merge_model(src, tmp_path / "m", MergeOptions(ratio=0.5), tmp_path / "pruned" / "profile", tokens=_tokens())
    assert not called and not (tmp_path / "m").exists()
    monkeypatch.undo()
    opts = MergeOptions(ratio=0.5, similarity="router")  # a similarity that profile holds: it runs
    merge_model(src, tmp_path / "m2", opts, tmp_path / "pruned" / "profile", tokens=_tokens(), device=CPU)
