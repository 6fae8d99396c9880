#!/usr/bin/env bash
# The detector trained on a GPU, in one call of at most 10 minutes (stage first, with the shards:
# bench/gpu-stage.sh prepare CELEBA_SHARDS CELEBDF_SHARDS, folders named celeba and celebdf).
#   bench/gpu-detector.sh OUT [SECONDS [key=value ...]]   (SECONDS of training, a whole number, default 300; overrides
#                                                          for the detector, e.g. data.image_size=256 model.ndf=32)
#   DEADLINE_S=N bench/gpu-detector.sh ...                 (the call's own limit less a margin, default 570: pass the
#                                                          run's timeout_s less 30 when the session has less left)
#   ALSO="key=value ..." bench/gpu-detector.sh ...          (then a second detector for the same SECONDS, with these
#                                                          overrides added: a pair on one machine, e.g.
#                                                          ALSO=model.d_blocks=1; each run takes SECONDS and up to
#                                                          120 s more to compile and score, so two fit in one call
#                                                          with SECONDS up to about 160, and leave nothing after)
# bench.detector's self-blend D without G at 128 px with ndf 64 and batch 128 (configs/sbi-smoke.yaml
# otherwise): on an H200 it reached video AUC 0.80 after 120 s and 0.84 after 210 s, and 0.856 in a
# 300 s run with the self-blend graph, on the 937-person synthetic data, where 64 px had stopped near 0.77
# (BENCHMARKS.md); 256 px with ndf 32 (`300 data.image_size=256 model.ndf=32`) reached 0.836 in 5,250 steps, each
# 3.3 times as long. Since 2026-11-27 the detector scored is D_ema (train.d_ema_beta): the default, `OUT 300`,
# reached 0.869 with it (an H200, 17,159 steps), against the 0.856 of D itself. Scored on the staged Celeb-DF
# test split. The self-blends come from a CUDA graph (train.graph_inputs: auto; add
# train.compile_inputs=true to fuse them too), D's passes from reduce-overhead's (train.compile_mode: auto, since
# 2026-11-27 evening); if that run fails, it runs again without either.
# Then the `gpu` tests, the self-blends alone at 128 and 256 px with their heaviest kernels (bench.blends), and
# last, on the staged CelebA shards, the trainer end to end with G and the self-blend graph, torch.compile's
# default mode against reduce-overhead (bench.train, 64 px, batch 128), each in the time the call has left.
# OUT gets detector.log (the card and versions first), gpu-tests.log, blends.log, train.log and the JSON of each part.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bench/gpu-detector.sh OUT [SECONDS [key=value ...]]" >&2; exit 2; }
out=$(realpath -m "$1")
seconds=${2:-300}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "SECONDS is $seconds: give a whole number of seconds" >&2; exit 2; }
shift $(($# < 2 ? $# : 2))  # what is left: overrides for the detector
deadline=${DEADLINE_S:-570}
[[ $deadline =~ ^[0-9]+$ ]] || { echo "DEADLINE_S is $deadline: give a whole number of seconds" >&2; exit 2; }
mkdir -p "$out"
cd "$(dirname "$0")/.."
source bench/gpu-env.sh
device_info 2>&1 | tee "$out/detector.log"  # the card and versions head the detector's log: the device tool brings
# back 8 files, and a run with its eager retry writes 8 besides
data=/tmp/stage/data
left() { echo $((deadline - SECONDS)); }  # the device runs a call for at most 600 s, and less when the session has less
detector() {  # name, overrides...: training, then compiling, calibrating and scoring about 6,000 frames
  local name=$1 limit=$((seconds + 120)); shift
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  [ "$limit" -gt 60 ] || { echo "== $name: skipped, $(left) s left" | tee -a "$out/detector.log"; return 124; }
  echo "== $name" >> "$out/detector.log"
  timeout "$limit" $py -m bench.detector --celeba "$data/celeba" --celebdf "$data/celebdf" --device cuda \
    --minutes "$(awk "BEGIN { print $seconds / 60 }")" --variants sbi-only --out "$out" --name "detector-$name" \
    data.batch_size=128 data.image_size=128 model.ndf=64 "$@" >> "$out/detector.log" 2>&1
  local rc=$?; echo "== $name: exit $rc" | tee -a "$out/detector.log"; return $rc
}
# Without CUDA graphs (the self-blends' and reduce-overhead's) only if the first run failed by itself (one that ran
# out of time would again) and there is time for a whole second run.
detector gpu "$@" || { [ $? -ne 124 ] && [ "$(left)" -gt $((seconds + 120)) ] &&
  detector gpu-eager "$@" train.graph_inputs=false train.compile_inputs=false train.compile_mode=default; }
# ALSO's words are overrides, split on blanks as the command line's would be.
[ -z "${ALSO:-}" ] || detector also "$@" ${ALSO}
part() {  # name, seconds, log, command...: bounded by its own limit and by the deadline
  local name=$1 limit=$2 log=$3; shift 3
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  if [ "$limit" -gt 30 ]; then
    timeout "$limit" "$@" > "$out/$log" 2>&1
    echo "== $name: exit $? ($(tail -1 "$out/$log"))"
  else
    echo "== $name: skipped, $(left) s left"
  fi
}
# The `gpu` tests first (206 s for 14 on an H200, 2026-11-27 evening, one more since; they gate defaults), then the
# self-blends alone at the detector's sizes, eager and graphed, with the kernels that take their time
# (bench.blends --profile; a minute), then the trainer end to end with G, torch.compile's default mode against
# reduce-overhead, in what is left.
part "gpu tests" 270 gpu-tests.log $py -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_sbi.py \
  tests/test_data.py tests/test_trainer_rules.py tests/test_detect.py tests/test_evaluate.py
part blends 60 blends.log $py -m bench.blends --device cuda --size 128 256 --batch 128 --compiled 0 --profile 12 \
  --out "$out"
part train 100 train.log $py -m bench.train --device cuda --shards "$data/celeba" --batch 128 --steps 100 --warmup 10 \
  --precision bf16 --channels-last 1 --compile 1 --compile-mode default reduce-overhead --inputs dali --sbi 1 \
  --graph-inputs 1 --out "$out"
grep -h '^| sbi-only' "$out/detector.log" | sort -u
grep -h -E '^\| [0-9]' "$out/blends.log" 2>/dev/null
grep -h "images/s" "$out/train.log" 2>/dev/null
