#!/usr/bin/env bash
# The lower end of the supported range: a focused subset of the suite on transformers 5.17.0 (the GPU machine's
# version; the main install gets the newest allowed by pyproject.toml) with huggingface_hub 1.33 (what 5.17
# needs: < 2). The old versions go into .compat/tf517 (git-ignored) with --no-deps and are put first on
# PYTHONPATH, so the rest (torch 2.13 CPU, tokenizers, accelerate, ...) is the .venv's. torch 2.11 (the machine's)
# is not tested here: PyPI's x86_64 torch 2.11 is the multi-GB CUDA build.
#
#   bash bench/compat_check.sh            # about 2 minutes of CPU on one core; .ci/run runs it
#   bash bench/compat_check.sh -x -k qwen  # extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=.compat/tf517
PINS=(transformers==5.17.0 huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 certifi)
if [ ! -f "$DIR/.pins" ] || [ "$(cat "$DIR/.pins")" != "${PINS[*]}" ]; then
  rm -rf "$DIR"
  "$PY" -m pip install -q --no-deps --no-compile --target "$DIR" "${PINS[@]}"
  echo "${PINS[*]}" > "$DIR/.pins"
fi
TESTS=(
  tests/core/test_compat.py tests/core/test_families.py tests/core/test_builtin.py tests/profile/test_profile.py tests/core/test_evaluate.py
  tests/prune/test_prune_e2e.py tests/atomic/test_atomic_prune.py tests/quant/test_quant_pipeline.py tests/quant/test_quant_packed.py
)
PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MOECOMPRESS_EXPECT_TRANSFORMERS=5.17.0 \
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
