"""`moecompress compress --budget-*`: the plan's bytes are the written bytes, both layouts load, plan.json schema."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, reload_clean
from typer.testing import CliRunner

import moecompress
from moecompress.budget.options import menu
from moecompress.cli.main import app
from moecompress.core.checkpoint import Checkpoint
from moecompress.core.manifest import Manifest

SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def _run(*argv: str):
    return CliRunner().invoke(app, ["compress", *argv])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3", tokenizer_dir)


def _check_plan(plan: dict, E: int) -> None:
    assert plan["total_bytes"] == plan["written_tensor_bytes"] <= plan["budget_bytes"]
    assert plan["total_bytes"] == plan["fixed_bytes"] + plan["routed_bytes"]
    rows = [r for v in plan["layers"].values() for r in v["experts"]]
    assert sum(r["bytes"] for r in rows) == plan["routed_bytes"]
    assert sum(r["predicted_cost"] for r in rows) == pytest.approx(plan["predicted_cost"])
    for v in plan["layers"].values():
        assert [r["expert"] for r in v["experts"]] == list(range(E))
        assert v["kept_experts"] == [r["expert"] for r in v["experts"] if not r["removed"]]
        assert len(v["kept_experts"]) >= plan["min_keep"]
        for r in v["experts"]:
            assert r["choice"] in plan["options"] and set(r["costs"]) == set(plan["options"])
            assert r["predicted_cost"] == pytest.approx(r["costs"][r["choice"]])
            assert r["bytes"] == (0 if r["removed"] else plan["option_bytes"][r["choice"]])
    assert set(plan["sensitivity"]) == set(plan["layers"]) and plan["probe_kl"]
    I = plan["source_width"]
    narrower = sorted({o.width for o in menu(I) if not o.removed and o.width < I})
    assert narrower  # the tiny model's width has one cut width (75% rounds back to full width)
    for l, sens in plan["sensitivity"].items():  # every cut width has its own probe and calibration
        assert sorted(map(int, sens["cut"])) == narrower
        assert all(f"{l}:cut{w}" in plan["probe_kl"] for w in narrower)
    check = plan["check"]
    if "chosen" in check:  # the written plan is the one with the lower calibration-window KL
        assert check["joint_kl"] is not None and check["bits_only_kl"] is not None
        assert (check["chosen"] == "joint") == (check["joint_kl"] <= check["bits_only_kl"])
        assert (plan["restriction"] is not None) == (check["chosen"] == "bits_only")
    if plan["layout"] == "servable":  # one width for every projection: what transformers loads
        assert all(r["gate_up_bits"] == r["down_bits"] for v in plan["layers"].values() for r in v["experts"])
    if plan["layout"] == "exact":
        few = {tuple(x) for x in plan["protected_few_token"]}
        for l, v in plan["layers"].items():
            for r in v["experts"]:
                if (int(l), r["expert"]) in few:
                    assert r["tokens"] < 32 and (r["removed"] or (r["width"] == I and r["gate_up_bits"] >= 8
                                                                  and r["down_bits"] >= 8))  # fmt: skip
                elif r["tokens"] < 32 and not r["super"]:
                    assert plan["protect_note"], r


def test_exact_plan_writes_its_bytes_and_loads_with_moecompress_load(qwen, tmp_path):
    out = tmp_path / "b"
    res = _run(str(qwen), "--budget-ratio", "0.8", *SMALL, "-o", str(out))
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    _check_plan(plan, 6)
    man = Manifest.read(out)
    assert man.layout == "budget_exact" and man.load_with == "moecompress.load"
    assert [s["op"] for s in man.stages][0] == "budget" and man.stages[-1]["op"] == "quantize"
    model = moecompress.load(out)
    for l, v in plan["layers"].items():  # per-layer counts and per-expert widths as planned
        ex = model.model.layers[int(l)].mlp.experts
        assert ex.gate_up_proj.shape[0] == len(v["kept_experts"])
        real = (ex.down_proj.abs().sum(1) > 0).sum(1).tolist()  # non-zero channels per expert (zero padding)
        assert all(r <= w for r, w in zip(real, v["widths"], strict=True))
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 300, (2, 16))).logits
    assert torch.isfinite(logits).all()
    assert "What each expert got" in (out / "report.html").read_text()


@pytest.mark.slow
def test_servable_plan_loads_in_plain_transformers(qwen, tmp_path):
    out = tmp_path / "s"
    res = _run(str(qwen), "--budget-ratio", "0.8", "--servable", *SMALL, "-o", str(out))
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    _check_plan(plan, 6)
    kept = {len(v["kept_experts"]) for v in plan["layers"].values()}
    widths = {w for v in plan["layers"].values() for w in v["widths"]}
    per_layer = [{r["choice"] for r in v["experts"] if not r["removed"]} for v in plan["layers"].values()]
    assert len(kept) == 1 and len(widths) == 1 and all(len(c) == 1 for c in per_layer)  # one option per layer
    assert Checkpoint(out).num_experts == kept.pop()
    one = len(set.union(*per_layer)) == 1
    assert Manifest.read(out).load_with == ("transformers" if one else "moecompress.load")
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        b = moecompress.load(out)(input_ids=ids).logits
        if one:  # one width for the model: plain transformers loads it exactly
            a = reload_clean(out)(input_ids=ids).logits
            assert torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3)
    assert torch.isfinite(b).all()


def test_budget_flag_errors_are_one_line(qwen, tmp_path):
    out = tmp_path / "x"
    for argv, msg in (
        (["--budget-ratio", "0.5", "--bits", "4"], "drop --bits"),
        (["--budget-gb", "1", "--budget-ratio", "0.5"], "not both"),
        (["--budget-ratio", "1.5"], "between 0 and 1"),
        (["--servable"], "go with --budget-gb"),
        (["--no-check"], "go with --budget-gb"),
        (["--budget-ratio", "0.5", "--other-bits", "3"], "--other-bits 3"),
    ):
        res = _run(str(qwen), *argv, *SMALL, "-o", str(out))
        assert res.exit_code == 2 and msg in res.output, (argv, res.output)
        assert not out.exists()


def test_an_unreachable_budget_names_the_smallest_plan(qwen, tmp_path):
    out = tmp_path / "tiny"
    res = _run(str(qwen), "--budget-ratio", "0.2", *SMALL, "-o", str(out))
    assert res.exit_code == 2 and "smallest plan this model allows" in res.output and "raise it" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_a_joint_plan_is_written_only_if_it_beats_the_quantize_only_plan(qwen, tmp_path):
    out = tmp_path / "c"
    res = _run(str(qwen), "--budget-ratio", "0.95", *SMALL, "-o", str(out))  # the quantize-only plan fits (>= 0.9)
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    _check_plan(plan, 6)
    check = plan["check"]
    assert check["chosen"] in ("joint", "bits_only") and check["bits_only_kl"] > 0 and check["joint_kl"] > 0
    rows = [r for v in plan["layers"].values() for r in v["experts"]]
    if check["chosen"] == "bits_only":  # quantize's per-projection LP plan at the same budget
        assert all(not r["removed"] and r["width"] == plan["source_width"] for r in rows)
        assert plan["restriction"].startswith("quantize's per-projection LP plan")
    assert Manifest.read(out).stage("budget")["check"] == check
