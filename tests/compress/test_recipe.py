"""Recipes are checked completely before any work: every refusal is one line saying what to change."""

from __future__ import annotations

import json

import pytest

from moecompress.compress.recipe import Stage, from_flags, load, parse
from moecompress.core.errors import UserError


def test_yaml_json_and_flags_give_the_same_stages(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("stages:\n  - prune: {ratio: 0.25}\n  - quantize: {bits: 3}\n")
    j = tmp_path / "r.json"
    j.write_text(json.dumps([{"prune": {"ratio": 0.25}}, {"quantize": {"bits": 3}}]))
    want = [Stage("prune", {"ratio": 0.25}), Stage("quantize", {"bits": 3})]
    assert load(y) == load(j) == from_flags(0.25, None, None, 3) == want
    assert [s.op for s in parse([{"merge": {"ratio": 0.5}}, {"atom": {"ratio": 0.2, "score": "magnitude"}}])] == [
        "merge",
        "atom",
    ]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([], "no stages"),
        ({"prune": {"ratio": 0.2}}, "list of stages"),
        ([{"prune": {"ratio": 0.2}, "quantize": {"bits": 3}}], "one operation"),
        ([{"distill": {}}], "unknown operation 'distill'"),
        ([{"prune": {"ratoi": 0.2}}], "unknown option 'ratoi'"),
        ([{"prune": {"ratio": 1.5}}], "ratio is 1.5"),
        ([{"prune": {"ratio": True}}], "ratio is True"),
        ([{"quantize": {"bits": 5}}], "bits is 5"),
        ([{"quantize": {}}], "needs bits"),
        ([{"quantize": {"bits": 4}}, {"prune": {"ratio": 0.2}}], "prune after quantize"),
        ([{"prune": {"ratio": 0.2}}, {"merge": {"ratio": 0.2}}], "keep one of them"),
        ([{"prune": "0.2"}], "must be a mapping"),
    ],
)
def test_bad_recipes_are_refused_in_one_line(data, says):
    with pytest.raises(UserError, match=says) as err:
        parse(data)
    assert "\n" not in str(err.value)


def test_unreadable_files_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [prune: {ratio: 0.2}\n")
    with pytest.raises(UserError, match="cannot be read"):
        load(bad)
    with pytest.raises(UserError, match="not a file"):
        load(tmp_path)
    with pytest.raises(UserError, match="nothing to do"):
        from_flags(None, None, None, None)
