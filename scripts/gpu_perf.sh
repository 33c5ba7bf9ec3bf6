#!/usr/bin/env bash
# The GPU figures in one command, for whenever a CUDA machine is at hand (no test depends on
# a GPU; CI has none):
#
#   bash scripts/gpu_perf.sh [OUT_DIR]          # default outputs/perf_gpu
#
# 1. checks that CUDA is there and runs the tests that exercise the CUDA code paths (the
#    corruption kernels, streams, multi-stream evaluation and the wrapper's robustness tests
#    run their CUDA cases only when a GPU is present);
# 2. runs `python -m benchmarks.perf --device cuda` for the adaptation overhead of every
#    method that runs on a plain model (the statistics and entropy methods among them) against
#    plain inference on the same warm model, the corruption throughput (batched generator vs
#    the NumPy reference) and the multi-stream speed-up;
# 3. leaves OUT_DIR/perf.json (every figure, with the device and software versions) and
#    OUT_DIR/perf.md (the tables), plus OUT_DIR/gpu_tests.txt.
#
# Environment: PYTHON (default .venv/bin/python), PERF_ARGS (extra benchmarks.perf flags,
# e.g. "--quick" or "--methods norm,tent"), SKIP_TESTS=1 to take the figures only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-outputs/perf_gpu}
mkdir -p "$OUT"

"$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_perf.sh: torch sees no CUDA device (torch " + torch.__version__ + "); run it on a GPU machine")
print("CUDA:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/benchmarks/test_corruptions.py tests/benchmarks/test_streams.py \
    tests/benchmarks/test_evaluation_multi_stream.py tests/tta/test_core_robustness.py \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -3
fi

# shellcheck disable=SC2086  # PERF_ARGS is a list of flags
"$PYTHON" -m benchmarks.perf --device cuda --sections methods,corruptions,multistream --out "$OUT" ${PERF_ARGS:-}
echo "gpu_perf.sh: wrote $OUT/perf.json and $OUT/perf.md"
