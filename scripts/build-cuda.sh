#!/usr/bin/env bash
# Builds the agent with candle's `cuda` feature on a machine without a system
# CUDA toolkit, from NVIDIA's PyPI wheels (nvcc, the CUDA runtime and cuBLAS/cuRAND
# headers ship there as packages).
#
#   bash scripts/build-cuda.sh [COMPUTE_CAP]     (default 90: Hopper, e.g. H100/H200)
#   bash scripts/build-cuda.sh --check           (type-check the cuda code paths only)
#
# Produces target/release/modelcache-agent linked against CUDA 13.0 bindings:
# on the GPU machine the driver provides libcuda.so.1 (driver >= 580), and
# cuBLAS, cuRAND and NVRTC come from the system or from Python packages (see
# scripts/gpu-check.sh, which finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
if [ "${1:-}" = --check ]; then check=true; shift; fi
cap=${1:-90}
venv=${CUDA_VENV:-.ci/cuda-venv}
# Exit status 3: the toolchain could not be installed (CI then skips the check).
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || exit 3
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
  'nvidia-cuda-nvcc==13.*' 'nvidia-cuda-runtime==13.*' 'nvidia-cuda-cccl==13.*' 'nvidia-cuda-crt==13.*' \
  'nvidia-cublas==13.*' 'nvidia-curand==10.*' 'nvidia-cuda-nvrtc==13.*' ||
  { echo "could not install NVIDIA's CUDA wheels from PyPI" >&2; exit 3; }
C=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$C/bin/nvcc" ] || { echo "no nvcc under $C" >&2; exit 1; }
"$C/bin/nvcc" --version | tail -2

# Unversioned link names, and a stand-in libcuda.so (the driver library is on the GPU machine).
links=$(pwd)/target/cuda-link
mkdir -p "$links"
for lib in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$C"/lib/lib$lib.so.* 2>/dev/null | awk 'NR == 1')
  [ -n "$real" ] || { echo "missing lib$lib in $C/lib" >&2; exit 1; }
  ln -sf "$real" "$links/lib$lib.so"
done
[ -f "$links/libcuda.so" ] || gcc -shared -x c /dev/null -o "$links/libcuda.so" -Wl,-soname,libcuda.so.1

export PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_PATH="$C" CUDA_HOME="$C" CUDA_TOOLKIT_ROOT_DIR="$C"
export NVCC_APPEND_FLAGS="-I$C/include -I$C/include/cccl" CUDA_COMPUTE_CAP="$cap" CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L $links -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files"
if $check; then
  time cargo check -p modelcache-agent --features cuda --all-targets
  exit
fi
time cargo build --release -p modelcache-agent --features cuda --bin modelcache-agent --bin modelcache-gpu-bench
# rustc links with --as-needed, so the driver library is not recorded; add it.
command -v patchelf >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq patchelf >/dev/null; } || true
for bin in target/release/modelcache-agent target/release/modelcache-gpu-bench; do
  if command -v patchelf >/dev/null; then
    for lib in libcuda.so.1 libnvrtc.so.13 libcublasLt.so.13; do
      readelf -d "$bin" | grep -q "$lib" || patchelf --add-needed "$lib" "$bin"
    done
  fi
  readelf -d "$bin" | grep -q 'libcuda.so.1' || echo "warning: $bin does not record libcuda.so.1 (install patchelf, or LD_PRELOAD it on the GPU machine)" >&2
done
echo "built target/release/modelcache-agent and modelcache-gpu-bench (CUDA 13.0 bindings, sm_$cap)"
