#!/usr/bin/env bash
# Run the CUDA test binaries made by `scripts/build-cuda.sh --tests` on the GPU machine (no Rust
# there): every .devpkg/tests/*.gz, all its tests, output to stdout. Exit status: the first failure.
#   device:  run(command="bash scripts/device-tests.sh", carry=[".devpkg"])
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
# zoo opens NCCL at run time (the multi-GPU tests): PyTorch's nvidia-nccl wheel has it.
if [ -z "${ZOO_NCCL_LIB:-}" ]; then
  lib=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2'))" 2> /dev/null) \
    && [ -f "$lib" ] && export ZOO_NCCL_LIB=$lib
fi
rc=0
for t in .devpkg/tests/*.gz; do
  exe=/tmp/$(basename "$t" .gz); gunzip -c "$t" > "$exe" && chmod +x "$exe"
  echo "== $(basename "$exe")"
  "$exe" --test-threads 1 "$@" || { r=$?; [ $rc = 0 ] && rc=$r; }
done
exit $rc
