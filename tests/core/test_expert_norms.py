"""Experts with a norm after each expert (transformers' ``has_post_expert_norm=True``, MuseSpark: f = norm(h down^T),
one norm module per layer, before the routing weight): ``core.experts.PostNorm`` / ``PostNormedExperts`` compute what
the family's own experts module computes, bit for bit, and the helpers whose callers model f as linear in h refuse
in one line (issue 12)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

from moecompress.core.errors import UserError
from moecompress.core.experts import (
    PostNorm,
    PostNormedExperts,
    expert_forward,
    expert_hidden,
    expert_outputs,
    experts_activation,
    fused_hidden,
    gated,
    routed_forward,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import check_profile, check_prune, check_view_write  # noqa: E402
from family_models import build  # noqa: E402

from moecompress.core.checkpoint import Checkpoint  # noqa: E402

E, H, I, T, K = 6, 48, 40, 37, 2  # expert width not a multiple of 16; the experts' own width (moe_hidden_size)


def _family_experts() -> MuseSparkExperts:
    cfg = AutoConfig.for_model("muse_spark").text_config
    cfg.num_local_experts, cfg.moe_hidden_size, cfg.moe_intermediate_size = E, H, I
    cfg._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    ex = MuseSparkExperts(cfg)
    ex.config = cfg
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=gen) * 0.2)
        ex.down_proj.copy_(torch.randn(E, H, I, generator=gen) * 0.2)
        ex.post_expert_norm.weight.copy_(torch.randn(H, generator=gen) * 0.3)
    return ex.eval().requires_grad_(False)


def _ours(ex: MuseSparkExperts) -> PostNormedExperts:
    mod = PostNormedExperts(E, H, I, ex.act_fn, copy.deepcopy(ex.post_expert_norm), "muse_spark")
    with torch.no_grad():
        mod.gate_up_proj.copy_(ex.gate_up_proj)
        mod.down_proj.copy_(ex.down_proj)
    return mod


def _routing(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])  # [T, K]
    w = torch.rand(T, K, generator=gen)
    return x, idx, w


def test_the_view_computes_the_familys_experts_bit_for_bit():
    ex = _family_experts()
    assert ex.has_post_expert_norm and not torch.equal(ex.post_expert_norm.weight, torch.zeros(H))
    x, idx, w = _routing()
    want = ex(x, idx, w)
    got = _ours(ex)(x, idx, w)
    assert torch.equal(got, want)
    # without the norm the output would differ: the check can fail
    plain = routed_forward(ex.gate_up_proj, ex.down_proj, ex.act_fn, x, idx, w)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_every_experts_output_and_the_observed_outputs_are_normed():
    ex, (x, idx, w) = _family_experts(), _routing(2)
    mod = _ours(ex)
    f_all = expert_outputs(mod.gate_up_proj, mod.down_proj, mod.act_fn, x)  # [E, N, H]
    seen: dict[int, torch.Tensor] = {}
    routed_forward(
        mod.gate_up_proj, mod.down_proj, mod.act_fn, x, idx, w, observe=lambda e, t, p, h, f: seen.update({e: (t, f)})
    )
    for e in range(E):
        one = ex(x, torch.full((T, 1), e), torch.ones(T, 1))  # every token to expert e, weight 1: f_e(x)
        torch.testing.assert_close(f_all[e], one, rtol=1e-5, atol=1e-6)
        gate, up = mod.gate_up_proj[e].chunk(2)
        torch.testing.assert_close(expert_forward(x, gate, up, mod.down_proj[e], mod.act_fn), one, rtol=1e-5, atol=1e-6)
        if e in seen:
            tok, f = seen[e]
            assert torch.equal(f, one[tok])


def test_removing_experts_equals_masking_them_out_of_routing():
    """Expert pruning keeps the one shared norm: the kept experts' slice computes what the full module computes on
    tokens routed among the kept experts (the pruned model equals the base with the removed experts masked)."""
    ex, (x, _, w) = _family_experts(), _routing(3)
    keep = torch.tensor([0, 2, 3, 5])
    gen = torch.Generator().manual_seed(4)
    local = torch.stack([torch.randperm(len(keep), generator=gen)[:K] for _ in range(T)])
    full = ex(x, keep[local], w)
    mod = PostNormedExperts(len(keep), H, I, ex.act_fn, copy.deepcopy(ex.post_expert_norm), "muse_spark")
    with torch.no_grad():
        mod.gate_up_proj.copy_(ex.gate_up_proj[keep])
        mod.down_proj.copy_(ex.down_proj[keep])
    assert torch.equal(mod(x, local, w), full)


def test_helpers_that_model_the_output_as_linear_in_h_refuse_in_one_line():
    ex = _family_experts()
    act = _ours(ex).act_fn
    assert isinstance(act, PostNorm)
    x = torch.randn(5, H)
    gate, up = ex.gate_up_proj[0].chunk(2)
    calls = (
        lambda: expert_hidden(x, gate, up, act),  # channel pruning, refit, merge alignment
        lambda: fused_hidden(x, ex.gate_up_proj[0], act),  # GPTQ / LP-plan error, the packed quantized kernel
        lambda: gated(act, x[:, :I], x[:, :I]),
        lambda: act(x),
        lambda: experts_activation(ex),  # moecompress.load of a quantized model: its packed kernel has no norm
    )
    for call in calls:
        with pytest.raises(UserError, match="has_post_expert_norm=True") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def muse(tmp_path_factory, tokenizer_dir) -> Checkpoint:
    """A tiny MuseSpark (the families' tiny config: hidden 64, experts over moe_hidden_size 48, a NoPE layer)."""
    return Checkpoint(build("muse_spark", tmp_path_factory.mktemp("muse") / "base", tokenizer_dir))


def test_muse_spark_opens_and_its_view_writes_back_bit_for_bit(muse):
    fam, cfg = muse.family, muse.config.get_text_config()
    assert fam.derived and fam.post_norm and fam.own_experts
    w = muse.moe_weights(muse.moe_layers[0])
    assert w.router.shape == (muse.num_experts, cfg.hidden_size) and w.down.shape[1] == cfg.moe_hidden_size
    assert cfg.moe_hidden_size != cfg.hidden_size
    check_view_write(muse)  # the post_expert_norm weight passes through unchanged, outside the routed tensors


def test_muse_spark_profile_equals_a_brute_force_loop_on_the_full_model(muse):
    """Router statistics from the router's own input (the block's), expert statistics from the experts' input
    (pre_expert_norm(pre_expert_proj(x))) and normed outputs; layer 3 (RoPE) follows the NoPE full-attention layer 1,
    each with its own position embeddings in the layer stream."""
    check_profile(muse)


def test_muse_spark_frequency_prune_equals_the_base_with_those_experts_masked(muse, tmp_path):
    check_prune(muse, tmp_path)  # loads in plain transformers; logits = base with the removed experts masked


def test_muse_spark_channel_pruning_is_refused_in_one_line(muse, tmp_path):
    from typer.testing import CliRunner

    from moecompress.cli.main import app

    out = tmp_path / "atom"
    args = ["prune", str(muse.path), "--granularity", "atom", "--ratio", "0.25", "--refit", "none"]
    res = CliRunner().invoke(app, [*args, "--samples", "2", "--seq-len", "16", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 2 and "normalize each expert's output" in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 3 and not out.exists()
