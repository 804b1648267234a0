"""Fault injection on model folders: real layouts users have load; broken or hostile ones get one line, exit 2.

Each broken folder is built from a tiny real model (lying configs, swapped or narrowed tensors, corrupt headers
and indexes, symlink layouts). Every refusal is checked the same way: exit code 2, exactly one line on stderr,
no traceback, nothing written at -o, and the input folder byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError

runner = CliRunner()
SMALL = ("--samples", "2", "--seq-len", "16", "--device", "cpu")


def tree_state(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``root`` (symlinks not followed): kind + link target or content hash."""
    out: dict[str, tuple[str, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir", "")
    return out


def refused(args: list, message: str, model: Path, out: Path | None = None) -> None:
    before = tree_state(model)
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    assert message in " ".join(res.stderr.split()), res.stderr
    assert out is None or not out.exists()
    assert tree_state(model) == before


# ---------- builders of broken folders ----------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("safety") / "qwen3", tokenizer_dir)


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(pristine, d)
    return d


def edit_config(**changes: object) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    return apply


def edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    return apply


def transpose(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].T.contiguous()

    return fn


def narrow(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key][:-1].contiguous()

    return fn


def header_is_list(d: Path) -> None:
    header = json.dumps([{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}]).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


def sharded(index: object) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    return apply


def write_file(name: str, text: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).write_text(text)

    return apply


EXPERT = "model.layers.0.mlp.experts.0.gate_proj.weight"
BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    # config.json counts (the tiny model: 3 layers, 6 experts, top-2, hidden 32, vocab 320, expert width 24)
    "top_k_above_experts": (edit_config(num_experts_per_tok=7), "num_experts_per_tok is 7: it must be 1..6"),
    "top_k_zero": (edit_config(num_experts_per_tok=0), "num_experts_per_tok is 0"),
    "top_k_negative": (edit_config(num_experts_per_tok=-2), "num_experts_per_tok"),
    "top_k_fraction": (edit_config(num_experts_per_tok=1.5), "num_experts_per_tok"),
    "experts_string": (edit_config(num_local_experts="6"), "is '6' (str): it must be a whole number"),
    "experts_negative": (edit_config(num_experts=-6, num_local_experts=-6), "is -6"),
    "layers_string": (edit_config(num_hidden_layers="3"), "num_hidden_layers"),
    "layers_negative": (edit_config(num_hidden_layers=-3), "num_hidden_layers"),
    "layers_beyond_weights": (edit_config(num_hidden_layers=10**9), "the weights hold 3 decoder layers"),
    "sparse_step_zero": (edit_config(decoder_sparse_step=0), "decoder_sparse_step is 0"),
    "no_moe_layer": (edit_config(mlp_only_layers=[0, 1, 2]), "no MoE layer"),
    # config.json vs tensors
    "hidden_size_lies": (edit_config(hidden_size=64, head_dim=16), "config.json does not match the weights"),
    "vocab_size_lies": (edit_config(vocab_size=400), "config.json does not match the weights"),
    "expert_width_lies": (edit_config(moe_intermediate_size=32), "expert width 32"),
    "expert_count_lies": (edit_config(num_experts=5, num_local_experts=5), "5 routed experts"),
    "expert_swapped": (edit_tensors(transpose(EXPERT)), f"tensor {EXPERT} has shape [32, 24]"),
    "attention_narrowed": (
        edit_tensors(narrow("model.layers.1.self_attn.q_proj.weight")),
        "model.layers.1.self_attn.q_proj.weight has shape",
    ),
    "expert_missing": (
        edit_tensors(lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight")),
        "lack model.layers.2.mlp.experts.5.down_proj.weight",
    ),
    # files that are valid JSON of the wrong structure
    "header_is_list": (header_is_list, "not a valid safetensors file"),
    "index_is_list": (sharded([{"weight_map": {}}]), "has no weight_map object"),
    "weight_map_is_list": (sharded({"weight_map": [["a", "b"]]}), "has no weight_map object"),
    "weight_map_values_not_strings": (
        sharded({"weight_map": {"model.embed_tokens.weight": 1}}),
        "not a file name",
    ),
    "manifest_is_list": (write_file("moecompress.json", "[1, 2]"), "moecompress.json is not a JSON object"),
    # schema 2 is read strictly: a missing common field or another schema is named
    "manifest_without_layout": (
        write_file("moecompress.json", json.dumps({"schema": 2, "command": "prune", "stages": []})),
        "moecompress.json field layout is None",
    ),
    "manifest_future_schema": (write_file("moecompress.json", '{"schema": 3}'), "has schema 3; this moecompress"),
    "config_is_list": (write_file("config.json", "[]"), "has no model_type"),
    "config_too_deep": (write_file("config.json", "[" * 100_000 + "]" * 100_000), "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folder_is_refused_in_one_line(model, tmp_path, case):
    breaker, message = BROKEN[case]
    breaker(model)
    refused(["info", model], message, model)
    refused(["profile", model, "-o", tmp_path / "out", *SMALL], message, model, tmp_path / "out")
    refused(["eval", model, "--seq-len", "16", "--max-windows", "1", "--device", "cpu"], message, model)


def test_tokenizer_of_the_wrong_structure(model, tmp_path):
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": [1, 2, 3]}))
    refused(["profile", model, "-o", tmp_path / "out", *SMALL], "cannot load the tokenizer", model, tmp_path / "out")


def test_dbrx_is_named_as_a_moe_family_without_adapter(tmp_path):
    d = tmp_path / "dbrx"
    AutoConfig.for_model("dbrx").save_pretrained(d)
    refused(["info", d], "no moecompress adapter for model_type 'dbrx' yet: it is a Mixture-of-Experts family", d)
    res = runner.invoke(app, ["info", str(d)])
    assert "not a Mixture-of-Experts" not in res.output and "mixtral" in res.output and "deepseek_v3" in res.output


# ---------- NaN / Inf in weights ----------


def test_nan_weights_are_warned_and_kept_out_of_profile_json(model, tmp_path):
    key = "model.layers.1.mlp.experts.2.down_proj.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][0, 0] = float("nan")
        t[key][1, 0] = float("inf")

    edit_tensors(poison)(model)
    res = runner.invoke(app, ["profile", str(model), "-o", str(tmp_path / "run"), *SMALL])
    assert res.exit_code == 0, res.output
    assert f"tensor {key} holds 1 NaN and 1 Inf values" in " ".join(res.stderr.split())

    def no_constants(name: str) -> None:
        raise AssertionError(f"profile.json holds {name}")

    prof = json.loads((tmp_path / "run" / "profile.json").read_text(), parse_constant=no_constants)
    assert any(key in w for w in prof["warnings"])
    assert any("written as null" in w for w in prof["warnings"])
    assert any(e["reap"] is None for e in prof["experts"])  # NaN statistics are null, not NaN


def test_each_tensor_is_checked_for_nan_once_per_checkpoint(model, monkeypatch):
    """A second read of the same tensors (prune's pass after its profile pass) skips the finite check of those
    already found finite; a non-finite tensor stays recorded (and is warned about once)."""
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    edit_tensors(lambda t: t[key].__setitem__((0, 0), float("nan")))(model)
    ck = Checkpoint(model)
    checked: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checked.append(t.numel()) or real(t))
    first = ck.layer_tensors(1)
    n_first = len(checked)
    assert n_first == sum(t.is_floating_point() for t in first.values())  # every float tensor checked once
    again = ck.layer_tensors(1)
    assert len(checked) == n_first  # nothing checked again
    assert all(torch.allclose(first[k], again[k], rtol=0, atol=0, equal_nan=True) for k in first)
    assert ck.nonfinite == {key: (1, 0)}
    ck.layer_tensors(0)
    assert len(checked) > n_first  # other tensors are still checked on their first read


# ---------- Hugging Face cache layout (snapshots/<rev>/* -> ../../blobs/<sha>) ----------


def hf_cache(src: Path, root: Path) -> Path:
    """Lay ``src`` out as the hub cache does; returns the snapshot folder."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, tokenizer_dir) -> Path:
    d = tmp_path_factory.mktemp("sharded") / "m"
    build_tiny("qwen3_moe", d, tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(d, experts_implementation="eager")
    shutil.rmtree(d / "model.safetensors", ignore_errors=True)
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="60KB")
    assert len(list(d.glob("model-*.safetensors"))) > 1
    return d


def test_sharded_and_single_file_models_load_from_a_hub_cache(sharded_model, pristine, tmp_path):
    for src in (sharded_model, pristine):
        snap = hf_cache(src, tmp_path / src.name / "hub")
        ck = Checkpoint(snap)
        assert ck.num_experts == 6 and ck.fingerprint == Checkpoint(src).fingerprint
        assert torch.equal(ck.get("model.embed_tokens.weight"), Checkpoint(src).get("model.embed_tokens.weight"))


def test_index_names_are_checked_not_where_they_resolve(sharded_model, tmp_path):
    snap = hf_cache(sharded_model, tmp_path / "hub")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    cases = {
        "../../blobs/x.safetensors": "points outside the model folder",
        "/etc/passwd": "points outside the model folder",
        "sub/model.safetensors": "not a plain file name",
        "..": "points outside the model folder",
    }
    for name, message in cases.items():
        bad = {**index, "weight_map": {k: (name if v == shard else v) for k, v in index["weight_map"].items()}}
        (snap / "model.safetensors.index.json").unlink()
        (snap / "model.safetensors.index.json").write_text(json.dumps(bad))
        refused(["info", snap], message, tmp_path / "hub")
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    (snap / shard).unlink()
    (snap / shard).symlink_to("/etc/passwd")  # a plain name that resolves to something that is not safetensors
    refused(["info", snap], f"{shard} is not a valid safetensors file", tmp_path / "hub")
    (snap / shard).unlink()
    (snap / shard).mkdir()
    refused(["info", snap], "not a regular file", tmp_path / "hub")
    (snap / shard).rmdir()
    os.mkfifo(snap / shard)  # a FIFO would block a reader forever
    refused(["info", snap], "not a regular file", tmp_path / "hub")


def test_single_file_follows_the_same_rule(pristine, tmp_path):
    snap = hf_cache(pristine, tmp_path / "hub")
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to("/etc/passwd")
    refused(["info", snap], "model.safetensors is not a valid safetensors file", tmp_path / "hub")


def test_pipeline_on_a_hub_cache_writes_nothing_into_it(sharded_model, tmp_path):
    hub = tmp_path / "hub"
    snap = hf_cache(sharded_model, hub)
    before = tree_state(hub)
    run, out = tmp_path / "run", tmp_path / "pruned"
    res = runner.invoke(app, ["profile", str(snap), "-o", str(run), *SMALL])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prune", str(snap), "--ratio", "0.5", "--profile", str(run), "-o", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        ["eval", str(out), "--base", str(snap), "--seq-len", "16", "--max-windows", "1", "--device", "cpu",
         "--json", str(tmp_path / "eval.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval.json").read_text())["kl_to_base"] >= 0
    assert Checkpoint(out).num_experts == 3 and not any(p.is_symlink() for p in out.iterdir())
    assert tree_state(hub) == before


def test_checkpoint_api_raises_user_error_not_others(model):
    edit_config(num_experts_per_tok=99)(model)
    with pytest.raises(UserError, match="num_experts_per_tok is 99"):
        Checkpoint(model)


def test_layer_count_is_bounded_before_transformers_reads_the_config(tmp_path, tokenizer_dir):
    """transformers' Qwen2-MoE config builds per-layer lists (10**8 layers: minutes and gigabytes)."""
    import time

    d = build_tiny("qwen2_moe", tmp_path / "q2", tokenizer_dir)
    edit_config(num_hidden_layers=10**8)(d)
    t0 = time.monotonic()
    refused(["info", d], "num_hidden_layers is 100000000, but the weights hold 3 decoder layers", d)
    assert time.monotonic() - t0 < 30
    (d / "model.safetensors").write_bytes(b"garbage")  # weights that cannot tell: an absolute bound still holds
    refused(["info", d], "num_hidden_layers is 100000000: no model has more than 100,000", d)
