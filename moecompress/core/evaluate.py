"""`moecompress eval`: held-out perplexity per domain, and agreement with a base model (KL, top-1)."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from ..calibration.sets import check_seq_len, encode_text, eval_set, load_texts, load_tokenizer
from .checkpoint import resolve_model
from .errors import UserError
from .loading import load
from .progress import progress_bar
from .writer import dir_bytes


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def count_params(model: torch.nn.Module) -> int:
    """Parameters as a dense model counts them: packed (quantized) expert modules report their logical size."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(m.logical_numel() for m in model.modules() if hasattr(m, "logical_numel"))


def logit_agreement(base_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(base || model) and top-1 agreement. Inputs [..., V]; outputs [...]."""
    lb = torch.log_softmax(base_logits.float(), -1)
    lm = torch.log_softmax(logits.float(), -1)
    kl = (lb.exp() * (lb - lm)).sum(-1)
    agree = (base_logits.argmax(-1) == logits.argmax(-1)).float()
    return kl, agree


@contextmanager
def no_hf_progress() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar: eval shows its own progress, and an error stays one line."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def evaluate(
    model: str | Path | None = None,
    base: str | Path | None = None,
    data: str | Path = "mixed",
    seq_len: int = 256,
    batch_size: int = 8,
    device: torch.device | None = None,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Evaluate a model folder; returns the eval JSON dict (perplexity per domain + 'all', KL, top-1, size)."""
    t0 = time.time()
    device = device or torch.device("cpu")
    path = resolve_model(model)
    with no_hf_progress():
        m = load(path, device)
        check_seq_len(seq_len, m.config)
        b = load(resolve_model(base), device) if base is not None else None
    tokens = eval_set(load_tokenizer(path), data, seq_len, max_windows)
    if tokens.input_ids.max() >= m.config.get_text_config().vocab_size:  # (a multimodal wrapper: its text model's)
        raise UserError("the tokenizer produces ids beyond the model's vocabulary: the folder's tokenizer is wrong")
    doms = tokens.domain_names
    nll = {d: 0.0 for d in doms}
    count = {d: 0 for d in doms}
    kl_sum = agree_sum = 0.0
    n_pos = 0
    with progress_bar() as bar:
        task = bar.add_task("eval", total=tokens.input_ids.shape[0])
        for start in range(0, tokens.input_ids.shape[0], batch_size):
            ids = tokens.input_ids[start : start + batch_size].to(device)  # [B, S]
            logits = m(input_ids=ids).logits[:, :-1].float()  # [B, S-1, V]
            target = ids[:, 1:]
            tok_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, S-1]
            for r in range(ids.shape[0]):
                d = tokens.domains[start + r]
                nll[d] += tok_nll[r].sum().item()
                count[d] += tok_nll.shape[1]
            if b is not None:
                kl, agree = logit_agreement(b(input_ids=ids).logits[:, :-1], logits)
                kl_sum += kl.sum().item()
                agree_sum += agree.sum().item()
                n_pos += kl.numel()
            bar.advance(task, ids.shape[0])
    ppl = {d: float(torch.tensor(nll[d] / count[d]).exp()) for d in doms}
    ppl["all"] = float(torch.tensor(sum(nll.values()) / sum(count.values())).exp())
    return {
        "model": str(path),
        "base": str(resolve_model(base)) if base is not None else None,
        "data": str(data),
        "seq_len": seq_len,
        "windows": tokens.input_ids.shape[0],
        "tokens": {d: count[d] for d in doms},
        "perplexity": ppl,
        "kl_to_base": kl_sum / n_pos if b is not None else None,
        "top1_agreement": agree_sum / n_pos if b is not None else None,
        "params": count_params(m),
        "bytes": dir_bytes(path),
        "device": device.type,
        "peak_memory_bytes": peak_memory_bytes(device),
        "elapsed_s": round(time.time() - t0, 2),
    }


def unigram_perplexity(model: str | Path | None = None, data: str | Path = "mixed", seq_len: int = 256) -> dict:
    """Baseline: perplexity of an add-one unigram model fitted on the calibration split, scored on the same
    eval windows as ``evaluate`` (built-in sets; for a file, fitted on the file itself)."""
    tok = load_tokenizer(resolve_model(model))
    tokens = eval_set(tok, data, seq_len)
    fit_texts = load_texts(data, "calib")  # built-in sets: the calibration split; a file: the file itself
    V = len(tok)
    counts = torch.ones(V, dtype=torch.float64)
    for text in fit_texts.values():
        ids = encode_text(tok, text)
        counts += torch.bincount(ids, minlength=V).double()[:V]
    logp = (counts / counts.sum()).log()
    out: dict[str, float] = {}
    tot, n = 0.0, 0
    for d in tokens.domain_names:
        rows = tokens.input_ids[[i for i, x in enumerate(tokens.domains) if x == d]][:, 1:]
        s = -logp[rows].sum().item()
        out[d] = float(torch.tensor(s / rows.numel()).exp())
        tot += s
        n += rows.numel()
    out["all"] = float(torch.tensor(tot / n).exp())
    return out
