#!/usr/bin/env bash
# Build the `zoo` binary with CUDA support on this (GPU-less) machine, for an H100 (sm_90).
#
# Recipe:
#  1. nvcc 13.0 + CUDA headers and the libraries candle links (cuBLAS, cuRAND, NVRTC) come from PyPI wheels,
#     installed into .cuda/ (ignored by git).
#  2. candle links libcuda directly; there is no driver here, so we link against a stub libcuda.so
#     (soname libcuda.so.1) whose symbols are the `cu*` names in cudarc's driver bindings. On the GPU
#     machine the real driver's libcuda.so.1 is found at run time.
#  3. CUDA_COMPUTE_CAP=90, nvcc on PATH, RUSTFLAGS=-L <dir with the .so links>.
# Output: .devbin/zoo (ignored; carry it to the device); with --tests also the CUDA test binaries
# in .devpkg/tests/. On the device run it with
#   LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib .devbin/zoo ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA=$ROOT/.cuda
if [ ! -x "$CUDA/py/nvidia/cu13/bin/nvcc" ] && [ -z "$(find "$CUDA/py" -name nvcc -type f 2>/dev/null | head -1)" ]; then
  python3 -m pip install -q --target "$CUDA/py" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
NVCC=$(find "$CUDA/py" -name nvcc -type f | head -1)
CUHOME=$(dirname "$(dirname "$NVCC")")
chmod +x "$NVCC" "$CUHOME"/bin/* "$CUHOME"/nvvm/bin/* 2>/dev/null || true
# Make a CUDA_HOME-like tree: bin, include, lib64 with unversioned .so links.
LIB=$CUDA/lib; mkdir -p "$LIB"
for so in $(find "$CUDA/py" -name 'lib*.so*' -type f); do
  base=$(basename "$so"); stem=${base%%.so*}
  ln -sf "$so" "$LIB/$base"; ln -sf "$so" "$LIB/$stem.so"
done
# All the wheels unpack into one nvidia/cu13 tree (bin, include, nvvm, lib), which is what nvcc
# expects; only lib64 needs adding.
[ -e "$CUHOME/nvvm" ] || ln -sf "$(find "$CUDA/py" -type d -name nvvm | head -1)" "$CUHOME/nvvm"
[ -e "$CUHOME/lib64" ] || ln -sf "$LIB" "$CUHOME/lib64"
# Stub libcuda.so.1 from cudarc's driver symbol names.
cargo fetch -q
CUDARC=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDARC/src/driver/sys" | sort -u > "$CUDA/cu_syms.txt"
{ echo '/* generated stub: never called, only linked against */'
  while read -r s; do echo "int $s(void){return 999;}"; done < "$CUDA/cu_syms.txt"; } > "$CUDA/stub.c"
gcc -shared -fPIC -o "$LIB/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$CUDA/stub.c"
ln -sf libcuda.so.1 "$LIB/libcuda.so"
# cuDNN's fused attention (crates/kernels/src/cudnn): the cuDNN frontend's header-only C++ API and
# cuDNN's C headers, from their PyPI wheels (headers only are kept; the wheel of cuDNN itself is
# 350 MB). cuDNN is opened at run time, from PyTorch's wheel on the GPU machine.
FE=$CUDA/cudnn-fe/include; CUDNN_INC=$CUDA/cudnn/nvidia/cudnn/include
if [ ! -f "$FE/cudnn_frontend.h" ] || [ ! -f "$CUDNN_INC/cudnn.h" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" nvidia-cudnn-frontend==1.32.0 nvidia-cudnn-cu13==9.13.0.50
  mkdir -p "$CUDA/cudnn-fe" "$CUDA/cudnn"
  (cd "$CUDA/cudnn-fe" && unzip -q -o "$tmp"/nvidia_cudnn_frontend-*.whl 'include/*')
  (cd "$CUDA/cudnn" && unzip -q -o "$tmp"/nvidia_cudnn_cu13-*.whl 'nvidia/cudnn/include/*')
  rm -rf "$tmp"
fi
export ZOO_CUDNN_INCLUDE=$FE:$CUDNN_INC
export PATH=$CUHOME/bin:$PATH CUDA_HOME=$CUHOME CUDA_PATH=$CUHOME CUDA_ROOT=$CUHOME
export CUDA_COMPUTE_CAP=90 RUSTFLAGS="-L $LIB"
export LD_LIBRARY_PATH=$LIB:${LD_LIBRARY_PATH:-}
cargo build --release --features cuda -p zoo-harness --target-dir target-cuda
# ZOO_DEVPKG: the folder to fill (default .devpkg; e.g. .devpkg-x2 for the multi-GPU checks, whose
# test binary would not fit beside the others in one call's 64 MiB).
PKG=${ZOO_DEVPKG:-.devpkg}
mkdir -p .devbin "$PKG" && cp target-cuda/release/zoo .devbin/zoo && strip .devbin/zoo && gzip -9 -c .devbin/zoo > "$PKG/zoo.gz"
echo "built .devbin/zoo and $PKG/zoo.gz (carry $PKG to the device: gunzip -c $PKG/zoo.gz > /tmp/zoo)"
# The CUDA tests of the kernels, built here and run there (scripts/device-tests.sh): each test
# target's binary, stripped and gzipped into $PKG/tests/ (about 12 MB each: the device takes
# 64 MiB a call, so ZOO_CUDA_TESTS="crate:test ..." can pick fewer than all).
if [ "${1:-}" = --tests ]; then
  rm -rf "$PKG/tests" && mkdir -p "$PKG/tests"
  for pt in ${ZOO_CUDA_TESTS:-zoo-core:fused zoo-kernels:embedding zoo-core:flash}; do
    # A crate without a `cuda` feature of its own (zoo-moe) gets CUDA through zoo-core's (the first
    # try's failure must not end the script under set -e: hence the `|| true`).
    for feat in cuda zoo-core/cuda; do
      exe=$(cargo test --release --features "$feat" -p "${pt%%:*}" --test "${pt#*:}" --target-dir target-cuda --no-run \
        --message-format=json 2> /dev/null | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 || true)
      [ -n "$exe" ] && echo "$exe" && break
    done
  done | while read -r exe; do
      name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
      strip -o "$PKG/tests/$name" "$exe" && gzip -9 -f "$PKG/tests/$name"
      echo "test binary $PKG/tests/$name.gz"
    done
fi
