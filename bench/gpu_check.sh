#!/usr/bin/env bash
# Every GPU check of calexnet_fast in one call, for a GPU machine with no package registry
# (torch, triton, torchvision, scikit-build-core, cmake, ninja and nvcc already installed):
#   build -> op/kernel/cascade tests on CUDA -> benchmarks -> JSON + logs into $OUT (default ./gpu_results).
# Usage: bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -m calexnet_fast.info | tee "$OUT/info.txt"

echo "== tests on CUDA (ops, kernels, cascades)"
tests=""
for t in tests/test_ops.py tests/test_kernels.py tests/test_reference_cascade.py tests/test_cascade.py; do
  [ -f "$t" ] && tests="$tests $t"
done
pytest $tests -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.txt"

echo "== benchmarks"
python bench/compact.py $quick --json "$OUT/compact.json" 2>&1 | tail -40 | tee "$OUT/compact.txt"
[ -f bench/heads.py ] && python bench/heads.py $quick --json "$OUT/heads.json" 2>&1 | tail -40 | tee "$OUT/heads.txt"
[ -f bench/throughput.py ] && python bench/throughput.py $quick --device cuda --model resnet50 --resolution 224 \
  --batch-size 256 --dtype bfloat16 --json "$OUT/throughput.json" 2>&1 | tail -40 | tee "$OUT/throughput.txt"
echo "results in $OUT"
