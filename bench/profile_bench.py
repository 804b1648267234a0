"""Profile benchmark: (1) time overhead of the profiling pass vs a plain forward over the same tokens,
(2) peak RSS of `moecompress profile` on a synthetic Qwen3-MoE checkpoint several times larger than that RSS.

Run:  OMP_NUM_THREADS=2 .venv/bin/python bench/profile_bench.py [--samples 64] [--synthetic-layers 24]
Writes reports/profile_bench.json and prints a table. Compare ratios within one run (machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MOECOMPRESS_QUIET", "1")

from moecompress.calibration.sets import calibration_set, load_tokenizer  # noqa: E402

from moecompress.core.checkpoint import Checkpoint, builtin_model_dir  # noqa: E402
from moecompress.core.loading import load  # noqa: E402
from moecompress.profile.run import collect, run_profile  # noqa: E402


def overhead(samples: int, seq_len: int, batch: int, repeats: int) -> dict:
    ck = Checkpoint(None)
    tokens = calibration_set(load_tokenizer(ck.path), "mixed", samples, seq_len, seed=0)
    t = time.perf_counter()
    model = load(ck.path)
    t_load = time.perf_counter() - t
    fwd, prof, e2e = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for ids in tokens.input_ids.split(batch):
                model(input_ids=ids)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        collect(ck, tokens, batch_size=batch)
        prof.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            run_profile(None, Path(d) / "run", "mixed", samples, seq_len, 0, batch)
            e2e.append(time.perf_counter() - t)
    f, p, e = min(fwd), min(prof), min(e2e)
    return {
        "model": str(ck.path),
        "tokens": tokens.num_tokens,
        "plain_forward_s": round(f, 3),
        "plain_load_s": round(t_load, 3),
        "profile_pass_s": round(p, 3),
        "profile_end_to_end_s": round(e, 3),
        "ratio_pass_vs_forward": round(p / f, 3),
        "ratio_end_to_end_vs_load_plus_forward": round(e / (f + t_load), 3),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def synthetic_checkpoint(folder: Path, layers: int, hidden: int, experts: int, width: int, top_k: int) -> int:
    """A Qwen3-MoE-shaped random bf16 checkpoint written shard by shard (never whole in memory)."""
    folder.mkdir(parents=True)
    heads, kv, hd, vocab = hidden // 64, max(1, hidden // 256), 64, 8192
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "moe_intermediate_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_experts": experts,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_theta": 10000.0,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_dir = Path(os.environ.get("BENCH_TOKENIZER_DIR") or builtin_model_dir())  # any tokenizer with vocab 8192
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, folder / f)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0
    n_shards = layers + 1

    def write(i: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write(
        0,
        {
            "model.embed_tokens.weight": rnd(vocab, hidden),
            "lm_head.weight": rnd(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        },
    )
    for l in range(layers):
        p = f"model.layers.{l}."
        t = {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
            p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
            p + "self_attn.v_proj.weight": rnd(kv * hd, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
            p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rnd(experts, hidden, scale=0.1),
        }
        for e in range(experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(width, hidden)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(width, hidden)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(hidden, width)
        write(l + 1, t)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def peak_rss(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="moecompress-bench-"))
    try:
        model = work / "synthetic"
        t = time.perf_counter()
        size = synthetic_checkpoint(model, args.synthetic_layers, args.hidden, args.experts, args.width, 4)
        gen_s = time.perf_counter() - t
        code = (
            "import resource, sys, torch; from moecompress.profile.run import run_profile; "
            f"run_profile({str(model)!r}, {str(work / 'run')!r}, 'mixed', {args.rss_samples}, 256, 0, 8); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
        )
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "MOECOMPRESS_QUIET": "1"},
        )
        run_s = time.perf_counter() - t
        rss = int(out.stdout.strip().splitlines()[-1])
        base = subprocess.run(
            [
                sys.executable,
                "-c",
                "import resource, torch, transformers, moecompress.profile.run; "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        import_rss = int(base.stdout.strip().splitlines()[-1])
        layer_bytes_fp32 = 2 * (3 * args.experts * args.width * args.hidden) * 2  # bf16 -> fp32
        cache = args.rss_samples * 256 * args.hidden * 4
        return {
            "checkpoint_bytes": size,
            "layers": args.synthetic_layers,
            "shape": {"hidden": args.hidden, "experts": args.experts, "width": args.width, "top_k": 4},
            "generate_s": round(gen_s, 1),
            "profile_s": round(run_s, 1),
            "peak_rss_bytes": rss,
            "import_rss_bytes": import_rss,
            "one_layer_fp32_bytes": layer_bytes_fp32,
            "activation_cache_bytes": cache,
            "checkpoint_over_peak_rss": round(size / rss, 2),
            "peak_minus_import_over_one_layer": round((rss - import_rss) / layer_bytes_fp32, 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--synthetic-layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rss-samples", type=int, default=16)
    ap.add_argument("--parts", default="overhead,rss", help="overhead, rss or both (results merge into --out)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "profile_bench.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    print(f"{'measure':45s} {'value':>12s}")
    if "overhead" in parts:
        res["overhead"] = o = overhead(args.samples, args.seq_len, args.batch, args.repeats)
        for k in (
            "tokens",
            "plain_forward_s",
            "profile_pass_s",
            "ratio_pass_vs_forward",
            "plain_load_s",
            "profile_end_to_end_s",
            "ratio_end_to_end_vs_load_plus_forward",
        ):
            print(f"{k:45s} {o[k]:>12}")
    if "rss" in parts:
        res["peak_rss"] = r = peak_rss(args)
        gib = 1024**3
        print(f"{'synthetic checkpoint (GiB)':45s} {r['checkpoint_bytes'] / gib:>12.2f}")
        print(f"{'profile peak RSS (GiB)':45s} {r['peak_rss_bytes'] / gib:>12.2f}")
        print(f"{'python+torch import RSS (GiB)':45s} {r['import_rss_bytes'] / gib:>12.2f}")
        print(f"{'one MoE layer in fp32 (GiB)':45s} {r['one_layer_fp32_bytes'] / gib:>12.2f}")
        print(f"{'checkpoint / peak RSS':45s} {r['checkpoint_over_peak_rss']:>12}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
