#!/usr/bin/env bash
# Compile and link the extension WITH CUDA (-DEQPROP_WITH_CUDA, every .cpp and .cu) against the
# torch of the GPU machine, on a machine without a GPU or a CUDA torch: `make cuda-build-check`.
# A developer check, not part of CI (it downloads ~0.6 GB once).
#
#   - torch 2.11.0+cu130 (PyPI's default 2.11.0 Linux x86_64 wheel is the CUDA 13.0 build) and
#     nvidia-cuda-nvrtc 13.0.88 are downloaded once, --no-deps, into $EQPROP_CACHE/wheels
#     (default ~/.cache/eqprop) and unpacked there; nothing is installed into any environment.
#   - That torch cannot be imported here (it loads the CUDA libraries at import), so CMake is told
#     its prefix, version and CUDA version with -D (see CMakeLists.txt).
#   - nvcc and cudart come from the CUDA toolkit ($CUDA_HOME, default /usr/local/cuda, 13.0 like the
#     GPU machine's); libnvrtc from the pip wheel when the toolkit has none (CMakeLists.txt's
#     fallback, exercised here).
#   - After CMake's own link (a Python module may leave symbols undefined), the module is linked
#     again with --no-undefined against libpython, so a declared-but-missing function fails here.
# Options (environment): EQPROP_CACHE, CUDA_HOME, JOBS (default 2), BUILD_DIR (default
# build/cuda-check), PYTHON (default python3, must be the Python version the wheel is for: cp311).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE=${EQPROP_CACHE:-$HOME/.cache/eqprop}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
JOBS=${JOBS:-2}
BUILD_DIR=${BUILD_DIR:-$REPO/build/cuda-check}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.11.0
TORCH_CUDA=13.0
NVRTC_VERSION=13.0.88
step() { echo "== $* ($(date +%T))"; }

pytag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheels=$CACHE/wheels
torch_dir=$CACHE/torch-$TORCH_VERSION-cu${TORCH_CUDA/./}-$pytag
nvidia_dir=$CACHE/nvidia-cu13-$NVRTC_VERSION
mkdir -p "$wheels"

fetch() {  # fetch NAME==VERSION: one wheel, no dependencies, for this Python on Linux x86_64
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${pytag#cp}" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    -d "$wheels" "$1"
}

step "torch $TORCH_VERSION wheel ($pytag, cached in $wheels)"
torch_whl=$(ls "$wheels"/torch-$TORCH_VERSION-$pytag-$pytag-*x86_64.whl 2>/dev/null | head -1 || true)
if [ -z "$torch_whl" ]; then
  fetch "torch==$TORCH_VERSION"
  torch_whl=$(ls "$wheels"/torch-$TORCH_VERSION-$pytag-$pytag-*x86_64.whl | head -1)
fi
if [ ! -f "$torch_dir/.unpacked" ]; then
  rm -rf "$torch_dir" && mkdir -p "$torch_dir"
  # Only what a build needs: headers, CMake config, shared libraries, version.py (~1 GB).
  unzip -q -o "$torch_whl" 'torch/include/*' 'torch/share/*' 'torch/lib/*' 'torch/version.py' -d "$torch_dir"
  touch "$torch_dir/.unpacked"
fi
wheel_version=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$torch_dir/torch/version.py")
wheel_cuda=$(sed -n "s/^cuda: Optional\[str\] = '\(.*\)'/\1/p" "$torch_dir/torch/version.py")
echo "   $(basename "$torch_whl"): torch $wheel_version, CUDA ${wheel_cuda:-none}"
if [ "$wheel_cuda" != "$TORCH_CUDA" ]; then
  echo "the wheel is not the CUDA $TORCH_CUDA build (torch/version.py says cuda=${wheel_cuda:-None})" >&2
  exit 1
fi

step "nvidia-cuda-nvrtc $NVRTC_VERSION wheel"
if [ ! -f "$nvidia_dir/.unpacked" ]; then
  nvrtc_whl=$(ls "$wheels"/nvidia_cuda_nvrtc-$NVRTC_VERSION-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$nvrtc_whl" ]; then
    fetch "nvidia-cuda-nvrtc==$NVRTC_VERSION"
    nvrtc_whl=$(ls "$wheels"/nvidia_cuda_nvrtc-$NVRTC_VERSION-*.whl | head -1)
  fi
  rm -rf "$nvidia_dir" && mkdir -p "$nvidia_dir"
  unzip -q -o "$nvrtc_whl" -d "$nvidia_dir"
  touch "$nvidia_dir/.unpacked"
fi
ls "$nvidia_dir"/nvidia/*/lib/libnvrtc.so*

step "toolchain"
nvcc=$CUDA_HOME/bin/nvcc
[ -x "$nvcc" ] || { echo "no nvcc at $nvcc (set CUDA_HOME)" >&2; exit 1; }
"$nvcc" --version | tail -1
cmake --version | head -1
if ls "$CUDA_HOME"/lib64/libnvrtc.so* >/dev/null 2>&1; then
  echo "   the toolkit has its own libnvrtc: CMakeLists.txt's pip fallback is not exercised"
fi

step "configure ($BUILD_DIR)"
# A fresh configure each time (the cache would keep an earlier nvrtc or torch path); ccache keeps
# the rebuild cheap.
rm -rf "$BUILD_DIR"
mkdir -p "$(dirname "$BUILD_DIR")"
export CUDA_HOME CUDA_PATH=$CUDA_HOME
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$REPO}  # CMakeLists.txt uses ccache when it is there
cmake -S "$REPO" -B "$BUILD_DIR" -G "Unix Makefiles" -DCMAKE_BUILD_TYPE=Release \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
  -DEQPROP_TORCH_CMAKE_PREFIX="$torch_dir/torch/share/cmake" \
  -DEQPROP_TORCH_VERSION="$wheel_version" -DEQPROP_TORCH_CUDA="$wheel_cuda" \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME" \
  -DEQPROP_NVRTC_SEARCH_PATHS="$nvidia_dir" \
  >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; echo "configure FAILED" >&2; exit 1; }
grep -E "eqprop:|Added CUDA NVCC flags|CUDA detected|nvrtc" "$BUILD_DIR.configure.log" | sed 's/^/   /'
grep -q "EQPROP_WITH_CUDA:BOOL\|eqprop: torch .* CUDA kernels: ON" "$BUILD_DIR.configure.log" \
  || { echo "configure did not enable the CUDA kernels" >&2; exit 1; }

step "build (-j$JOBS)"
status=0
cmake --build "$BUILD_DIR" -j "$JOBS" -- -k >"$BUILD_DIR.build.log" 2>&1 || status=$?
grep -E "error|Error|undefined reference|warning" "$BUILD_DIR.build.log" | head -60 || true
if [ $status -ne 0 ]; then
  echo "build FAILED (full log: $BUILD_DIR.build.log)" >&2
  exit 1
fi
module=$(ls "$BUILD_DIR"/_C.*.so | head -1)
echo "   translation units compiled: $(grep -c "Building CXX object" "$BUILD_DIR.build.log") C++," \
  "$(grep -c "Building CUDA object" "$BUILD_DIR.build.log") CUDA (all with -DEQPROP_WITH_CUDA=1)"

step "link check: no undefined symbols (--no-undefined, libpython)"
pylib=$("$PYTHON" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))')
link_cmd=$(cat "$BUILD_DIR/CMakeFiles/_C.dir/link.txt")
check_out=$BUILD_DIR/no_undefined_check.so
# link.txt runs from the build folder; the later -o wins.
if ! (cd "$BUILD_DIR" && eval "$link_cmd -Wl,--no-undefined $pylib -o $check_out") >"$BUILD_DIR.link.log" 2>&1; then
  grep -E "undefined reference|error" "$BUILD_DIR.link.log" | head -40
  echo "link check FAILED (full log: $BUILD_DIR.link.log)" >&2
  exit 1
fi
echo "   ok: $(basename "$module") links with no undefined symbols"
# (grep -c, not grep -q: under pipefail an early grep exit fails readelf with SIGPIPE)
if [ "$(readelf -S "$module" | grep -c nv_fatbin)" -gt 0 ]; then
  echo "   the module carries CUDA device code (.nv_fatbin; nvcc flags: $(grep -o 'arch=[^ ]*' \
    "$BUILD_DIR/CMakeFiles/_C.dir/flags.make" | sort -u | tr '\n' ' '))"
else
  echo "no CUDA device code in $module" >&2
  exit 1
fi
readelf -d "$module" | grep NEEDED | sed 's/^ */   /'
step "cuda-build-check passed"
