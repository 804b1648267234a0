"""The report's view of a byte-budget plan: what each expert got, predicted vs measured KL."""

from __future__ import annotations

from moecompress.core.manifest import Manifest
from moecompress.report.actions import actions_section


def _manifest() -> Manifest:
    m = Manifest("compress --budget", "budget_exact", "moecompress.load", "src", "fp", None, 100, 1000)
    m.add("budget", {
        "layout": "exact", "source_width": 64, "source_experts": 4, "predicted_cost": 0.25, "total_bytes": 500,
        "layers": {"0": {"kept_experts": [0, 2, 3], "widths": [64, 32, 48], "bits": [4, 2, 8]},
                   "1": {"kept_experts": [1, 2], "widths": [64, 64], "bits": [3, 3]}},
    })  # fmt: skip
    return m


def test_the_plan_is_drawn_per_expert_with_predicted_and_measured_kl():
    html = actions_section(_manifest(), None, None, None, "r", {"kl_to_base": 0.125})
    assert "What each expert got" in html and "byte-budget plan" in html
    assert 'data-key="budget.kept" data-value="5"' in html  # 3 + 2 experts kept
    assert 'data-key="budget.measured_kl" data-value="0.125"' in html
    assert html.count("<svg") == 2  # bits and kept channels
    assert 'data-value="0.5"' in html  # expert 2 of layer 0 kept 32 of 64 channels
    without = actions_section(_manifest(), None, None, None, "r")
    assert "moecompress eval OUT" in without and "budget.measured_kl" not in without


def test_the_quantize_only_guard_says_which_plan_was_written():
    m = _manifest()
    m.stage("budget")["check"] = {"chosen": "bits_only", "joint_kl": 0.02, "bits_only_kl": 0.01}  # type: ignore[index]
    html = actions_section(m, None, None, None, "r")
    assert 'data-key="budget.written" data-value="bits_only"' in html and "0.02" in html and "0.01" in html
    assert "budget.written" not in actions_section(_manifest(), None, None, None, "r")
