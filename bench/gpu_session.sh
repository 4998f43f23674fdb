#!/usr/bin/env bash
# Issue #6's GPU checks as one prepared device call (bench/README.md, docs/kernels.md):
#
#   run(command="bash bench/gpu_session.sh", timeout_s=540)
#
# Writes into $OUT, which the device tool brings back:
#   gpu.txt          the GPU, driver and library versions
#   step_bench.txt   the printed tables and targets
#   step.json        the results; locally: python bench/step_bench.py --from-json step.json --readme README.md
#   README.md        the README with the measured tables in place
#   pytest.txt       the compiled kernels against the torch reference (tests/test_kernels.py, test_bench.py)
# The step benchmark runs first (it is what the README needs). Each stage has its own time limit,
# so a slow stage cannot use up the time of the stages after it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zo_gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_session: needs torch with a CUDA GPU" >&2
    exit 2
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
} > "$OUT/gpu.txt" 2>&1

timeout 330 "$PY" bench/step_bench.py --out "$OUT/step.json" 2>&1 | tee "$OUT/step_bench.txt"
echo "step_bench exit ${PIPESTATUS[0]}"
if [ -s "$OUT/step.json" ]; then
    "$PY" bench/step_bench.py --from-json "$OUT/step.json" --readme README.md > /dev/null && cp README.md "$OUT/README.md"
fi

timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_bench.py > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?"
tail -5 "$OUT/pytest.txt"
