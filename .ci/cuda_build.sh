#!/usr/bin/env bash
# Builds fastperturb with its CUDA kernels on a machine without a GPU and checks
# what can be checked there: the build is warning-free (nvcc -Werror), the
# extension imports, the ops (OPS, HELPER_OPS) have kernels for the CUDA dispatch key, and
# calling them without a GPU fails with a clear error instead of crashing. Then
# runs the work-list executor tests against this build (and, on a machine with a
# GPU, tests/test_cuda_build.py also runs the kernels against the reference).
#
#   bash .ci/cuda_build.sh
#
# Environment (all optional):
#   FASTPERTURB_CUDA_VENV  the CUDA-torch venv (5.5 GB), made if missing or incomplete
#                          (default: build/cuda-venv in the checkout, like everything CI makes)
#   FASTPERTURB_CI_JUNIT   write the tests' JUnit report here (.ci/run sums the reports)
#   CUDA_HOME              the CUDA toolkit with nvcc (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST   the architectures (default "8.0;9.0")
#   PYTHON                 the interpreter that makes the venv (default python3)
#   FASTPERTURB_CUDA_CMAKE=1  also build with CMakeLists.txt (cmake >= 3.31 from
#                          PyPI into the venv; about 2-3 more minutes)
#
# The build happens in a copy of the working tree (tracked and untracked, not
# ignored, files) under build/cuda-src, so the source tree's fastperturb/_C*.so
# (the CPU build the rest of CI tests) is left alone. The build is a CI build:
# FASTPERTURB_WERROR=1 (warnings are errors) and FASTPERTURB_BUILD_TESTING=1
# (the C++ test harness the work-list tests need).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${FASTPERTURB_CUDA_VENV:-$ROOT/build/cuda-venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
START=$SECONDS

step() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build: no nvcc at $CUDA_HOME/bin/nvcc; set CUDA_HOME to a CUDA toolkit" >&2
  exit 1
fi

step "CUDA-torch venv: $VENV"
PY="$VENV/bin/python"
if ! "$PY" -c 'import sys, torch, pytest, hypothesis, numpy, ninja
sys.exit(0 if torch.__version__.startswith("2.14.1") and torch.version.cuda else 1)' 2>/dev/null; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv --clear "$VENV"
  if ! { "$PY" -m pip install -q --upgrade pip &&
         "$PY" -m pip install -q torch==2.14.1 numpy pytest hypothesis ninja "setuptools>=77" wheel; } \
       > "$VENV/pip.log" 2>&1; then
    tail -n 40 "$VENV/pip.log"
    echo "cuda_build: making the venv failed (log above)" >&2
    exit 1
  fi
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU available:", torch.cuda.is_available())'
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

step "stage the working tree"
WORK="$ROOT/build/cuda-src"
rm -rf "$WORK"
mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -z -co --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf -) | tar -xf - -C "$WORK"

step "build with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, warnings are errors, with the test harness)"
cd "$WORK"
BUILD_START=$SECONDS
if ! FASTPERTURB_CUDA=1 FASTPERTURB_WERROR=1 FASTPERTURB_BUILD_TESTING=1 \
     "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  tail -n 60 build.log
  echo "cuda_build: the build failed (log above)" >&2
  exit 1
fi
# compiler diagnostics only (nvcc's own flag is spelled "all-warnings")
WARNINGS=$(grep -E '(: warning|warning #)' build.log | grep -vc 'all-warnings' || true)
echo "built in $((SECONDS - BUILD_START)) s; compiler warnings: $WARNINGS"
grep -E '(: warning|warning #)' build.log | grep -v 'all-warnings' | head -n 20 || true
if [ "$WARNINGS" != "0" ]; then
  echo "cuda_build: the build printed compiler warnings (above)" >&2
  exit 1
fi

step "import without a GPU; CUDA dispatch keys; clear errors"
"$PY" - <<'EOF'
import torch

import fastperturb
from fastperturb.ops import native as _native
from fastperturb.ops.names import HELPER_OPS, OPS

assert _native.load_error is None, f"fastperturb._C did not load: {_native.load_error}"
for name in (*OPS, *HELPER_OPS):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastperturb::{name}", "CUDA")
    print(f"  fastperturb::{name:19s} CUDA kernel: {has}")
    assert has, name
if not torch.cuda.is_available():
    try:
        torch.ops.fastperturb.norms([torch.ones(3, device="cuda")], 2.0)
    except RuntimeError as e:
        print("  without a GPU:", str(e).splitlines()[0])
    else:
        raise AssertionError("expected an error without a GPU")
EOF

step "tests: tests/test_cuda_build.py, tests/test_worklist.py (this build)"
FASTPERTURB_REQUIRE_CUDA_BUILD=1 "$PY" -m pytest -q -p no:cacheprovider -rs \
  ${FASTPERTURB_CI_JUNIT:+--junitxml="$FASTPERTURB_CI_JUNIT"} tests/test_cuda_build.py tests/test_worklist.py

if [ "${FASTPERTURB_CUDA_CMAKE:-0}" = "1" ]; then
  step "CMake build with CUDA"
  "$PY" -m pip install -q "cmake>=3.31" > "$WORK/pip-cmake.log" 2>&1 || { tail -n 20 "$WORK/pip-cmake.log"; exit 1; }
  NVRTC="$("$PY" -c 'import glob, os, nvidia; print((glob.glob(os.path.join(nvidia.__path__[0], "cu13", "lib", "libnvrtc.so.13")) + [""])[0])')"
  PATH="$VENV/bin:$PATH" cmake -S . -B build/cmake-cuda -G Ninja -DFASTPERTURB_CUDA=1 -DFASTPERTURB_WERROR=1 \
    -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DPython3_EXECUTABLE="$PY" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
    -DCUDAToolkit_ROOT="$CUDA_HOME" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
    ${NVRTC:+-DCUDA_nvrtc_LIBRARY="$NVRTC"} > cmake.log 2>&1 || { tail -n 40 cmake.log; exit 1; }
  grep 'fastperturb: CUDA kernels' cmake.log
  if ! PATH="$VENV/bin:$PATH" cmake --build build/cmake-cuda > cmake-build.log 2>&1; then
    tail -n 60 cmake-build.log
    echo "cuda_build: the CMake build failed (log above)" >&2
    exit 1
  fi
  CWARN=$(grep -E '(: warning|warning #)' cmake-build.log | grep -vc 'all-warnings' || true)
  echo "CMake build OK; compiler warnings: $CWARN"
  [ "$CWARN" = "0" ] || { grep -E '(: warning|warning #)' cmake-build.log | head -n 20; exit 1; }
fi

step "cuda_build: OK in $((SECONDS - START)) s"
