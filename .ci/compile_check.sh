#!/usr/bin/env bash
# Compile csrc/ against the headers of an older torch than CI installs (default 2.11, the torch of the GPU
# machine; the package promises torch >= 2.10), so that an API that exists only in newer torch never lands.
# C++ always; CUDA for sm_90 where nvcc is on PATH. Object files only: nothing is linked, installed or run.
# The headers (torch/include of the torch wheel, fetched once with `pip download --no-deps`) and the build
# directory are cached outside the clone, next to CI's venv; later runs recompile only what changed.
# Usage: bash .ci/compile_check.sh   (CALEXNET_COMPAT_TORCH=2.10.0 to check another version)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
version="${CALEXNET_COMPAT_TORCH:-2.11.0}"
cache="${CALEXNET_VENV_ROOT:-$HOME/.cache/calexnet_fast}/torch-$version"
include="$cache/include/torch/include"
if [ ! -f "$cache/.complete" ]; then
  echo "== fetching the headers of torch $version into $cache (once)"
  rm -rf "$cache"
  mkdir -p "$cache/wheel"
  python -m pip download -q --no-deps --no-cache-dir --only-binary=:all: "torch==$version" -d "$cache/wheel"
  python - "$cache"/wheel/torch-*.whl "$cache/include" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("torch/include/")])
PY
  rm -rf "$cache/wheel"
  touch "$cache/.complete"
fi
if command -v nvcc > /dev/null; then cuda=ON; else cuda=OFF; fi
echo "== compiling csrc/ against the torch $version headers (CUDA: $cuda)"
build="$cache/build-$(pwd | sha256sum | cut -c1-12)"  # one per clone: CMake ties a build folder to its sources
cmake -S . -B "$build" -G Ninja -DCALEXNET_TORCH_INCLUDE="$include" -DCALEXNET_CUDA="$cuda" \
  > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build"
echo "== compile check against torch $version passed in $((SECONDS - start)) s"
