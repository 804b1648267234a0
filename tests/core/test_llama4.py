"""Llama-4 (``llama4_text`` and the ``llama4`` wrapper, issue 12): its router's sigmoid score multiplies each token
copy before the experts (top-1, a shared expert beside them, MoE and dense layers interleaved as in Maverick,
experts fused on disk as [E, H, 2I] / [E, I, H]). moecompress runs the block as ``interface.ScaledInputMoe`` (the same
computation on the experts interface): the experts see the scaled copies g x with routing weight 1, so profile
statistics are those of the expert's true input, activation and contribution f(g x)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Llama4ForCausalLM, Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from family_checks import (  # noqa: E402
    CALIB,
    _cli,
    check_load,
    check_masked,
    check_profile,
    check_view_write,
    reload_clean,
    run_checks,
)

from moecompress.cli.main import app  # noqa: E402
from moecompress.core.checkpoint import Checkpoint  # noqa: E402
from moecompress.core.errors import UserError  # noqa: E402
from moecompress.core.families import family_for  # noqa: E402
from moecompress.core.interface import ScaledInputMoe, dispatches, observing  # noqa: E402

E, I, H = 4, 40, 64


def llama4_config(**over: object) -> Llama4TextConfig:
    """Scout/Maverick's structure, tiny: top-1 of 4 experts (width 40, not a multiple of 16), a shared expert, MoE
    layers 1 and 3 between dense ones (interleave_moe_layer_step 2), chunked attention (chunks of 8 tokens) on the
    RoPE layers and full attention on the NoPE layer 3."""
    base: dict[str, object] = dict(
        vocab_size=320, hidden_size=H, intermediate_size=I, intermediate_size_mlp=72, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return Llama4TextConfig(**(base | over))


def build_llama4(folder: Path, tokenizer_dir: Path, seed: int = 0, **over: object) -> Path:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(llama4_config(**over))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_llama4(tmp_path_factory.mktemp("llama4") / "m", tokenizer_dir)


def _run(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())


def test_the_block_on_the_experts_interface_is_transformers_llama4_block():
    """ScaledInputMoe = Llama4TextMoe (output and router logits), and its experts see exactly what transformers'
    experts see: each token's copy times its sigmoid score, with weight 1 on the output."""
    torch.manual_seed(1)
    cfg = llama4_config(num_experts_per_tok=1)
    cfg._experts_implementation = "eager"
    ref = Llama4TextMoe(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = ScaledInputMoe(ref, cfg)
    with torch.no_grad():
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj.transpose(1, 2))
        ours.experts.down_proj.copy_(ref.experts.down_proj.transpose(1, 2))
    assert dispatches(ours.experts)  # observed through transformers' ExpertsInterface like every family
    x = torch.randn(2, 9, H)
    seen_ref: list[torch.Tensor] = []
    ref.experts.register_forward_pre_hook(lambda m, a: seen_ref.append(a[0].detach()))
    with torch.no_grad():
        want, want_logits = ref(x)
        seen: list[tuple[torch.Tensor, ...]] = []

        def fwd(h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            seen.append((h, idx, w))
            return ours.experts.forward.__wrapped__(ours.experts, h, idx, w)

        with observing(ours.experts, fwd) as how:
            got, got_logits = ours(x)
    assert how == "interface"
    assert torch.equal(got_logits, want_logits)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())  # bmm vs linear
    h, idx, w = seen[0]
    T = x.shape[0] * x.shape[1]
    assert h.shape == (T, H) and idx.shape == (T, 1) and torch.equal(w, torch.ones(T, 1))
    routed_in = seen_ref[0].view(E, T, H)  # transformers: every expert on every token, unrouted copies x 0
    g = torch.sigmoid(want_logits.gather(1, idx))  # [T, 1]: the score of the chosen expert
    assert torch.equal(h, routed_in[idx[:, 0], torch.arange(T)])
    assert torch.allclose(h, x.reshape(T, H) * g, atol=0)
    assert not torch.allclose(h, x.reshape(T, H))  # the scores are not 1: the check can fail


def test_llama4_text_is_derived_with_its_layout_and_routing_facts():
    cfg = llama4_config()
    fam = family_for(cfg)
    assert fam.scaled_input and fam.derived and not fam.routing_known
    assert fam.fused_disk and fam.disk_transposed and not fam.own_experts
    assert (fam.module_block, fam.router, fam.experts, fam.shared) == (
        "feed_forward",
        "router",
        "experts",
        "shared_expert",
    )
    assert fam.count_keys == ("num_local_experts",) and fam.top_k(cfg) == 1 and not fam.norm_topk(cfg)
    assert fam.moe_layers(cfg) == [1, 3]  # Maverick's interleaving, derived from the built model


def test_llama4_routing_other_than_top1_is_refused_in_one_line():
    with pytest.raises(UserError, match="top-1 routing only"):
        family_for(llama4_config(num_experts_per_tok=2))


def test_view_write_is_bit_exact_and_profile_equals_a_token_loop_on_transformers(llama4_dir):
    ck = Checkpoint(llama4_dir)
    assert ck.moe_layers == [1, 3] and ck.num_experts == E and ck.top_k == 1
    disk = load_file(str(llama4_dir / "model.safetensors"))
    w = ck.moe_weights(3)
    gu = disk["model.layers.3.feed_forward.experts.gate_up_proj"]  # [E, H, 2I] as transformers holds it
    assert gu.shape == (E, H, 2 * I)
    assert torch.equal(w.gate[2], gu[2, :, :I].T) and torch.equal(w.up[2], gu[2, :, I:].T)
    assert torch.equal(w.down[1], disk["model.layers.3.feed_forward.experts.down_proj"][1].T)
    check_view_write(ck)
    check_profile(ck)  # statistics of the scaled copies (weight 1), through chunked and full attention layers


def test_prune_to_one_expert_loads_in_transformers_and_equals_masked_routing(llama4_dir, tmp_path):
    """Top-1: a layer may keep a single expert. The pruned model's logits equal the base model's with the removed
    experts masked out of routing (each token goes to its best kept expert, with that expert's sigmoid score)."""
    ck = Checkpoint(llama4_dir)
    out = tmp_path / "pruned"
    _cli("prune", llama4_dir, "--ratio", "0.75", "--method", "reap", *CALIB, "-o", out)
    model = reload_clean(out)  # Llama4ForCausalLM: no missing/unexpected keys, no warning
    assert model.config.num_local_experts == 1
    assert model.model.layers[3].feed_forward.experts.gate_up_proj.shape == (1, H, 2 * I)
    check_masked(ck, out, model)
    check_load(ck, tmp_path)  # moecompress.load of it gives transformers' logits
    code, msg = _run("prune", llama4_dir, "--ratio", "1.0", "--method", "frequency", *CALIB, "-o", tmp_path / "p100")
    assert code == 2 and not (tmp_path / "p100").exists(), msg


@pytest.fixture
def pruned(llama4_dir, tmp_path) -> Path:
    _cli("prune", llama4_dir, "--ratio", "0.25", "--method", "frequency", *CALIB, "-o", tmp_path / "pruned")
    return tmp_path


@pytest.mark.slow
def test_info_eval_and_report_run_on_llama4(llama4_dir, pruned):
    code, msg = _run("info", llama4_dir)
    assert code == 0 and "llama4_text" in msg, msg
    _cli("eval", pruned / "pruned", "--base", llama4_dir, "--seq-len", "16", "--max-windows", "2", "--device", "cpu",
         "--json", pruned / "eval.json")  # fmt: skip
    assert json.loads((pruned / "eval.json").read_text())
    _cli("report", pruned / "pruned", "-o", pruned / "r.html", "--overwrite")
    assert (pruned / "r.html").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, reason",
    [
        (("prune", "--ratio", "0.25"), "use --method frequency, routing-mass or reap"),  # output error re-routes
        (("merge", "--ratio", "0.25"), "merging re-implements the router"),
        (("prune", "--ratio", "0.25", "--method", "frequency", "--layout", "per-layer"), "uniform layout only"),
        (("prune", "--granularity", "atom", "--ratio", "0.25"), "channel pruning is not available"),  # no exact hint
        (("compress", "--budget-ratio", "0.3"), "the budget_exact layout"),  # the layout's reason first
    ],
)
def test_operations_that_would_be_wrong_for_llama4_are_refused_in_one_line(llama4_dir, tmp_path, args, reason):
    code, msg = _run(args[0], llama4_dir, *args[1:], *CALIB, "-o", tmp_path / "out")
    assert code == 2 and reason in msg and msg.startswith("error:"), msg
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_llama4_wrapper_is_read_through_its_language_model(tmp_path, tokenizer_dir):
    """Llama4ForConditionalGeneration: the text model at language_model.model, its head at language_model.lm_head;
    the prune output loads with the image-text-to-text class, logits equal to masked routing and moecompress.load."""
    r = run_checks("llama4", tmp_path, tokenizer_dir, ops=("view_write", "profile", "prune", "load"))
    assert r["nest"] == ["language_model.model", "language_model.lm_head"], r
    assert r["ops"] == {"open": "ok", "view_write": "ok", "profile": "ok", "prune": "ok", "load": "ok"}, r
    src, out = load_file(str(tmp_path / "llama4" / "model.safetensors")), {}
    for f in sorted((tmp_path / "llama4-out" / "pruned").glob("*.safetensors")):
        out.update(load_file(str(f)))
    others = [k for k in src if not k.startswith("language_model.")]
    assert others and all(torch.equal(src[k], out[k]) and src[k].dtype == out[k].dtype for k in others)
    before = json.loads((tmp_path / "llama4" / "config.json").read_text())
    after = json.loads((tmp_path / "llama4-out" / "pruned" / "config.json").read_text())
    assert after["text_config"]["num_local_experts"] == before["text_config"]["num_local_experts"] - 2
    assert {k: v for k, v in after.items() if k != "text_config"} == {
        k: v for k, v in before.items() if k != "text_config"
    }
