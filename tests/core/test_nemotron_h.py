"""NVIDIA Nemotron-H (``nemotron_h``, issue 12): a hybrid Mamba-2 + attention + MoE model whose experts have no gate.

Its experts compute f(x) = down(relu^2(up x)) (transformers' ``NemotronHExperts``, ``has_gate=False``), its checkpoint
keys sit under ``backbone.`` (transformers renames them to ``model.`` on load), and its router is DeepSeek-V3-like
(sigmoid, correction bias, group-limited top-k, routed scaling). moecompress reads it as a gateless expert view
(``experts.Ungated``: the view's gate rows copy the up rows and nothing computes with them; only up and down are
written). Checked here on tiny models from transformers' config class: open, view -> write bit for bit, the kernel
= transformers' experts bit for bit, profile = brute force over tokens on the full model, frequency prune = the base
model with those experts masked out of routing, RTN and GPTQ outputs load in plain transformers with no missing or
unexpected key and give moecompress.load's logits, channel pruning = the base with those channels zeroed, info / eval /
load, merged outputs load cleanly; the latent MoE variant (Nemotron-3-Super's ``moe_latent_size``) is refused in one
line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_random
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.nemotron_h import NemotronHConfig

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError
from moecompress.core.experts import Ungated, UngatedExperts, expert_outputs, fused_hidden, gated, routed_forward
from moecompress.core.families import family_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import _cli, check_profile, check_prune, check_view_write, reload_clean  # noqa: E402

CALIB = ("--samples", "2", "--seq-len", "16", "--device", "cpu")


def _config(**over: object) -> NemotronHConfig:
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=16,
        chunk_size=8,
        intermediate_size=72,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=40,  # not a multiple of 16
        moe_shared_expert_intermediate_size=48,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,  # Nemotron-3-Nano's
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return NemotronHConfig(**(kw | over))


def _disk(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors shards, under its checkpoint name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _build(folder: Path, tokenizer_dir: Path, seed: int = 0, **over: object) -> Path:
    return save_random(_config(**over), folder, tokenizer_dir, seed)


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory, tokenizer_dir) -> Path:
    return _build(tmp_path_factory.mktemp("nemotron_h") / "base", tokenizer_dir)


def test_opens_as_a_gateless_family_under_backbone_and_round_trips_bit_for_bit(nemotron):
    disk = _disk(nemotron)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in disk) and not any("gate_proj" in k for k in disk)
    ck = Checkpoint(nemotron)
    fam = ck.family
    assert fam.gateless and fam.disk_body == "backbone" and fam.derived and ck.moe_layers == [1, 3]
    assert fam.expert_names == ("up_proj", "up_proj", "down_proj") and ck.num_experts == 8 and ck.top_k == 2
    assert ck.disk_key("model.layers.1.mixer.gate.weight") == "backbone.layers.1.mixer.gate.weight"
    assert ck.view_key("backbone.norm_f.weight") == "model.norm_f.weight" and "model.embeddings.weight" in ck.keys()
    w = ck.moe_weights(1)
    assert torch.equal(w.gate, w.up) and w.up.shape == (8, 40, 64) and w.down.shape == (8, 64, 40)
    assert torch.equal(w.up[3], disk["backbone.layers.1.mixer.experts.3.up_proj.weight"])
    check_view_write(ck)  # written keys == the disk's routed keys (no gate key), values and dtypes bit for bit


def test_the_kernel_is_transformers_gateless_experts_bit_for_bit():
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_config(), experts_implementation="eager")
    ex = model.model.layers[1].mixer.experts
    with torch.no_grad():
        ex.up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    E, I, H = ex.up_proj.shape
    act = Ungated(ex.act_fn, "nemotron_h")
    ours = UngatedExperts(E, H, I, act)
    with torch.no_grad():
        ours.gate_up_proj.copy_(torch.cat([ex.up_proj, ex.up_proj], dim=1))
        ours.down_proj.copy_(ex.down_proj)
    x = torch.randn(37, H)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(37)])
    wts = torch.rand(37, 2)
    with torch.no_grad():
        assert torch.equal(ours(x, idx, wts), ex(x, idx, wts))  # same ops, same order
        # the gate half is never computed with: garbage there changes nothing
        ours.gate_up_proj[:, :I] = float("nan")
        assert torch.equal(ours(x, idx, wts), ex(x, idx, wts))
        every = expert_outputs(ours.gate_up_proj, ours.down_proj, act, x)  # [E, N, H]
        want = torch.stack([ex.act_fn(x @ ex.up_proj[e].T) @ ex.down_proj[e].T for e in range(E)])
        assert torch.allclose(every, want, atol=1e-5)
        h = fused_hidden(x, ours.gate_up_proj[2], act)
        assert torch.equal(h, ex.act_fn(torch.nn.functional.linear(x, ex.up_proj[2])))
        assert torch.equal(gated(act, torch.full_like(h, float("nan")), h), ex.act_fn(h))
    with pytest.raises(UserError, match="no gate projection"):
        act(x)  # a code path computing act(gate) * up itself is refused, never silently wrong
    seen = []
    routed_forward(ours.gate_up_proj, ours.down_proj, act, x, idx, wts, observe=lambda e, t, p, h, f: seen.append(h))
    assert sum(h.shape[0] for h in seen) == 2 * 37 and all(h.shape[1] == I and (h >= 0).all() for h in seen)


def test_profile_equals_a_brute_force_loop_on_the_full_model(nemotron):
    check_profile(Checkpoint(nemotron))


def test_frequency_prune_equals_the_base_with_those_experts_masked(nemotron, tmp_path):
    ck = Checkpoint(nemotron)
    check_prune(ck, tmp_path)  # CLI prune, clean transformers reload, expert counts, masked-routing logits
    out = tmp_path / "pruned"
    disk = _disk(out)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in disk) and not any("gate_proj" in k for k in disk)
    from moecompress import load

    ids = torch.arange(16)[None] % 300
    with torch.no_grad():
        a = load(out)(input_ids=ids).logits
        b = reload_clean(out).float()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    _cli("info", out)
    js = tmp_path / "eval.json"
    _cli("eval", out, "--base", nemotron, "--seq-len", "16", "--max-windows", "2", "--device", "cpu", "--json", js)
    ev = json.loads(js.read_text())
    assert 0 < ev["kl_to_base"] and ev["perplexity"]["all"] > 1 and 0 < ev["top1_agreement"] < 1


@pytest.mark.parametrize("method", ["rtn", pytest.param("gptq", marks=pytest.mark.slow)])
def test_quantized_outputs_load_cleanly_and_match_moecompress_load(nemotron, tmp_path, method):
    from moecompress import load

    out = tmp_path / f"q4-{method}"
    _cli("quantize", nemotron, "--bits", "4", "--plan", "uniform", "--method", method, *CALIB, "-o", out)
    keys = set(_disk(out))
    packed = {k for k in keys if ".mixer.experts." in k and k.endswith("weight_packed")}
    assert packed and all(k.startswith("backbone.") for k in packed) and not any("gate_proj" in k for k in keys)
    assert {k.split(".")[-2] for k in packed} == {"up_proj", "down_proj"}, packed
    plain = reload_clean(out)
    ids = torch.arange(16)[None] % 300
    with torch.no_grad():
        got = load(out)(input_ids=ids).logits
        want = plain(input_ids=ids).logits
        base = load(nemotron)(input_ids=ids).logits
        ex = plain.model.layers[1].mixer.experts
        up0 = _disk(nemotron)["backbone.layers.1.mixer.experts.0.up_proj.weight"]
        err = float((ex.up_proj[0].float() - up0).abs().max())
    assert torch.allclose(got.float(), want.float(), atol=1e-4), float((got.float() - want.float()).abs().max())
    assert 0 < err < 0.1, err  # quantized (4-bit grid), not copied, and close
    assert float((got.float() - base).abs().max()) > 0


@pytest.mark.parametrize("layout", ["uniform", pytest.param("exact", marks=pytest.mark.slow)])
def test_channel_pruning_equals_the_base_with_those_channels_masked(nemotron, tmp_path, layout):
    """Without a gate, channel j of expert e is up row j and down column j alone: the pruned model (loaded by
    transformers for the uniform layout, by moecompress's exact loader otherwise) is the base model with every
    removed channel's up row zeroed (relu^2(0) = 0)."""
    from moecompress import load

    out = tmp_path / f"atom-{layout}"
    args = ("--granularity", "atom", "--ratio", "0.25", "--refit", "none", "--layout", layout)
    _cli("prune", nemotron, *args, *CALIB, "-o", out)
    base, pruned = Checkpoint(nemotron), Checkpoint(out)
    ref = AutoModelForCausalLM.from_pretrained(nemotron, experts_implementation="eager").eval()
    removed = 0
    for l in base.moe_layers:
        wb, fam = base.moe_weights(l), pruned.family
        ex = ref.model.layers[l].mixer.experts
        for e in range(pruned.num_experts):  # per expert: the exact layout's widths differ
            up, down = pruned.get(fam.expert_key(l, e, 1)), pruned.get(fam.expert_key(l, e, 2))
            rows = [int((wb.up[e] == r).all(dim=1).nonzero()[0]) for r in up]  # each kept channel is a base channel
            assert len(set(rows)) == len(rows) < wb.up.shape[1]
            assert torch.equal(down, wb.down[e][:, rows]), (l, e)  # its down column follows it
            gone = sorted(set(range(wb.up.shape[1])) - set(rows))
            removed += len(gone)
            with torch.no_grad():
                ex.up_proj[e, gone] = 0
    assert removed > 0
    ids = (torch.arange(2 * 24).reshape(2, 24) * 7 + 3) % 300
    with torch.no_grad():
        got, want = load(out)(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.mark.slow
def test_per_layer_expert_pruning_loads_and_equals_masked_routing(nemotron, tmp_path):
    from family_checks import check_masked  # noqa: I001

    from moecompress import load

    out = tmp_path / "per-layer"
    _cli("prune", nemotron, "--ratio", "0.25", "--method", "frequency", "--layout", "per-layer", *CALIB, "-o", out)
    check_masked(Checkpoint(nemotron), out, load(out))


def test_the_latent_moe_variant_is_refused_in_one_line():
    with pytest.raises(UserError, match="latent space .moe_latent_size=32"):
        family_for(_config(moe_latent_size=32))
    assert family_for(_config()).routing_known  # DeepSeek-V3's router (sigmoid, correction bias, groups, scaling)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["average", "subspace"])
def test_merged_outputs_load_cleanly(nemotron, tmp_path, method):
    """Merging (its routing is DeepSeek-V3's, re-implemented by the router fit) writes up and down only: the output
    loads in plain transformers with no missing or unexpected key and gives moecompress.load's logits."""
    from moecompress import load

    out = tmp_path / f"merged-{method}"
    _cli("merge", nemotron, "--ratio", "0.25", "--method", method, "--no-choose", *CALIB, "-o", out)
    assert Checkpoint(out).num_experts == 6 and not any("gate_proj" in k for k in _disk(out))
    ids = (torch.arange(2 * 24).reshape(2, 24) * 7 + 3) % 300
    with torch.no_grad():
        got, want = load(out)(input_ids=ids).logits, reload_clean(out)(input_ids=ids).logits
        base = load(nemotron)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("servable", [False, True])
def test_byte_budget_outputs_load(nemotron, tmp_path, servable):
    """compress --budget-ratio: the exact plan loads with moecompress.load (backbone.* keys, gateless experts padded
    exactly); the servable plan (here it removes layer 1's expert 0) writes config.json with the experts' one width
    and loads cleanly in plain transformers."""
    from moecompress import load

    out = tmp_path / f"budget-{servable}"
    _cli("compress", nemotron, "--budget-ratio", "0.8", *(["--servable"] if servable else []), *CALIB, "-o", out)
    with torch.no_grad():
        assert torch.isfinite(load(out)(input_ids=torch.arange(12)[None] % 300).logits).all()
    if servable:
        cfg = json.loads((out / "config.json").read_text())
        plan = json.loads((out / "plan.json").read_text())
        widths = {w for v in plan["layers"].values() for w in v["widths"]}
        assert widths == {cfg["moe_intermediate_size"]}, (widths, cfg["moe_intermediate_size"])
        reload_clean(out)
