"""Tiny real transformers MoE models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MOECOMPRESS_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

torch.set_num_threads(1)

VOCAB = 320
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def tiny_config(model_type: str, **over: object):
    """A tiny config; expert width 24 (not a multiple of 16 on purpose)."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if model_type == "mixtral":
        base.update(num_local_experts=6, intermediate_size=24, head_dim=8)
    elif model_type == "qwen2_moe":
        base.update(
            num_experts=6,
            moe_intermediate_size=24,
            intermediate_size=40,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    elif model_type == "qwen3_moe":
        base.update(
            num_experts=6,
            moe_intermediate_size=24,
            intermediate_size=40,
            head_dim=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    elif model_type == "olmoe":
        base.update(num_experts=6, intermediate_size=24, norm_topk_prob=False)
    elif model_type == "deepseek_v3":
        base.update(
            n_routed_experts=8,
            moe_intermediate_size=24,
            intermediate_size=40,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            num_key_value_heads=4,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            rope_interleave=False,
        )
    base.update(over)
    return AutoConfig.for_model(model_type, **base)


def make_tokenizer(folder: Path) -> Path:
    """The byte-level BPE tokenizer of the test suite (vocab 320), trained on the built-in calibration text."""
    from moecompress.calibration.sets import load_texts

    text = "\n\n".join(load_texts("mixed", "calib").values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10000] for i in range(0, len(text), 10000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def build_tiny(
    model_type: str,
    folder: Path,
    tokenizer_dir: Path,
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    **over: object,
) -> Path:
    """Save a tiny randomly initialized model of ``model_type`` (with non-trivial router/bias values), in ``dtype``
    when given (e.g. bfloat16, as most releases are)."""
    return save_random(tiny_config(model_type, **over), folder, tokenizer_dir, seed, dtype=dtype)


def save_random(
    cfg: Any, folder: Path, tokenizer_dir: Path, seed: int = 0, *, dtype: torch.dtype | None = None
) -> Path:
    """Save the model of config ``cfg`` randomly initialized (weights N(0, 0.08), correction biases U(-0.05, 0.05)),
    in ``dtype`` when given, with the test tokenizer beside it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(params=FAMILIES)
def tiny_model(request, tmp_path, tokenizer_dir) -> Path:
    return build_tiny(request.param, tmp_path / request.param, tokenizer_dir)


def reload_clean(path: Path):
    """from_pretrained with no missing/unexpected/mismatched keys and no transformers or weight warning."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(
                path, experts_implementation="eager", output_loading_info=True
            )
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not [
        str(w.message)
        for w in caught
        if "moecompress" in str(w.filename) or "weight" in str(w.message) or "key" in str(w.message)
    ]
    return model.eval()


def write_with_transform(src: Path, transform: object, out: Path) -> None:
    """Write ``src`` through one ``transform`` (e.g. a QuantTransform with a hand-made bit plan) on the engine with
    no calibration tokens, as a command's output (config, manifest), without a report."""
    from moecompress.core.checkpoint import Checkpoint
    from moecompress.core.engine import Engine
    from moecompress.core.manifest import Manifest
    from moecompress.core.output import Output

    ck = Checkpoint(src)
    with Output(out, False) as o:
        o.add_globals(ck, [transform])
        Engine(ck, torch.zeros(0, 1, dtype=torch.long), 4, torch.device("cpu"), "q").run([transform], emit=o.add_layer)
        cfg = ck.config.to_dict()
        transform.config(cfg)
        man = Manifest("quantize", "quantized", "moecompress.load", str(ck.path), ck.fingerprint, None,
                       ck.num_params, ck.bytes_on_disk)  # fmt: skip
        o.finish(ck, cfg, man, report=False)


def load_bench(name: str) -> Any:
    """The module bench/NAME.py of this checkout (bench/ is not a package), for tests of the prepared benches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
