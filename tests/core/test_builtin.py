"""The built-in model ships inside the package and is a trained language model, not random weights."""

from __future__ import annotations

import json

import pytest
from moecompress.calibration.sets import DOMAINS, load_texts

from moecompress.core.checkpoint import Checkpoint, builtin_model_dir
from moecompress.core.evaluate import evaluate, unigram_perplexity
from moecompress.profile.run import run_profile

pytestmark = pytest.mark.skipif(
    not (builtin_model_dir() / "config.json").exists(), reason="the built-in model has not been trained yet"
)


def test_builtin_data_ships_with_the_package():
    for split in ("calib", "eval"):
        texts = load_texts("mixed", split)
        assert sorted(texts) == sorted(DOMAINS) and all(len(t) > 50_000 for t in texts.values())
    # held-out and calibration text never overlap
    for d in DOMAINS:
        ev, ca = load_texts(d, "eval")[d], load_texts(d, "calib")[d]
        assert ev[:2000] not in ca and ca[:2000] not in ev


def test_builtin_model_facts():
    ck = Checkpoint(None)
    assert ck.family.name == "Qwen3-MoE" and ck.num_experts == 16 and ck.top_k == 2
    assert len(ck.moe_layers) == 6 and ck.bytes_on_disk < 50 * 1024**2


def test_builtin_model_beats_unigram_in_every_domain():
    res = evaluate(None, data="mixed", seq_len=128, max_windows=4)
    uni = unigram_perplexity(None, "mixed", 128)
    for d in DOMAINS:
        assert res["perplexity"][d] < 0.5 * uni[d], (d, res["perplexity"][d], uni[d])


def test_builtin_profile_has_every_expert_alive_and_specialized(tmp_path):
    prof = run_profile(None, tmp_path / "run", "mixed", samples=16, seq_len=128)
    meta = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert meta["tokens"] == 16 * 128
    dead = [e for e in prof.meta["experts"] if e["tokens"] == 0]
    assert not dead
    # domain specialization: in some layer, an expert's share of one domain's routings is >= 2x its fair share
    counts = {d: meta["domains"][d]["counts"] for d in meta["domains"]}
    best = 0.0
    for li in range(len(meta["moe_layers"])):
        for e in range(16):
            for d in counts:
                share = counts[d][li][e] / max(sum(counts[d][li]), 1)
                best = max(best, share * 16)
    assert best >= 2.0
