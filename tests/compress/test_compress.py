"""`moecompress compress`: several stages in one layer-streamed pass, one checkpoint, one manifest, one report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file
from typer.testing import CliRunner

import moecompress
from moecompress.cli.main import app
from moecompress.core.manifest import Manifest

SMALL = ["--samples", "6", "--seq-len", "32", "--batch-size", "3"]


def _run(*argv: str) -> object:
    return CliRunner().invoke(app, ["compress", *argv])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def test_prune_then_quantize_in_one_pass(qwen, tmp_path):
    out = tmp_path / "pq"
    res = _run(str(qwen), "--prune", "0.34", "--bits", "4", *SMALL, "-o", str(out))
    assert res.exit_code == 0, res.output
    man = Manifest.read(out)
    assert man.command == "compress" and [s["op"] for s in man.stages] == ["prune", "quantize"]
    assert man.layout == "quantized" and man.load_with == "moecompress.load"
    assert man.stage("prune")["recipe"] == {"ratio": 0.34} and man.stage("quantize")["recipe"] == {"bits": 4}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 4 and cfg["quantization_config"]["format"] == "pack-quantized"
    assert man.bytes_after < man.bytes_before / 2
    model = moecompress.load(out)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    html = (out / "report.html").read_text()
    assert "Stage 1 of 2" in html and "Stage 2 of 2" in html
    assert (out / "profile" / "profile.json").is_file()  # the profile the prune stage used, for the report


def test_its_own_profile_has_no_output_similarity_without_a_merge_stage(qwen, tmp_path):
    """compress's own profile pass skips output similarity when no merge stage reads it (as prune's does): the rest
    is a standalone profile's, the saved profile says it has none, and `merge --profile` refuses it in one line."""
    from moecompress.profile.files import Profile

    res = _run(str(qwen), "--prune", "0.34", *SMALL, "-o", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["profile", str(qwen), *SMALL, "-o", str(tmp_path / "prof")])
    assert res.exit_code == 0, res.output
    own, full = Profile.load(tmp_path / "c" / "profile"), Profile.load(tmp_path / "prof")
    dropped = {k for k in full.tensors if k.endswith(".output_similarity")}
    assert dropped and set(own.tensors) == set(full.tensors) - dropped
    assert all(torch.equal(own.tensors[k], full.tensors[k]) for k in own.tensors)
    merge = ["merge", str(qwen), "--ratio", "0.25", "--profile", str(tmp_path / "c" / "profile"), *SMALL]
    res = CliRunner().invoke(app, [*merge, "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
    assert "no output similarity" in res.output and not (tmp_path / "m").exists()


def test_a_one_stage_recipe_file_writes_what_the_single_command_writes(qwen, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- prune: {ratio: 0.34}\n")
    res = _run(str(qwen), "--recipe", str(recipe), *SMALL, "-o", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    single = CliRunner().invoke(app, ["prune", str(qwen), "--ratio", "0.34", *SMALL, "-o", str(tmp_path / "p")])
    assert single.exit_code == 0, single.output
    a = sorted((tmp_path / "c").glob("*.safetensors"))
    b = sorted((tmp_path / "p").glob("*.safetensors"))
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]


def test_merge_then_atoms_then_bits(tmp_path, tokenizer_dir):
    mx = build_tiny("mixtral", tmp_path / "mx", tokenizer_dir)
    out = tmp_path / "ma"
    res = _run(str(mx), "--merge", "0.34", "--atom", "0.25", "--bits", "8", *SMALL, "-o", str(out))
    assert res.exit_code == 0, res.output
    man = Manifest.read(out)
    assert [s["op"] for s in man.stages] == ["merge", "atom", "quantize"]
    assert "layer0.output_similarity" in load_file(str(out / "profile" / "profile.safetensors"))  # the merge read it
    model = moecompress.load(out)
    assert model.config.num_local_experts == 4 and model.config.intermediate_size == 16


def test_a_grouped_router_takes_merge_and_a_uniform_atom_stage(tmp_path, tokenizer_dir):
    ds = build_tiny("deepseek_v3", tmp_path / "ds", tokenizer_dir)
    res = _run(str(ds), "--merge", "0.25", *SMALL, "-o", str(tmp_path / "m"))
    assert res.exit_code == 0, res.output
    assert moecompress.load(tmp_path / "m").config.n_routed_experts == 6
    res = _run(str(ds), "--atom", "0.25", *SMALL, "-o", str(tmp_path / "a"))  # shared experts zero-padded to 2 x 16
    assert res.exit_code == 0, res.output
    cfg = moecompress.load(tmp_path / "a").config
    assert (cfg.moe_intermediate_size, cfg.n_shared_experts) == (16, 2)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--bits", "5"], "bits is 5"),
        (["--prune", "0.2", "--merge", "0.2"], "keep one of them"),
        (["--recipe", "r.yaml", "--bits", "3"], "not both"),
        ([], "nothing to do"),
        (["--prune", "0.2", "--samples", "0"], "--samples 0"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(qwen, tmp_path, argv, says):
    out = tmp_path / "never"
    res = _run(str(qwen), *argv, "-o", str(out))
    assert res.exit_code == 2, res.output
    assert says in res.output and res.output.count("error:") == 1
    assert not out.exists()
