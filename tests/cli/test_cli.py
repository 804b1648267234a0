"""CLI: every bad input gets one clear line and exit code 2, with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import build_tiny
from transformers import AutoConfig
from typer.testing import CliRunner

from moecompress.cli.main import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in " ".join(result.output.split()), result.output


@pytest.fixture
def model(tmp_path, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path / "model", tokenizer_dir)


def test_help_has_examples():
    for cmd in ("info", "profile", "eval"):
        res = run(cmd, "--help")
        assert res.exit_code == 0 and "Examples" in res.output


def test_info_and_profile_and_eval(model, tmp_path):
    res = run("info", model, "--json", tmp_path / "facts.json")
    assert res.exit_code == 0, res.output
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["family"] == "Qwen3-MoE" and facts["routed_experts"] == 6 and facts["top_k"] == 2
    res = run("profile", model, "-o", tmp_path / "run", "--samples", "2", "--seq-len", "16", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "profile.json").exists() and (tmp_path / "run" / "profile.safetensors").exists()
    res = run("eval", model, "--base", model, "--seq-len", "16", "--max-windows", "1", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["top1_agreement"] == 1.0 and set(ev) >= {"perplexity", "kl_to_base", "params", "bytes"}


def test_missing_path(tmp_path):
    assert_refused(run("info", tmp_path / "nope"), "does not exist")


def test_not_moe_and_unknown_family(tmp_path):
    for model_type, msg in (("llama", "not a Mixture-of-Experts model"), ("zaya", "no moecompress adapter")):
        d = tmp_path / model_type
        AutoConfig.for_model(model_type).save_pretrained(d)
        assert_refused(run("profile", d, "-o", tmp_path / "out"), msg)
        assert not (tmp_path / "out").exists()


def test_bad_calibration_files(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert_refused(run("profile", model, "--seq-len", "16", "--calib", empty, "-o", tmp_path / "o1"), "is empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert_refused(
        run("profile", model, "--seq-len", "16", "--calib", binary, "-o", tmp_path / "o2"),
        "cannot read calibration file",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    assert_refused(
        run("profile", model, "--seq-len", "16", "--calib", bad, "-o", tmp_path / "o3"),
        "bad.jsonl:2 is not a JSON object",
    )
    assert_refused(
        run("profile", model, "--seq-len", "16", "--calib", "klingon", "-o", tmp_path / "o4"), "neither a built-in set"
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_seq_len_beyond_context(model, tmp_path):
    assert_refused(run("profile", model, "--seq-len", "4096", "-o", tmp_path / "o"), "larger than the model's context")
    assert not (tmp_path / "o").exists()


def test_index_pointing_outside(model, tmp_path):
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(run("info", model), "points outside the model folder")


def test_corrupt_safetensors(model, tmp_path):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(run("profile", model, "--seq-len", "16", "-o", tmp_path / "o"), "safetensors file")
    (model / "model.safetensors").write_bytes(b"garbage")
    assert_refused(run("info", model), "safetensors file")
    assert not (tmp_path / "o").exists()


def test_pickle_only_folder_is_refused(model):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_refused(run("info", model), "never loads")


def test_output_inside_model_or_existing(model, tmp_path):
    assert_refused(run("profile", model, "-o", model / "run"), "inside the input")
    assert not (model / "run").exists()
    (tmp_path / "taken").mkdir()
    assert_refused(run("profile", model, "-o", tmp_path / "taken"), "pass --overwrite")
    res = run("profile", model, "-o", tmp_path / "taken", "--samples", "1", "--seq-len", "8", "--overwrite")
    assert res.exit_code == 0 and (tmp_path / "taken" / "profile.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]  # no temporary leftovers


def test_cuda_refused_without_gpu(model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_refused(run("eval", model, "--device", "cuda"), "no CUDA device")


def test_builtin_model_is_found_from_anywhere(tmp_path, monkeypatch):
    from moecompress.core.checkpoint import builtin_model_dir

    if not (builtin_model_dir() / "config.json").exists():
        pytest.skip("built-in model not trained yet")
    monkeypatch.chdir(tmp_path)
    res = run("info")
    assert res.exit_code == 0 and "Qwen3-MoE" in res.output
    shutil.rmtree(tmp_path, ignore_errors=True)


def _bf16_copy(src, dst):
    """The same tiny model saved in bf16, as the built-in model and hub checkpoints are."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)
    return dst


def test_quantized_output_in_transformers_matches_only_in_the_checkpoint_dtype(model, tmp_path):
    """What the README says: a bf16 model's uniform quantized output gives moecompress.load's logits in
    transformers when loaded in bf16; asked for fp32, transformers still decompresses the experts to bf16, so the
    logits differ (default experts kernel) or the forward fails (eager)."""
    import torch
    from transformers import AutoModelForCausalLM

    import moecompress

    src = _bf16_copy(model, tmp_path / "bf16")
    out = tmp_path / "q4"
    res = run("quantize", src, "--bits", "4", "--plan", "uniform", "--method", "rtn", "--samples", "2",
              "--seq-len", "16", "--device", "cpu", "-o", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    def logp(m):
        with torch.no_grad():
            return torch.log_softmax(m(input_ids=ids).logits.float(), -1)

    ours16 = logp(moecompress.load(out, "cpu", torch.bfloat16))
    for kw in ({}, {"experts_implementation": "eager"}):
        assert torch.equal(logp(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, **kw)), ours16)
    ours32 = logp(moecompress.load(out, "cpu", torch.float32))
    d = (logp(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)) - ours32).abs().max().item()
    assert d > 0
    eager32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager")
    with pytest.raises(RuntimeError, match="dtype"):
        logp(eager32)
