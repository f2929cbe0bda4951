#!/usr/bin/env bash
# Every GPU check of calexnet_fast in one call, for the GPU machine (an H200; torch 2.11 cu130, triton 3.6,
# Python 3.12, nvcc 13.0, no package registry). In order: the environment, the build with the CUDA op library
# (CALEXNET_CUDA=ON), `calexnet_fast.info` of the installed package, a self-check that the fast paths run (the
# CUDA op library loaded and dispatched to, Triton native: the reference twins must not stand in), every CUDA
# and Triton-kernel test, then the benchmarks in --quick mode.
#
#   bash bench/gpu_check.sh                        # on the GPU machine, from anywhere
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh    # on CPU: the script's own logic (CI: tests/test_gpu_check.py)
#
# Environment: OUT (results folder, default ./gpu_results), PYTHON (default python3), GPU_CHECK_TOTAL_S (the time
# budget of the whole run, default 450 s), GPU_CHECK_ONLY (space-separated step names to run, default all),
# GPU_CHECK_DRY_RUN=1, and for tests of the dry run GPU_CHECK_DRY_FAIL / GPU_CHECK_DRY_HANG (a step whose stand-in
# fails / hangs).
#
# Time plan, <= 8 minutes end to end: each step runs under `timeout` with the budget written next to it, cut to
# what is left of GPU_CHECK_TOTAL_S (450 s); a step with under 10 s left is not started (SKIP, a failure). The
# estimates next to each step add up to 450 s (7.5 min); how each was made is written there. Packing: < 1 s a step.
#
# Results in $OUT, at most 3 files: gpu_check.tar.gz (every step's full log, the JUnit XML of the test steps, the
# benchmarks' JSON, the summary; re-packed after every step, so a run cut short from outside keeps what it did),
# summary.txt (the table printed last) and, only while a step runs, current_step.log (its log so far).
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_results}"
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
TOTAL="${GPU_CHECK_TOTAL_S:-450}"
ONLY=" ${GPU_CHECK_ONLY:-} "
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/gpu_check.tar.gz" "$OUT/summary.txt" "$OUT/current_step.log"
work="$(mktemp -d)"   # logs, JUnit XML, JSON; outside the clone, so that nothing imports the source tree
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/logs" "$work/junit" "$work/results" "$work/run"
export PYTHONUNBUFFERED=1 CALEXNET_REQUIRE_GPU=1
start=$SECONDS
failed=()
build_ok=1
printf '%-20s %-7s %4s %6s %6s %6s  %s\n' step status rc time budget est note > "$work/summary.txt"

# pytest on the installed package: run from outside the clone (plain `python -m pytest` in the clone would put the
# source tree, without its compiled ops, first on sys.path); the repository's pyproject.toml is still its config.
pytest_cmd() {  # pytest_cmd STEP ARGS...: the test command of a step, JUnit XML into the work folder
  local step=$1
  shift
  echo "cd '$work/run' && '$PY' -m pytest -p no:cacheprovider -rfEs --junitxml='$work/junit/$step.xml' $*"
}

# A stand-in for a step in the dry run: what the real step needs, checked as far as a CPU allows.
dry_command() {  # dry_command STEP CHECK_COMMAND
  if [ "${GPU_CHECK_DRY_HANG:-}" = "$1" ]; then
    printf '%s' "echo 'dry run: injected hang'; sleep 100000"
  elif [ "${GPU_CHECK_DRY_FAIL:-}" = "$1" ]; then
    printf '%s' "echo 'dry run: injected failure'; false"
  else
    printf '%s' "$2"
  fi
}

junit_note() {  # "N passed, N failed, N skipped" from a JUnit XML file
  "$PY" - "$1" <<'PY' 2>/dev/null || true
import sys, xml.etree.ElementTree as ET
t = [s for s in ET.parse(sys.argv[1]).getroot().iter("testsuite")]
n = sum(int(s.get("tests", 0)) for s in t)
f = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in t)
k = sum(int(s.get("skipped", 0)) for s in t)
print(f"{n - f - k} passed, {f} failed, {k} skipped")
PY
}

pack() {
  cp "$work/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/.gpu_check.tar.gz.tmp" -C "$work" logs junit results summary.txt \
    && mv "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

# step NAME BUDGET_S ESTIMATE_S NEEDS_BUILD REAL_COMMAND DRY_CHECK_COMMAND
step() {
  local name=$1 budget=$2 est=$3 needs_build=$4 real=$5 check=$6
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then
    return
  fi
  local left=$((TOTAL - (SECONDS - start))) status rc=- note="" t0=$SECONDS cmd
  local limit=$((budget < left ? budget : left))
  if [ "$needs_build" = 1 ] && [ "$build_ok" = 0 ]; then
    status=SKIP note="the build failed"
  elif [ "$limit" -lt 10 ]; then
    status=SKIP note="no time left (${left} s of ${TOTAL} s)"
  else
    cmd=$real
    echo "== $name (budget ${limit} s, estimate ${est} s)"
    echo "\$ $real" > "$OUT/current_step.log"
    if [ "$DRY" = 1 ]; then
      cmd=$(dry_command "$name" "$check")
      echo "dry run, instead: \$ $cmd" >> "$OUT/current_step.log"
    fi
    timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$OUT/current_step.log" 2>&1
    rc=$?
    mv "$OUT/current_step.log" "$work/logs/$name.log"
    if [ "$rc" = 0 ]; then
      status=PASS
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      status=TIMEOUT note="killed after ${limit} s"
    else
      status=FAIL
    fi
    if [ "$DRY" = 1 ]; then
      note="$(grep -Eo '[0-9/]+ tests? collected.*' "$work/logs/$name.log" | tail -n 1) $note"
    elif [ -f "$work/junit/$name.xml" ]; then
      note="$(junit_note "$work/junit/$name.xml") $note"
    fi
    if [ "$status" != PASS ]; then
      echo "-- last lines of $name.log:"
      tail -n 30 "$work/logs/$name.log"
    fi
  fi
  [ "$status" = PASS ] || failed+=("$name")
  [ "$name" = build ] && [ "$status" != PASS ] && build_ok=0
  printf '%-20s %-7s %4s %5ss %5ss %5ss  %s\n' "$name" "$status" "$rc" $((SECONDS - t0)) "$budget" "$est" \
    "$note" >> "$work/summary.txt"
  echo "   $name: $status in $((SECONDS - t0)) s"
  pack
}

bench() {  # bench NAME BUDGET EST ARGS: a benchmark script of bench/ in --quick mode, JSON into results/
  local name=$1 budget=$2 est=$3 args=$4
  step "bench_$name" "$budget" "$est" 1 \
    "cd '$work/run' && '$PY' '$repo/bench/$name.py' --device cuda --quick $args --json '$work/results/$name.json'" \
    "cd '$work/run' && '$PY' '$repo/bench/$name.py' --help > help.txt && for f in --quick --device --json $args; \
     do grep -q -- \"\$f\" help.txt || { echo \"bench/$name.py has no \$f\"; exit 1; }; done"
}

# 1. Environment. Estimate 5 s: nvidia-smi and one torch import (~3 s on the GPU machine); fails without a GPU.
versions="import sys, torch, triton, numpy; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
step env 20 5 0 \
  "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -n 2; \
   cmake --version | head -n 1; '$PY' -c \"$versions; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
   print(torch.cuda.get_device_name())\"" \
  "'$PY' -c \"$versions\""

# 2. Build and install with the CUDA op library. Estimate 45 s: a clean build of both libraries (CMake configure,
# ops_cpu.cpp, grid_head_cpu.cpp (the grid head's CPU op, cloned per x86-64 level where GCC >= 11 compiles it), pool_cpu.cpp and
# ops_cuda.cu with cub for sm_90, compiled in parallel) took 30 s on the 2 shared cores of the CPU
# machine (.ci/compile_check.sh), plus ~10 s for pip's wheel and install; the GPU machine has 16 cores.
step build 120 45 0 \
  "cd '$repo' && CALEXNET_CUDA=ON '$PY' -m pip install -v --no-build-isolation --no-deps --force-reinstall ." \
  "cd '$repo' && test -f pyproject.toml && grep -q CALEXNET_CUDA CMakeLists.txt && '$PY' -m pip --version"

# 3. What the installed package loaded, run outside the clone. Estimate 8 s: imports torch, torchvision, triton.
step info 20 8 1 "cd '$work/run' && '$PY' -m calexnet_fast.info" "cd '$work/run' && '$PY' -m calexnet_fast.info"

# 4. Self-check: the CUDA op library is loaded and dispatched to, Triton runs natively (CALEXNET_REQUIRE_GPU=1 makes
# a missing GPU a failure). Estimate 20 s: pytest start and imports ~10 s, two Triton JIT compiles ~5 s each.
step selfcheck 45 20 1 "$(pytest_cmd selfcheck "'$repo/tests/test_cuda_selfcheck.py'")" \
  "$(pytest_cmd selfcheck "'$repo/tests/test_cuda_selfcheck.py'" --collect-only -q)"

# 5. Every CUDA test and Triton-kernel test (markers needs_cuda and kernel; the CPU-only tests run in CI). Estimate
# 145 s: ~160 tests, mostly milliseconds each on the GPU; the time goes to collecting every test module (~15 s)
# and JIT-compiling ~25 Triton kernel variants (~2-4 s each; the same kernels compile in 1-4 s for sm_90a on the
# CPU machine, bench/proto_head.py --sass) and the tiny cascades' kernels, plus ~13 variants of the grid-head
# kernel (tests/test_grid_head_kernel.py; ~1.3 s each for sm_90a on the CPU machine, bench/grid_head.py --sass,
# so ~2 s here: +25 s).
# A test module that fails to import fails the step but does not stop the others (--continue-on-collection-errors).
cuda_selection="'$repo/tests' -m 'needs_cuda or kernel' --continue-on-collection-errors"
step cuda_tests 190 145 1 "$(pytest_cmd cuda_tests "$cuda_selection")" \
  "$(pytest_cmd cuda_tests "$cuda_selection" --collect-only -q)"

# 6. Benchmarks, --quick. Estimates from what each times (do_bench: 25 ms warm-up + 100 ms per measurement) plus
# ~8 s of imports and torch.compile of the eager references (~10-20 s per shape with 16 compile workers):
# compact: 12 cases x 3 methods x 5 rounds of microsecond calls -> 20 s.
bench compact 30 20 ""
# scatter_rows: the same cases -> 20 s.
bench scatter_rows 30 20 ""
# exit_decision: 3 class counts x (fused, eager, torch.compile) at N = 256 -> 40 s (3 compiles).
bench exit_decision 60 40 ""
# proto_head: 4 feature-map shapes x (fused, eager, torch.compile) at N = 256 -> 90 s (4 compiles dominate).
bench proto_head 110 90 ""
# grid_head: the fused grid-head kernel vs the folded head + exit_decision on 2 ResNet-56 branch maps at N = 256
# (--quick: no torch.compile) -> 12 s (~8 s of imports, 2 JIT compiles ~2 s each, do_bench ~1 s).
bench grid_head 30 12 ""
# throughput: ResNet-18 at 224x224, batch 256, bf16, 2 exit profiles, 5 rounds; the micro-benchmarks are the steps
# above (--no-kernels) -> 45 s (threshold bisection and 3 heads' kernel compiles included).
bench throughput 80 45 "--no-kernels"

total=$((SECONDS - start))
if [ "${#failed[@]}" = 0 ]; then verdict="all passed"; else verdict="FAILED: ${failed[*]}"; fi
printf '%-20s %-7s %4s %5ss %5ss %6s  %s\n' total "$([ ${#failed[@]} = 0 ] && echo PASS || echo FAIL)" - "$total" \
  "$TOTAL" "" "$verdict" >> "$work/summary.txt"
[ "$DRY" = 1 ] && echo "(dry run: every step was a stand-in)" >> "$work/summary.txt"
pack
echo
echo "results: $OUT/gpu_check.tar.gz (logs/, junit/, results/), $OUT/summary.txt"
cat "$work/summary.txt"
[ "${#failed[@]}" = 0 ]
