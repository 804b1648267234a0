"""The fixed set of outputs whose safetensors bytes must not change when the code is reorganized.

``python tests/identity_cases.py --record`` runs every case with the current code and writes
tests/data/identity.json (sha256 of every .safetensors file each case writes, plus a float summary of every
tensor). tests/test_identity.py runs the same cases and compares. Record only on a tree whose outputs are the
reference (the issue-11 baseline was recorded on main a4727c1, before the engine refactor).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MOECOMPRESS_QUIET", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

RECORD = Path(__file__).parent / "data" / "identity.json"
TINY = dict(samples="6", seq_len="32", batch="3")

# name -> (model, CLI argv after the command's MODEL). "{tiny:<type>}" is a tiny model built by conftest.build_tiny.
_SMALL = ["--samples", "6", "--seq-len", "32", "--batch-size", "3"]
CASES: dict[str, tuple[str, list[str]]] = {}
for _t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
    CASES[f"{_t}/prune"] = (f"tiny:{_t}", ["prune", "--ratio", "0.25", *_SMALL])
    CASES[f"{_t}/quantize4"] = (f"tiny:{_t}", ["quantize", "--bits", "4", "--plan", "uniform", *_SMALL])
CASES["mixtral/atom"] = ("tiny:mixtral", ["prune", "--granularity", "atom", "--ratio", "0.25", *_SMALL])
CASES["deepseek_v3/atom-exact"] = (
    "tiny:deepseek_v3",
    ["prune", "--granularity", "atom", "--ratio", "0.25", "--layout", "exact", *_SMALL],
)
for _t in ("mixtral", "deepseek_v3"):
    CASES[f"{_t}/merge"] = (f"tiny:{_t}", ["merge", "--ratio", "0.25", *_SMALL])
    CASES[f"{_t}/lp3"] = (f"tiny:{_t}", ["quantize", "--bits", "3", "--granularity", "expert", *_SMALL])
_B = ["--samples", "8", "--seq-len", "64", "--batch-size", "4"]
BUILTIN: dict[str, tuple[str, list[str]]] = {
    "builtin/profile": ("builtin", ["profile", *_B]),
    "builtin/prune": ("builtin", ["prune", "--ratio", "0.25", *_B]),
    "builtin/prune-refit": ("builtin", ["prune", "--ratio", "0.25", "--refit", "router+down", *_B]),
    "builtin/atom": ("builtin", ["prune", "--granularity", "atom", "--ratio", "0.25", *_B]),
    "builtin/merge": ("builtin", ["merge", "--ratio", "0.25", *_B]),
    "builtin/quantize4": ("builtin", ["quantize", "--bits", "4", "--plan", "uniform", *_B]),
    "builtin/lp3": ("builtin", ["quantize", "--bits", "3", *_B]),
}
ALL = {**CASES, **BUILTIN}


def machine() -> dict[str, str]:
    """What decides float results on a CPU: byte identity is asserted only where this matches the record."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def digest(folder: Path) -> dict[str, dict]:
    """sha256 of each safetensors file, plus per-tensor (shape, dtype, sum, abs-sum) for a tolerant fallback."""
    out: dict[str, dict] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(f), "pt") as fh:
            for k in sorted(fh.keys()):
                t = fh.get_tensor(k)
                x = t.double()
                tensors[k] = [list(t.shape), str(t.dtype), float(x.sum()), float(x.abs().sum())]
        out[f.name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "tensors": tensors}
    return out


def run_case(name: str, workdir: Path, tokenizer_dir: Path | None) -> dict[str, dict]:
    """Run one case through the CLI in this process; return the digest of what it wrote."""
    from typer.testing import CliRunner

    from moecompress.cli.main import app

    model_spec, argv = ALL[name]
    cmd, rest = argv[0], argv[1:]
    model: list[str] = []
    if model_spec.startswith("tiny:"):
        sys.path.insert(0, str(Path(__file__).parent))
        from conftest import build_tiny

        mt = model_spec.split(":", 1)[1]
        folder = workdir / f"model-{mt}"
        if not folder.exists():
            build_tiny(mt, folder, tokenizer_dir)
        model = [str(folder)]
    out = workdir / name.replace("/", "-")
    torch.manual_seed(0)
    res = CliRunner().invoke(app, [cmd, *model, *rest, "-o", str(out)])
    if res.exit_code != 0:
        raise RuntimeError(f"{name}: exit {res.exit_code}\n{res.output}\n{res.exception!r}")
    return digest(out)


def _tokenizer(workdir: Path) -> Path:
    """The conftest tokenizer, built outside pytest."""
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest

    return conftest.make_tokenizer(workdir / "tok")


if __name__ == "__main__" and "--record" in sys.argv:
    # ``--record`` re-records every case; ``--record NAME...`` only the named cases (an intentional output change of
    # one operation, said in the commit with the measured quality figure), keeping the others as recorded
    import tempfile

    torch.set_num_threads(1)
    only = [a for a in sys.argv[1:] if a != "--record"]
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; cases: {ALL}")
    rec = json.loads(RECORD.read_text()) if only else {"machine": machine(), "cases": {}}
    if only and rec["machine"] != machine():
        sys.exit(f"the record was made on {rec['machine']}, this machine is {machine()}: re-record every case")
    with tempfile.TemporaryDirectory() as d:
        wd = Path(d)
        tok = _tokenizer(wd)
        for n in only or ALL:
            print(n, flush=True)
            rec["cases"][n] = run_case(n, wd, tok)
    RECORD.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
