"""Calibration and evaluation text: the built-in domain sets, .txt and .jsonl files, tokenized into windows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..core.errors import UserError

DOMAINS = ("shakespeare", "bible", "python", "austen")
MIXED = "mixed"
BUILTIN_SETS = (*DOMAINS, MIXED)


def _builtin_file(domain: str, split: str) -> str:
    return (resources.files("moecompress.calibration") / "data" / f"{domain}.{split}.txt").read_text(encoding="utf-8")


def load_texts(spec: str | Path, split: str = "calib") -> dict[str, str]:
    """Texts by domain. ``spec``: a built-in set name (a domain or 'mixed') or a .txt / .jsonl path.

    .jsonl lines are objects with a "text" field and an optional "domain" field.
    ``split`` picks the built-in file: 'calib' (calibration) or 'eval' (held-out evaluation).
    """
    s = str(spec)
    if s in BUILTIN_SETS:
        names = DOMAINS if s == MIXED else (s,)
        return {d: _builtin_file(d, split) for d in names}
    p = Path(s).expanduser()
    if not p.exists():
        raise UserError(f"calibration data {s!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a file")
    if p.is_dir():
        raise UserError(f"calibration data {p} is a folder: give a .txt or .jsonl file")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read calibration file {p} ({err}): give a UTF-8 .txt or .jsonl file") from None
    if p.suffix == ".jsonl":
        texts: dict[str, list[str]] = {}
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f'{p}:{n} is not a JSON object with a "text" field') from None
            texts.setdefault(str(obj.get("domain", p.stem)), []).append(str(text))
        out = {d: "\n\n".join(v) for d, v in texts.items()}
    else:
        out = {p.stem: raw}
    if not any(t.strip() for t in out.values()):
        raise UserError(f"calibration file {p} is empty: give a file with text")
    return out


@dataclass
class TokenSet:
    """Token windows [N, S] and the domain of each window."""

    input_ids: torch.Tensor  # [N, S]
    domains: list[str]
    name: str
    seed: int | None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def domain_names(self) -> list[str]:
        return sorted(set(self.domains))

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes())
        h.update(json.dumps(self.domains).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "samples": self.input_ids.shape[0],
            "seq_len": self.input_ids.shape[1],
            "seed": self.seed,
            "domains": {d: self.domains.count(d) for d in self.domain_names},
        }


def encode_text(tokenizer: Any, text: str) -> torch.Tensor:
    ids: list[int] = []
    step = 100_000
    for i in range(0, len(text), step):  # chunked so huge files don't hit the tokenizer's max length warning
        ids.extend(tokenizer(text[i : i + step], add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def check_seq_len(seq_len: int, config: Any) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} is too small: use at least 2")
    if limit and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} is larger than the model's context ({limit}): use at most {limit}")


def calibration_set(
    tokenizer: Any, spec: str | Path, samples: int, seq_len: int, seed: int = 0, split: str = "calib"
) -> TokenSet:
    """``samples`` random windows of ``seq_len`` tokens (seeded), spread evenly over the domains."""
    if samples < 1:
        raise UserError(f"--samples {samples} must be at least 1")
    texts = load_texts(spec, split)
    g = torch.Generator().manual_seed(seed)
    names = sorted(texts)
    rows: list[torch.Tensor] = []
    doms: list[str] = []
    for i, d in enumerate(names):
        n = samples // len(names) + (1 if i < samples % len(names) else 0)
        if n == 0:
            continue
        ids = encode_text(tokenizer, texts[d])
        if len(ids) < seq_len:
            raise UserError(
                f"calibration text {d!r} has {len(ids)} tokens, fewer than --seq-len {seq_len}: "
                "give more text or a smaller --seq-len"
            )
        starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=g)
        rows.extend(ids[s : s + seq_len] for s in starts.tolist())
        doms.extend([d] * n)
    return TokenSet(torch.stack(rows), doms, str(spec), seed)


def eval_set(tokenizer: Any, spec: str | Path, seq_len: int, max_windows: int | None = None) -> TokenSet:
    """Non-overlapping windows of held-out text per domain (the built-in sets use their 'eval' split)."""
    texts = load_texts(spec, "eval")
    rows: list[torch.Tensor] = []
    doms: list[str] = []
    for d in sorted(texts):
        ids = encode_text(tokenizer, texts[d])
        n = len(ids) // seq_len
        if n == 0:
            raise UserError(f"evaluation text {d!r} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
        if max_windows:
            n = min(n, max_windows)
        rows.extend(ids[: n * seq_len].view(n, seq_len))
        doms.extend([d] * n)
    return TokenSet(torch.stack(rows), doms, str(spec), None)


def load_tokenizer(path: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # a tokenizer.json of the wrong structure raises KeyError, TypeError, tokenizers' own...
        first = (str(err).splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot load the tokenizer from {path} ({type(err).__name__}: {first}): its tokenizer files are broken"
        ) from None
