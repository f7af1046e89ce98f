#!/usr/bin/env bash
# Run the CUDA test binaries made by `scripts/build-cuda.sh --tests` on the GPU machine (no Rust
# there): every .devpkg/tests/*.gz, all its tests, output to stdout. Exit status: the first failure.
#   device:  run(command="bash scripts/device-tests.sh", carry=[".devpkg"])
set -u
. "$(dirname "$0")/device-lib.sh"
rc=0
for t in .devpkg/tests/*.gz; do
  exe=/tmp/$(basename "$t" .gz); gunzip -c "$t" > "$exe" && chmod +x "$exe"
  echo "== $(basename "$exe")"
  "$exe" --test-threads 1 "$@" || { r=$?; [ $rc = 0 ] && rc=$r; }
done
exit $rc
