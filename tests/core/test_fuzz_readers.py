"""Fuzzing the two readers of untrusted JSON: config.json (Checkpoint) and the report's sidecars.

Whatever the values, the config reader either accepts a config whose counts agree with the tensors or raises one
UserError line; the report always renders (bad fields become "problems" lines) and stays small and fast.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import build_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.errors import UserError
from moecompress.core.manifest import LAYOUTS, OPS
from moecompress.report import build_report

FAST = settings(
    max_examples=40,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)

CONFIG_KEYS = (
    "num_experts",
    "num_experts_per_tok",
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "moe_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
    "num_local_experts",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    d = build_tiny("qwen3_moe", tmp_path_factory.mktemp("fuzz") / "m", tokenizer_dir)
    Checkpoint(d)  # warm up transformers' lazy imports so the deadline measures the reader
    return d


@FAST
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(scalars, json_values), min_size=1, max_size=3))
def test_config_reader_accepts_consistent_configs_or_says_one_line(model_dir, changes):
    original = json.loads((model_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "m"
        shutil.copytree(model_dir, d)
        (d / "config.json").write_text(json.dumps({**original, **changes}))
        try:
            ck = Checkpoint(d)
        except UserError as err:
            assert str(err) and "\n" not in str(err)
            return
    # accepted: every fact the rest of the tool reads is a whole number and they agree with the weights
    assert 1 <= ck.top_k <= ck.num_experts == 6
    assert ck.config.hidden_size == 32 and ck.config.vocab_size == 320 and ck.config.num_hidden_layers == 3
    assert ck.moe_layers and all(0 <= l < 3 for l in ck.moe_layers)


SIDECARS = ("profile.json", "moecompress.json", "bit_plan.json", "eval.json")
profile_like = st.fixed_dictionaries(
    {
        "moe_layers": st.one_of(st.lists(st.integers(-5, 10**13), max_size=4), json_values),
        "num_experts": st.one_of(st.integers(-5, 10**400), json_values),
        "top_k": scalars,
        "experts": st.lists(
            st.fixed_dictionaries(
                {"layer": scalars, "expert": st.one_of(st.integers(-5, 10**15), scalars), "reap": scalars}
            ),
            max_size=6,
        ),
        "domains": json_values,
        "warnings": json_values,
    }
)
manifest_like = st.fixed_dictionaries(
    {
        "command": scalars,
        "experts_before": st.one_of(st.integers(-5, 10**12), scalars),
        "layers": st.one_of(
            st.dictionaries(
                st.one_of(st.text(max_size=3), st.integers(0, 10**9).map(str)),
                st.one_of(
                    st.fixed_dictionaries({"kept": st.lists(st.integers(-3, 10**12), max_size=4)}),
                    st.fixed_dictionaries({"clusters": st.lists(st.lists(st.integers(-3, 10**9), max_size=3))}),
                    json_values,
                ),
                max_size=3,
            ),
            json_values,
        ),
        "protected": json_values,
        "bytes_before": scalars,
        "bytes_after": scalars,
        "source_fingerprint": json_values,
    }
)
# schema 2 with valid common fields, so that the stage sections (untrusted too) reach the report's renderers
stage_like = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS)},
    optional={
        "experts_before": st.one_of(st.integers(-5, 10**12), scalars),
        "experts_after": st.one_of(st.integers(-5, 10**12), scalars),
        "layers": st.one_of(
            st.dictionaries(
                st.one_of(st.text(max_size=3), st.integers(0, 10**9).map(str)),
                st.one_of(
                    st.fixed_dictionaries({"kept": st.lists(st.integers(-3, 10**12), max_size=4)}),
                    st.fixed_dictionaries({"clusters": st.lists(st.lists(st.integers(-3, 10**9), max_size=3))}),
                    st.fixed_dictionaries(
                        {"kept_experts": st.lists(st.integers(-3, 10**9), max_size=4), "widths": json_values}
                    ),
                    json_values,
                ),
                max_size=3,
            ),
            json_values,
        ),
        "protected": json_values,
        "protected_why": json_values,
        "profile": json_values,
        "method": json_values,
        "ratio": json_values,
        "bits": json_values,
    },
)
stage_manifest_like = st.fixed_dictionaries(
    {
        "schema": st.just(2),
        "command": st.text(max_size=8),
        "layout": st.sampled_from(LAYOUTS),
        "load_with": st.text(max_size=8),
        "source_model": st.text(max_size=8),
        "source_fingerprint": st.text(max_size=8),
        "calibration": st.one_of(st.none(), st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
        "params_before": st.integers(0, 10**12),
        "bytes_before": st.integers(0, 10**12),
        "params_after": st.one_of(st.none(), st.integers(0, 10**12)),
        "bytes_after": st.one_of(st.none(), st.integers(0, 10**12)),
        "elapsed_s": st.one_of(st.none(), st.floats(0, 1e6)),
        "warnings": st.lists(st.text(max_size=8), max_size=3),
        "stages": st.lists(stage_like, max_size=3),
    }
)
plan_like = st.fixed_dictionaries(
    {
        "layers": st.one_of(
            st.dictionaries(
                st.one_of(st.text(max_size=3), st.integers(-2, 10**12).map(str)),
                st.fixed_dictionaries(
                    {
                        "experts": st.lists(
                            st.fixed_dictionaries({"expert": st.integers(-2, 10**12), "bits": scalars}), max_size=4
                        )
                    }
                ),
                max_size=3,
            ),
            json_values,
        ),
        "few_token_experts": json_values,
    }
)
eval_like = st.fixed_dictionaries(
    {"perplexity": json_values, "kl_to_base": scalars, "bytes": scalars, "params": scalars}
)


@FAST
@given(
    docs=st.tuples(
        st.one_of(profile_like, json_values),
        st.one_of(manifest_like, stage_manifest_like, json_values),
        st.one_of(plan_like, json_values),
        st.one_of(eval_like, json_values),
    )
)
def test_report_renders_any_sidecars_quickly(docs):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        for name, doc in zip(SIDECARS, docs, strict=True):
            (run / name).write_text(json.dumps(doc))
        t0 = time.monotonic()
        html = build_report([run])
        assert time.monotonic() - t0 < 5
    assert html.startswith("<!DOCTYPE html>") and html.endswith("</html>")
    assert len(html) < 5_000_000


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("profile.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("moecompress.json", '{"a":' * 200 + "1" + "}" * 200, "nested too deeply"),
        ("profile.json", json.dumps({"moe_layers": [1], "num_experts": 10**400, "experts": []}), "out of range"),
        ("moecompress.json", '{"bytes_after": ' + "9" * 5000 + "}", "cannot be read"),
        ("moecompress.json", json.dumps({"command": "prune", "experts_before": 10**12, "layers": {"1": {"kept": [0]}}}),
         "experts_before = 1000000000000 is out of range"),
        ("moecompress.json", json.dumps({"schema": 2, "command": "prune", "stages": []}), "unreadable manifest"),
        ("moecompress.json", json.dumps({"command": 7}), "field command is 7"),
        ("bit_plan.json", json.dumps({"experts": [{"layer": 1, "expert": 10**12, "bits": 4}]}), ""),
        ("profile.json", json.dumps({"moe_layers": list(range(3)), "num_experts": 4,
                                     "experts": [{"layer": 0, "expert": 0, "reap": float("inf")}]}), "out of range"),
    ],
)  # fmt: skip
def test_report_names_each_malformed_sidecar(tmp_path, name, text, problem):
    (tmp_path / name).write_text(text)
    t0 = time.monotonic()
    html = build_report([tmp_path])
    assert time.monotonic() - t0 < 10
    assert problem in " ".join(html.split())
