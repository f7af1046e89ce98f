# Shared by the device scripts (sourced): the CUDA libraries' path, NCCL from PyTorch's wheel, and
# `step SECONDS NAME COMMAND...`, which runs a command under its own time limit and reports it.
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
# zoo opens NCCL at run time (the multi-GPU tests and runs): PyTorch's nvidia-nccl wheel has it.
if [ -z "${ZOO_NCCL_LIB:-}" ]; then
  lib=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2'))" 2> /dev/null) \
    && [ -f "$lib" ] && export ZOO_NCCL_LIB=$lib
fi
# cuDNN (zoo's cuDNN attention, ZOO_FLASH_CUDNN=1) from PyTorch's nvidia-cudnn wheel: its folder on
# the loader's path (libcudnn.so.9 opens its engine libraries by name) and the library itself.
if [ -z "${ZOO_CUDNN_LIB:-}" ]; then
  # nvidia/cudnn/lib in the wheel's layout; failing that, wherever under the site-packages that
  # hold torch a libcudnn.so.9 lies.
  lib=$(python3 -c "
import glob, os
try:
    import nvidia.cudnn
    roots = [os.path.join(p, 'lib') for p in nvidia.cudnn.__path__]
except ImportError:
    roots = []
try:
    import torch
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)) + '/**')
except ImportError:
    pass
for r in roots:
    hits = glob.glob(os.path.join(r, 'libcudnn.so.9'), recursive=True)
    if hits:
        print(hits[0]); break
" 2> /dev/null)
  [ -n "$lib" ] && [ -f "$lib" ] && export ZOO_CUDNN_LIB=$lib LD_LIBRARY_PATH=$(dirname "$lib"):$LD_LIBRARY_PATH
fi
# The cuDNN frontend opens the CUDA runtime too; name the CUDA 13 one.
export CUDNN_FRONTEND_CUDART_LIB_NAME=${CUDNN_FRONTEND_CUDART_LIB_NAME:-libcudart.so.13}
step() { # seconds name command...
  local s=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$s" "$@"; local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  return $rc
}
# configs/bench-baseline.toml (the twins' model) at LAYERS, D_MODEL and HEADS, on stdout, as
# scripts/twin-bench.py's zoo_config makes it.
baseline_at() { # layers d heads
  sed -e "s/^d_model = .*/d_model = $2/" -e "s/^n_layers = .*/n_layers = $1/" -e "s/n_heads = 8/n_heads = $3/" \
    configs/bench-baseline.toml
}
# The CUDA zoo at /tmp/zoo, from .devpkg/zoo.xz (xz: half the size of gzip, room for checkpoints
# under the carry limit; python3's lzma unpacks it, the device has no xz) or .devpkg/zoo.gz; a
# /tmp/zoo already there (a warm machine) is kept.
zoo_binary() {
  [ -x /tmp/zoo ] && return 0
  if [ -f .devpkg/zoo.xz ]; then
    python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.devpkg/zoo.xz'), open('/tmp/zoo', 'wb'))" || return 1
  else
    gunzip -c .devpkg/zoo.gz > /tmp/zoo || return 1
  fi
  chmod +x /tmp/zoo
}
# A test binary of .devpkg/tests (gzipped by build-cuda.sh --tests, or xz-compressed: half the
# size; python3's lzma unpacks it, the device has no xz) unpacked to DST, executable.
unpack_test() { # src dst
  case "$1" in
    *.xz) python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$1" "$2" ;;
    *) gunzip -c "$1" > "$2" ;;
  esac && chmod +x "$2"
}
# The test binary NAME of .devpkg/tests (NAME.xz or NAME.gz) unpacked to DST; fails when neither is there.
unpack_named() { # name dst
  local f
  for f in ".devpkg/tests/$1.xz" ".devpkg/tests/$1.gz"; do
    [ -f "$f" ] && { unpack_test "$f" "$2"; return; }
  done
  return 1
}
# The CUDA test binaries of .devpkg/tests (scripts/device-tests.sh), then the flash tests again
# with the WMMA (ZOO_FLASH_MMA=0) and the ldmatrix mma.sync (=2) attention kernels, all appended
# to LOG. Fails where the default or the WMMA kernels' tests fail; mma2 is opt-in: its failure is
# reported (a bench's fused_mma2 numbers then mean nothing) but does not fail the call.
# KERNEL_TESTS=cudnn: only the flash tests with ZOO_FLASH_CUDNN=1 (the cuDNN path's check, when
# nothing else changed since the full set last passed).
kernel_tests() { # log
  local log=$1 ok=0
  if [ "${KERNEL_TESTS:-all}" = cudnn ]; then
    unpack_named flash /tmp/flash
    step 150 tests-cudnn env ZOO_FLASH_CUDNN=1 /tmp/flash --test-threads 1 --nocapture >> "$log" 2>&1 || ok=1
    return $ok
  fi
  step 180 tests bash scripts/device-tests.sh >> "$log" 2>&1 || ok=1
  if [ -f /tmp/flash ]; then
    step 90 tests-wmma env ZOO_FLASH_MMA=0 /tmp/flash --test-threads 1 >> "$log" 2>&1 || ok=1
    step 90 tests-mma2 env ZOO_FLASH_MMA=2 /tmp/flash --test-threads 1 >> "$log" 2>&1
    # The default is cuDNN where the build has it (device-tests.sh above ran it): the mma kernels
    # on their own too.
    step 120 tests-mma env ZOO_FLASH_CUDNN=0 /tmp/flash --test-threads 1 >> "$log" 2>&1 || ok=1
  fi
  return $ok
}
