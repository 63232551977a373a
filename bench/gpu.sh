#!/usr/bin/env bash
# One command on a GPU machine fills issue 17's targets table: tinv-ui next to diffusers' textual_inversion.py
# (bench/versus.py: interleaved child-process pairs, then tinv-ui's trainer and generator in process next to the
# stock StableDiffusionPipeline), on an SD1.5-shaped random-weight model at 512 px. Prints one table at the end.
#
#   bash bench/gpu.sh                 # from any directory; results in $OUT (default .cache/bench/versus)
#   GPU_TESTS=1 bash bench/gpu.sh     # then also the CUDA-marked tests (pytest -m gpu), if pytest is installed
#
# Env: BUDGET (s, default 480: phases that would overrun are skipped, with a line saying so), OUT (results
# folder), WORK (scratch: the 4.3 GB fp32 model, images), PY (python), WHL_DIR (wheels to install when diffusers
# is missing, default .gpu/whl; see bench/README.md for how to fetch them), PAIRS (interleaved pairs, default 1).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python3}
OUTDIR=${OUT:-.cache/bench/versus}
BUDGET=${BUDGET:-480}
WORK=${WORK:-/tmp/tinv-bench}
WHL_DIR=${WHL_DIR:-.gpu/whl}
mkdir -p "$OUTDIR" "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
T0=$(date +%s)

if ! $PY -c "import diffusers" 2>/dev/null; then
  WHL=$(ls "$WHL_DIR"/*.whl 2>/dev/null)
  [ -n "$WHL" ] || { echo "diffusers is missing and there are no wheels in $WHL_DIR (see bench/README.md)"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tinv-site $WHL || exit 2
  export PYTHONPATH=/tmp/tinv-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'PYEOF'
import torch, diffusers, transformers, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0),
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| accelerate", accelerate.__version__)
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader

# tqdm redraws of the diffusers child are filtered out of the log (bench/versus.py reads them itself)
timeout --signal=INT --kill-after=15 $((BUDGET + 60)) \
  $PY bench/versus.py --out "$OUTDIR" --work "$WORK" --budget "$BUDGET" --pairs "${PAIRS:-1}" 2>&1 \
  | tee "$OUTDIR/versus.log"
if [ "${GPU_TESTS:-0}" = 1 ]; then
  if $PY -c "import pytest" 2>/dev/null; then
    $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -30 | tee "$OUTDIR/gpu_tests.log"
  else
    echo "GPU_TESTS: pytest is not installed here (carry its wheel in $WHL_DIR)"
  fi
fi
echo "total wall $(( $(date +%s) - T0 ))s; results in $OUTDIR"
