"""gpt-oss (issue 12): experts fused on disk, transposed, gate/up interleaved, expert and router biases, a clamped
SwiGLU, eager attention with sinks; MXFP4 releases (``*_blocks`` / ``*_scales``) are dequantized on read."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import check_masked, check_profile, reload_clean, run_checks
from family_models import build
from safetensors.torch import load_file, save_file
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.experts import clamped_swiglu

CAL = ["--samples", "2", "--seq-len", "16", "--device", "cpu"]


def test_clamped_swiglu_is_gpt_oss_own_gate():
    """Values well past the clamp limit on both sides: moecompress's gate equals GptOssExperts._apply_gate."""
    torch.manual_seed(0)
    g, u = torch.randn(5, 12) * 6, torch.randn(5, 12) * 6
    ex = GptOssExperts.__new__(GptOssExperts)
    ex.alpha, ex.limit = 1.702, 3.0
    want = ex._apply_gate(torch.stack([g, u], -1).flatten(-2))  # gate/up interleaved
    assert (g.abs() > 3).any() and (u.abs() > 3).any()
    assert torch.equal(clamped_swiglu(g, u, 1.702, 3.0), want)


@pytest.mark.slow
def test_gpt_oss_round_trips_profiles_prunes_and_quantizes_to_mxfp4(tmp_path, tokenizer_dir):
    r = run_checks("gpt_oss", tmp_path, tokenizer_dir)
    assert r["supported"] and r["derived"], r
    ops = r["ops"]  # quantize: MXFP4 at expert width 64 (tests/quant/test_mxfp4.py)
    assert ops == {"open": "ok", "view_write": "ok", "profile": "ok", "prune": "ok", "quantize": "ok"}, r
    fam = Checkpoint(tmp_path / "gpt_oss").family
    assert fam.fused_disk and fam.transposed and fam.interleaved and fam.expert_bias and fam.router_bias
    assert fam.gate == "clamped_swiglu"
    # its router (top-k of the biased logits, softmax over the k) is Mixtral's routing with a router bias: verified,
    # and the prune check above found the pruned logits equal to the base model's with those experts masked
    assert fam.routing_known and fam.norm_topk(Checkpoint(tmp_path / "gpt_oss").config)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, tokenizer_dir):
    return build("gpt_oss", tmp_path_factory.mktemp("m") / "gpt_oss", tokenizer_dir)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["prune", "--granularity", "atom", "--ratio", "0.25", "--refit", "none"], "experts carry biases"),
        (["merge", "--ratio", "0.25"], "fused on disk"),  # (and merge/ does not carry the experts' biases)
        (["prune", "--ratio", "0.25"], "expert math does not model"),  # output-error: routing verified, experts not
        (["prune", "--ratio", "0.25", "--method", "reap", "--refit", "router"], "expert math does not model"),
        (["quantize", "--bits", "4"], "not a multiple of 32"),  # MXFP4 blocks; at width 64 it is written
    ],
)
def test_operations_that_would_be_wrong_on_gpt_oss_refuse_in_one_line(gpt_oss, tmp_path, argv, says):
    res = CliRunner().invoke(app, [argv[0], str(gpt_oss), *argv[1:], *CAL, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert says in res.output and len(res.output.strip().splitlines()) <= 3, res.output
    assert not (tmp_path / "out").exists()


def _mxfp4_release(src, dst):
    """A gpt-oss folder as published: experts as MXFP4 blocks (random 4-bit codes) and E8M0 scales, the rest bf16,
    config.json with quantization_config mxfp4."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, rows_in, cols = v.shape  # stored [E, in, out]: blocks are [E, out, in / 32, 16]
            out[k + "_blocks"] = torch.randint(0, 256, (E, cols, rows_in // 32, 16), generator=g, dtype=torch.uint8)
            out[k + "_scales"] = torch.randint(118, 124, (E, cols, rows_in // 32), generator=g, dtype=torch.uint8)
        else:
            out[k] = v.to(torch.bfloat16)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    keep = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": keep}
    cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_an_mxfp4_release_is_dequantized_on_read_profiled_exactly_and_pruned_to_bf16(tmp_path, tokenizer_dir):
    """The view equals transformers' own dequantized load; the profile equals the brute force over that model;
    the pruned output is plain bf16 (no quantization_config) that loads cleanly and equals the dequantized base
    with the removed experts masked out of routing."""
    from transformers import AutoModelForCausalLM

    src = build("gpt_oss", tmp_path / "dense", tokenizer_dir, width=64)
    path = _mxfp4_release(src, tmp_path / "mxfp4")
    ck = Checkpoint(path)
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")
    for l in ck.moe_layers:
        w, ex = ck.moe_weights(l), ref.model.layers[l].mlp.experts
        assert w.gate.dtype == torch.bfloat16 and w.gate.abs().max() > 0
        assert torch.equal(w.gate, ex.gate_up_proj.transpose(1, 2)[:, 0::2].to(w.gate.dtype)), l
        assert torch.equal(w.up, ex.gate_up_proj.transpose(1, 2)[:, 1::2].to(w.up.dtype)), l
        assert torch.equal(w.down, ex.down_proj.transpose(1, 2).to(w.down.dtype)), l
    check_profile(ck)
    out = tmp_path / "pruned"
    res = CliRunner().invoke(
        app, ["prune", str(path), "--ratio", "0.25", "--method", "frequency", *CAL, "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    pruned = reload_clean(out)
    check_masked(ck, out, pruned)
