#!/usr/bin/env bash
# The GPU check in one command, for the device tool (bench/GPU_CHECK.md gives the exact `run` call):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Installs the carried wheels (.whl/, made here by bench/gpu_wheels.sh) and the project with --no-deps into
# /tmp (the machine's own torch, transformers, triton stay), then runs bench/gpu_check.py on cuda with a time
# budget. Results: $OUT/gpu_check.json (rewritten after every op, so a cut-off run still returns what it did),
# $OUT/gpu_check.log, and reports/gpu_check.json in the machine's copy of the tree; then the suite's tests marked
# gpu (at most GPU_PYTEST_S=120 s; $OUT/gpu_pytest.xml).
# Elsewhere (no $OUT): results go to reports/. Budget: GPU_CHECK_BUDGET_S seconds for the Python part (default 270).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/reports}
mkdir -p "$OUT" reports
PY=${PYTHON:-python3}
SITE=/tmp/moecompress-site
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "== $(date -u +%FT%TZ) $(uname -m) $($PY --version 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
rm -rf "$SITE" && mkdir -p "$SITE/deps" "$SITE/pkg"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/deps" .whl/*.whl \
    || { echo "gpu_check.sh: installing the carried wheels failed"; exit 3; }
else
  echo "gpu_check.sh: no .whl/ carried (run bench/gpu_wheels.sh here and carry .whl); going on without it"
fi
export PYTHONPATH="$SITE/pkg:$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE/pkg" .; then
  echo "gpu_check.sh: pip could not build the project; importing it from the tree instead"
  ln -sfn "$PWD/calibration" moecompress/calibration
  export PYTHONPATH="$PWD:$PYTHONPATH"
fi
$PY - <<'PYEOF'
import importlib
for m in ("torch", "transformers", "triton", "safetensors", "accelerate", "pulp", "highspy", "compressed_tensors"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} {getattr(mod, '__file__', '')}")
    except Exception as err:
        print(f"{m} MISSING ({err})")
import moecompress
print("moecompress", moecompress.__file__)
PYEOF
export PYTHONUNBUFFERED=1 MOECOMPRESS_QUIET=1 TOKENIZERS_PARALLELISM=false
$PY bench/gpu_check.py --device cuda --budget-s "${GPU_CHECK_BUDGET_S:-270}" --out "$OUT/gpu_check.json" "$@"
rc=$?
[ "$OUT/gpu_check.json" -ef reports/gpu_check.json ] || cp "$OUT/gpu_check.json" reports/gpu_check.json 2>/dev/null
# The suite's CUDA tests (marked gpu): packed experts on CUDA vs the CPU dense loader, the Triton kernel on CUDA
echo "== pytest -m gpu"
# pytest imports the tree's package (rootdir first on sys.path), whose calibration subpackage lives at ./calibration
[ -e moecompress/calibration ] || ln -sfn ../calibration moecompress/calibration
timeout "${GPU_PYTEST_S:-120}" $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu --junitxml="$OUT/gpu_pytest.xml" \
  $(grep -rl "mark.gpu" tests --include="test_*.py" | sort)
echo "== pytest -m gpu exited with $?"
echo "== gpu_check.py exited with $rc at $(date -u +%FT%TZ)"
exit $rc
