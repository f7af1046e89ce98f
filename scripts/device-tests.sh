#!/usr/bin/env bash
# Run the CUDA test binaries made by `scripts/build-cuda.sh --tests` on the GPU machine (no Rust
# there): every .devpkg/tests/*.gz, all its tests, output to stdout. Exit status: the first failure.
#   device:  run(command="bash scripts/device-tests.sh", carry=[".devpkg"])
set -u
. "$(dirname "$0")/device-lib.sh"
rc=0
# Each binary gzipped (build-cuda.sh --tests) or xz-compressed (half the size: room for more
# under the device's 64 MiB; python3's lzma unpacks it, the device has no xz).
for t in .devpkg/tests/*.gz .devpkg/tests/*.xz; do
  [ -f "$t" ] || continue
  exe=/tmp/$(basename "$t" | sed 's/\.\(gz\|xz\)$//')
  unpack_test "$t" "$exe"
  echo "== $(basename "$exe")"
  "$exe" --test-threads 1 "$@" || { r=$?; [ $rc = 0 ] && rc=$r; }
done
exit $rc
