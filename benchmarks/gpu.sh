#!/usr/bin/env bash
# The GPU run: CUDA kernel tests, then `fxfuse bench --suite gpu` (attention TFLOP/s, SPP GB/s), then
# the peak memory of an attention layer's training step, original vs optimized (printed only).
# For a machine with torch + Triton preinstalled and no network; it never installs torch.
# Usage (from anywhere): bash benchmarks/gpu.sh
# Writes benchmarks/results/<date>-<device>.json and .md. Hard timeouts per section keep the whole run
# under ~7.5 minutes even when a section hangs; a section that times out loses only its own results.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Editable install without dependencies (registers the torch.compile backend entry point); offline, so
# no build isolation. PYTHONPATH covers the case where even that is not possible.
timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "gpu.sh: pip install -e . failed; using PYTHONPATH" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PY' || exit 2
import torch
assert torch.cuda.is_available(), "gpu.sh needs a CUDA device"
import triton
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY
device=$("$PY" -c "import torch; from fxfuse.bench.gpu import device_slug; print(device_slug(torch.cuda.get_device_name()))")
out="benchmarks/results/$(date -u +%F)-$device.json"
status=0

section() {  # section NAME TIMEOUT_S COMMAND...: run one section under a hard timeout, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s)" >&2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "gpu.sh: $name timed out after ${limit}s" >&2
  [ "$rc" -ne 0 ] && status=1
  echo "== $name: exit $rc in $((SECONDS - start))s" >&2
}

if "$PY" -c "import pytest" 2>/dev/null; then
  section "kernel tests" 90 env FXFUSE_TEST_DEVICE=cuda "$PY" -m pytest -q \
    tests/test_attention_op.py tests/test_spp_op.py tests/test_linear_attention_op.py \
    tests/test_ssm_scan_op.py "tests/test_ssm_complex.py::test_complex_scan_triton_matches_float64_loop"
else
  echo "gpu.sh: pytest is not installed here; kernel tests skipped" >&2
  status=1
fi
section "attention bench" 130 "$PY" -m fxfuse.bench --suite gpu --section attention --budget-s 100 --json "$out"
section "spp bench" 40 "$PY" -m fxfuse.bench --suite gpu --section spp --budget-s 25 --json "$out"
section "linear attention bench" 60 "$PY" -m fxfuse.bench --suite gpu --section linear_attention --budget-s 45 \
  --json "$out"
section "ssm scan bench" 50 "$PY" -m fxfuse.bench --suite gpu --section ssm_scan --budget-s 35 --json "$out"
section "training memory" 60 "$PY" benchmarks/training_memory.py --device cuda

[ -f "${out%.json}.md" ] && cat "${out%.json}.md"
echo "gpu.sh: results in $out and ${out%.json}.md (exit $status)" >&2
exit $status
