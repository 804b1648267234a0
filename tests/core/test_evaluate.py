"""Evaluation: perplexity on non-overlapping windows, KL / top-1 against a base model, sizes."""

from __future__ import annotations

import torch
from conftest import build_tiny
from moecompress.calibration.sets import eval_set, load_tokenizer
from transformers import AutoModelForCausalLM

from moecompress.core.evaluate import evaluate, logit_agreement, unigram_perplexity
from moecompress.core.writer import dir_bytes


def test_perplexity_matches_manual_computation(tmp_path, tokenizer_dir):
    path = build_tiny("mixtral", tmp_path / "m", tokenizer_dir)
    res = evaluate(path, data="bible", seq_len=32, batch_size=3, max_windows=5)
    ids = eval_set(load_tokenizer(path), "bible", 32, 5).input_ids
    assert ids.shape == (5, 32)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(res["perplexity"]["bible"] - nll.exp().item()) < 1e-3 * nll.exp().item()
    assert res["perplexity"]["all"] == res["perplexity"]["bible"]
    assert res["kl_to_base"] is None and res["top1_agreement"] is None
    assert res["params"] == sum(p.numel() for p in model.parameters())
    assert res["bytes"] == dir_bytes(path) > 0


def test_agreement_with_itself_and_with_another_model(tmp_path, tokenizer_dir):
    a = build_tiny("qwen3_moe", tmp_path / "a", tokenizer_dir, seed=0)
    b = build_tiny("qwen3_moe", tmp_path / "b", tokenizer_dir, seed=1)
    same = evaluate(a, base=a, data="mixed", seq_len=16, max_windows=2)
    assert abs(same["kl_to_base"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert set(same["perplexity"]) == {"austen", "bible", "python", "shakespeare", "all"}
    other = evaluate(a, base=b, data="mixed", seq_len=16, max_windows=2)
    assert other["kl_to_base"] > 1e-4 and other["top1_agreement"] < 1.0


def test_logit_agreement_values():
    base = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    model = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    kl, agree = logit_agreement(base, model)
    pb = base[1].softmax(-1)
    assert kl[0].abs() < 1e-7 and abs(kl[1] - (pb * (pb.log() - model[1].log_softmax(-1))).sum()) < 1e-6
    assert agree.tolist() == [1.0, 0.0]


def test_unigram_baseline_is_a_real_distribution(tmp_path, tokenizer_dir):
    path = build_tiny("olmoe", tmp_path / "m", tokenizer_dir)
    uni = unigram_perplexity(path, "mixed", 32)
    assert set(uni) == {"austen", "bible", "python", "shakespeare", "all"}
    assert all(1.0 < v < 320 for v in uni.values())  # better than uniform over the 320-token vocabulary
