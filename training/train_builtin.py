"""Train the built-in moecompress model: a small Qwen3-MoE on four real text domains.

Reproducible (seeded) and CPU-only.  Steps:
  1. ``python training/prepare_corpora.py``   (domain text -> training/work + calibration/data)
  2. ``python training/train_builtin.py``      (tokenizer + model -> moecompress/builtin/model)

The LM loss is plain next-token cross-entropy; router balance uses a *per-layer*
switch-transformer loss (E * sum_e f_e P_e averaged over layers).  transformers' own
aux loss pools all layers, which let experts die in a trial run.

The timing and loss curve of the run are written to reports/builtin_training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "training" / "work"
OUT = ROOT / "moecompress" / "builtin" / "model"
DOMAINS = ("shakespeare", "bible", "python", "austen")
EOS = "<|endoftext|>"


def train_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(WORK / f"{d}.train.txt") for d in DOMAINS], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=512,
    )


def encode_domain(tok: PreTrainedTokenizerFast, domain: str) -> torch.Tensor:
    text = (WORK / f"{domain}.train.txt").read_text(encoding="utf-8")
    ids: list[int] = []
    for part in [text[i : i + 200_000] for i in range(0, len(text), 200_000)]:
        ids.extend(tok(part, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int32)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Per-layer switch loss, averaged over MoE layers."""
    losses = []
    for logits in router_logits:  # [T, E]
        probs = logits.float().softmax(-1)
        E = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        f = F.one_hot(top, E).float().sum(1).mean(0) / top_k  # [E] fraction of routings
        P = probs.mean(0)  # [E]
        losses.append(E * (f * P).sum())
    return torch.stack(losses).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--balance", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads thrash when anything else runs
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok = train_tokenizer(args.vocab)
    data = {d: encode_domain(tok, d) for d in DOMAINS}
    t_tok = time.time() - t0
    print(f"tokenizer + encoding: {t_tok:.0f}s; tokens per domain:", {d: len(v) for d, v in data.items()}, flush=True)

    config = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,  # unused: no dense layers
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        router_aux_loss_coef=args.balance,
        output_router_logits=False,
    )
    model = Qwen3MoeForCausalLM._from_config(config, experts_implementation="eager")  # fastest on CPU
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    )
    g = torch.Generator().manual_seed(args.seed)
    per = args.batch // len(DOMAINS)
    log = []
    t_train = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    for step in range(args.steps):
        rows = []
        for d in DOMAINS:
            starts = torch.randint(0, len(data[d]) - args.seq - 1, (per,), generator=g)
            rows.extend(data[d][s : s + args.seq + 1] for s in starts.tolist())
        batch = torch.stack(rows).long()
        x, y = batch[:, :-1], batch[:, 1:]
        out = model(input_ids=x, output_router_logits=True)
        lm = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        bal = balance_loss(out.router_logits, config.num_experts_per_tok)
        loss = lm + args.balance * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            tps = (step + 1) * x.numel() / el
            print(
                f"step {step:5d} lm {lm.item():.3f} bal {bal.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                f"{tps:.0f} tok/s {el / 60:.1f} min",
                flush=True,
            )
            log.append(
                {
                    "step": step,
                    "lm_loss": round(lm.item(), 4),
                    "balance": round(bal.item(), 4),
                    "elapsed_s": round(el, 1),
                }
            )
        if (step + 1) % args.ckpt_every == 0 or step == args.steps - 1:
            save(model, tok, WORK / "ckpt")
            (WORK / "ckpt" / "train_log.json").write_text(json.dumps({"step": step + 1, "log": log}))
    train_s = time.time() - t_train
    save(model, tok, OUT)
    report = {
        "script": "training/train_builtin.py",
        "args": vars(args),
        "params": n_params,
        "tokens_per_domain": {d: len(v) for d, v in data.items()},
        "tokenizer_and_encoding_s": round(t_tok, 1),
        "train_s": round(train_s, 1),
        "train_tokens": args.steps * args.batch * args.seq,
        "torch": torch.__version__,
        "threads": args.threads,
        "log": log,
    }
    (ROOT / "reports").mkdir(exist_ok=True)
    (ROOT / "reports" / "builtin_training.json").write_text(json.dumps(report, indent=1))
    print(f"done: {train_s / 60:.1f} min of training; model in {OUT}")


def save(model: Qwen3MoeForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sd_dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out)
    model.to(sd_dtype)
    tok.save_pretrained(out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
