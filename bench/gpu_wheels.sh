#!/usr/bin/env bash
# Download, from PyPI, the wheels that the GPU machine's Python lacks, into .whl/ (git-ignored) for the device
# tool's `carry` (see bench/GPU_CHECK.md). The machine has Python 3.12 (x86_64) with torch 2.11, transformers 5.17,
# accelerate, safetensors, tokenizers, scipy, numpy, typer, rich, psutil, triton; it reaches no registry.
# Missing there: pulp, highspy (bit plans), compressed-tensors and its pure-Python needs (pydantic, loguru, ...).
# bitsandbytes (NF4 only, not used by the check) is left out: its wheel alone is larger than the carry limit allows.
#
#   bash bench/gpu_wheels.sh            # then: du -sh .whl (the tree + .whl must stay under 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
# One version of each (two versions of one package stop the whole install there). These are the versions the
# suite runs with here; pydantic-core must be the one that pydantic names.
WHEELS=(
  pulp==3.3.2
  highspy==1.16.0
  compressed-tensors==0.20.1
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  loguru==0.7.3
)
rm -rf "$DEST" && mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -1 "$DEST"
total=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $((total / 1048576)) MiB; tracked tree: $((tree / 1048576)) MiB; limit for both together: 64 MiB"
if [ $((total + tree)) -ge $((64 * 1048576)) ]; then
  echo "gpu_wheels: tree + wheels exceed the 64 MiB carry limit" >&2
  exit 1
fi
