#!/usr/bin/env bash
# The detector trained on a GPU, in one call of at most 10 minutes (stage first, with the shards:
# bench/gpu-stage.sh prepare CELEBA_SHARDS CELEBDF_SHARDS, folders named celeba and celebdf).
#   bench/gpu-detector.sh OUT [SECONDS]      (SECONDS of training per run, default 150)
# bench.detector's self-blend D without G (configs/sbi-smoke.yaml as the CPU figures in BENCHMARKS.md, but
# batch 128: a GPU step at 32 is launch-bound), then the same at 128 px with a wider D (ndf 64), each scored
# on the staged Celeb-DF test split. The first run replays the self-blends from a CUDA graph
# (train.graph_inputs=true), which also checks the graph inside the trainer (DALI's threads, checkpoints);
# if that run fails, it runs again without it. Last, the `gpu` tests in the time left of 10 minutes.
# OUT gets device.txt, detector.log, gpu-tests.log and the JSON of each run.
set -uo pipefail
out=$(realpath -m "${1:?usage: bench/gpu-detector.sh OUT [SECONDS]}")
seconds=${2:-150}
mkdir -p "$out"
cd "$(dirname "$0")/.."
source bench/gpu-env.sh
device_info > "$out/device.txt" 2>&1
cat "$out/device.txt"
data=/tmp/stage/data
limit=$((seconds + 120))  # training, then compiling, calibrating and scoring about 6,000 frames
detector() {  # name, overrides...
  local name=$1; shift
  echo "== $name" >> "$out/detector.log"
  timeout "$limit" $py -m bench.detector --celeba "$data/celeba" --celebdf "$data/celebdf" --device cuda \
    --minutes "$(awk "BEGIN { print $seconds / 60 }")" --variants sbi-only --out "$out" --name "detector-$name" data.batch_size=128 "$@" >> "$out/detector.log" 2>&1
  local rc=$?; echo "== $name: exit $rc" | tee -a "$out/detector.log"; return $rc
}
detector 64px-graph train.graph_inputs=true || detector 64px train.graph_inputs=false
detector 128px data.image_size=128 model.ndf=64
left=$((570 - SECONDS))  # the device runs a call for at most 600 s
if [ "$left" -gt 60 ]; then
  timeout "$left" $py -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_sbi.py tests/test_data.py \
    > "$out/gpu-tests.log" 2>&1
  echo "== gpu tests: exit $? ($(tail -1 "$out/gpu-tests.log"))"
fi
grep -h '^| sbi-only' "$out/detector.log"
