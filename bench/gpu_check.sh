#!/usr/bin/env bash
# GPU check script for the device machine (one mode per 10-minute command).
#
#   bench/gpu_check.sh build     build _C (D3K_REQUIRE_CUDA=1), print device facts
#   bench/gpu_check.sh test      build + pytest python_tests -x (GPU tests, Triton natively, and the rest)
#   bench/gpu_check.sh sanitize  build + compute-sanitizer memcheck and racecheck on the small kernel tests
#   bench/gpu_check.sh bench     build + pytest bench --benchmark-json=$OUT/bench.json + bench/report.py
#                                (D3K_BENCH_QUICK=1: the Llama-3.2-1B shape only, for iterating)
#
# Extra arguments go to pytest (e.g. `bench/gpu_check.sh test -k attn`). Logs are
# tee'd into $OUT (default ./gpu_out). Environment: D3K_CUDA_ARCHS (default 90),
# MAX_JOBS (default nproc), D3K_PDL=0 disables Programmatic Dependent Launch,
# T_LIMIT = seconds the test/sanitize/bench step may take (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-test}"
shift || true
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
T_LIMIT="${T_LIMIT:-480}"
export D3K_CUDA_ARCHS="${D3K_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

build() {
  log "build (D3K_CUDA_ARCHS=$D3K_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
  local t0=$SECONDS
  if ! D3K_REQUIRE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"
    log "BUILD FAILED (see build.log)"
    exit 1
  fi
  grep -iE "warning" "$OUT/build.log" | grep -v "^WARNING: Running pip as" | tee -a "$OUT/summary.txt" || true
  log "built in $((SECONDS - t0)) s"
  "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import torch
import d3kernels._ops as o
print("torch", torch.__version__, "| device", torch.cuda.get_device_name(0), "| cc", torch.cuda.get_device_capability(0))
print("build_info", o.build_info())
print("CUDA_OPS_AVAILABLE", o.CUDA_OPS_AVAILABLE, "| arch_problem", o.arch_problem("cuda"))
print("device_facts", o.C.device_facts(0))
EOF
}

run_pytest() {  # name, then pytest arguments
  local name=$1
  shift
  log "pytest $name: $*"
  timeout --signal=INT "$T_LIMIT" "$PY" -m pytest "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 80
  local rc=${PIPESTATUS[0]}
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/$name.log" | tail -n 40 >>"$OUT/summary.txt"
  log "pytest $name exit $rc"
  return "$rc"
}

sanitize() {
  local filter=()
  if compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name"; then
    filter=(--kernel-name kns=d3k)          # instrument only our kernels (torch's run at speed)
  fi
  local rc=0
  for tool in memcheck racecheck; do
    log "compute-sanitizer --tool $tool ${filter[*]}"
    timeout --signal=INT $((T_LIMIT / 2)) compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 97 \
      --print-limit 20 "$PY" -m pytest -q -x -m gpu python_tests/test_cuda_ops.py -k "small" "$@" \
      2>&1 | tee "$OUT/sanitize_$tool.log" | tail -n 40
    local r=${PIPESTATUS[0]}
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -n 5 >>"$OUT/summary.txt"
    log "$tool exit $r"
    [ "$r" -ne 0 ] && rc=$r
  done
  return "$rc"
}

case "$MODE" in
  build) build ;;
  test) build && run_pytest test python_tests -x -q -rs "$@" ;;
  sanitize) build && sanitize "$@" ;;
  bench) build && run_pytest bench bench -q --benchmark-json="$OUT/bench.json" "$@" &&
         "$PY" bench/report.py "$OUT/bench.json" --out "$OUT" | tee -a "$OUT/summary.txt" ;;
  *) echo "usage: $0 build|test|sanitize|bench [pytest args]" >&2; exit 2 ;;
esac
rc=$?
log "mode $MODE exit $rc"
cat "$OUT/summary.txt" | tail -n 60
exit "$rc"
