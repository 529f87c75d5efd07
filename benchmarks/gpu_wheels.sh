#!/usr/bin/env bash
# Prepares, on a machine with a package index, the wheels that benchmarks/gpu_check.sh installs on a
# GPU machine without one (Python 3.12 there): DALI (~200 MB, split into 60 MB parts) and its
# dependencies, packed into folders .whl/batch-1, .whl/batch-2, ... of at most 60 MB each, so each
# fits one transfer to the GPU machine (.whl/ is ignored by git). On the GPU machine, one call per
# batch, back to back while it stays warm:
#     mkdir -p /tmp/wheelparts && cp .whl/batch-N/* /tmp/wheelparts/      (carry .whl/batch-N)
# then `bash benchmarks/gpu_check.sh` joins the parts and installs everything in /tmp/wheelparts.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PIP=${PIP:-python3 -m pip}
LIMIT=$((60 * 1024 * 1024))
rm -rf .whl /tmp/gpu_wheels && mkdir -p .whl /tmp/gpu_wheels/split
get() { $PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" \
          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d /tmp/gpu_wheels "$@"; }
get nvidia-dali-cuda130==2.4.0
get nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-libnvcomp-cu13 astunparse gast optree makefun libcst nvtx six
for w in /tmp/gpu_wheels/*.whl; do
  if [ "$(stat -c %s "$w")" -gt "$LIMIT" ]; then
    split -b "$LIMIT" "$w" "/tmp/gpu_wheels/split/$(basename "$w").part-" && rm "$w"
  fi
done
batch=1 used=0
for f in /tmp/gpu_wheels/split/* /tmp/gpu_wheels/*.whl; do
  size=$(stat -c %s "$f")
  if [ $((used + size)) -gt "$LIMIT" ]; then batch=$((batch + 1)); used=0; fi
  mkdir -p ".whl/batch-$batch" && cp "$f" ".whl/batch-$batch/" && used=$((used + size))
done
du -sh .whl/batch-*
