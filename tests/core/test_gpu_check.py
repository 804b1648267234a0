"""bench/gpu_check.py in its CPU quick mode on a tiny model, so the prepared GPU check cannot rot unnoticed."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny, load_bench


def _gpu_check():
    return load_bench("gpu_check")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return build_tiny("qwen3_moe", tmp_path_factory.mktemp("gc") / "qwen3", tokenizer_dir)


def test_quick_cpu_run_passes_every_part(tiny, tmp_path):
    """Every op runs on the 'device' (CPU here, so it is its own reference: the comparison finds identity);
    the synthetic checkpoint is made, profiled, quantized and timed; one JSON holds it all."""
    out = tmp_path / "gc.json"
    argv = ["--device", "cpu", "--quick", "--model", str(tiny), "--big-layers", "1", "--iters", "1", "--out", str(out)]
    assert _gpu_check().main(argv) == 0
    res = json.loads(out.read_text())
    assert not res["budget_exhausted"]
    ops = res["builtin"]["cpu"]
    names = ["profile", "prune_reap", "prune_output_error", "quantize_gptq4", "quantize_gptq3", "prune_atom_heapr"]
    assert set(ops) == {*names, "eval_q4", "eval_pruned"}
    assert all(op["ok"] and op["wall_s"] > 0 for op in ops.values()), ops
    cmp = res["compare"]
    assert res["compare_all_ok"] and all(c["ok"] for c in cmp.values()), cmp
    assert cmp["profile"]["max_rel_l2"] == 0 and cmp["profile"]["tokens_moved_frac"] == 0  # same device: identical
    for q in ("quantize_gptq4", "quantize_gptq3"):
        assert cmp[q]["codes"] > 0 and cmp[q]["codes_equal_frac"] == 1.0
    assert cmp["prune_reap"]["kept_identical"] and cmp["prune_reap"]["kept_lists"] == 3
    assert (
        cmp["prune_atom_heapr"]["kept_identical"] and cmp["prune_atom_heapr"]["kept_lists"] == 6
    )  # experts + channels
    assert cmp["eval_q4"]["kl_dev"] == cmp["eval_q4"]["kl_cpu"] > 0
    k = res["kernel"]["q4_logits"]
    assert k["ok"] and k["packed_layers"] == 3 and k["torch_vs_cpu_dense_rel_max_abs"] == 0
    big_ops = ("make", "profile", "quantize_gptq4", "prune_output_error", "prune_atom_heapr", "merge")
    assert set(res["big"]) == set(big_ops) and all(res["big"][op]["ok"] for op in big_ops), res["big"]
    tp = res["throughput"]["big_q4"]
    assert tp["ok"]
    for name in ("dense_bf16_default_kernel", "dense_bf16_eager", "packed4_torch"):
        assert tp[name]["tokens_per_s_b1"] > 0 and tp[name]["tokens_per_s_b64"] > 0
    assert tp["packed4_torch"]["resident_bytes"] < tp["dense_bf16_eager"]["resident_bytes"]


def test_budget_and_failures_are_recorded_not_fatal(tiny, tmp_path):
    """A missing model makes every op fail (recorded with its error, dependants skipped); a spent budget skips the
    rest cleanly; the JSON is still written and the script returns normally."""
    gc = _gpu_check()
    out = tmp_path / "fail.json"
    assert gc.main(["--device", "cpu", "--quick", "--model", str(tmp_path / "nope"), "--parts", "builtin",
                    "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    ops = res["builtin"]["cpu"]
    assert not ops["profile"]["ok"] and "exited with 2" in ops["profile"]["error"]
    assert ops["prune_reap"]["skipped"].startswith("needs profile")
    assert not res["compare_all_ok"]
    out2 = tmp_path / "budget.json"
    assert gc.main(["--device", "cpu", "--quick", "--model", str(tiny), "--budget-s", "0", "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["budget_exhausted"]
    assert res2["builtin"]["cpu"]["profile"]["skipped"].startswith("time budget")
    assert res2["big"]["make"]["skipped"].startswith("time budget")
