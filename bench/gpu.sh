#!/usr/bin/env bash
# Everything the GPU machine can tell us, in one call of at most 10 minutes (stage first: bench/gpu-stage.sh).
#   bench/gpu.sh OUT        (make bench-gpu OUT=...; DEADLINE_S=N: the call's own limit less a margin, default 570)
# 1. installs the staged wheels (DALI, kornia, dlib) from /tmp/parts (bench/gpu-env.sh); 2. shards 3,000
# synthetic CelebA faces once, for the benchmarks; 3. the step alone at 64 and 128 px, batch 128 and 256,
# new against old, split into parts, with MFU (bench.step; the self-blends replayed from a CUDA graph, as
# train.graph_inputs: auto makes them on GPUs), then the self-blends alone, eager and graphed, with the 12
# kernels that take the most time (bench.blends --profile; compiled is left out: its first call compiles for
# 76 s, and it gained 1.08x over the graph at 128 px, BENCHMARKS.md); 4. the `gpu` tests;
# 5. the DALI loader alone, mixed decoding from shards on local disk (bench.loader); 6. end to end, the
# trainer fed by DALI against the same trainer on a batch already on the GPU, with and without self-blends
# and their graph (bench.train); 7. last, in whatever time is left, the step in torch.compile's default
# and reduce-overhead modes side by side in one process (CUDA graphs of D's and G's passes too; 64 px,
# batch 128). Each part has its own time limit, so that a slow or broken one leaves the others their time.
# OUT gets device.txt, parts.log (every part's output), summary.txt and the benchmarks' five JSON files,
# nothing else (the device tool brings back at most 8 files); the tables are printed last.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bench/gpu.sh OUT" >&2; exit 2; }
out=$(realpath -m "$1")
deadline=${DEADLINE_S:-570}  # the call's own limit less a margin: pass the run's timeout_s less 30 when it is lower
[[ $deadline =~ ^[0-9]+$ ]] || { echo "DEADLINE_S is $deadline: give a whole number of seconds" >&2; exit 2; }
mkdir -p "$out"
cd "$(dirname "$0")/.."
source bench/gpu-env.sh
device_info > "$out/device.txt" 2>&1
cat "$out/device.txt"
data=$(mktemp -d)
run() {  # name, seconds, command...: each part is bounded, and none runs past the deadline
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  [ "$limit" -lt $((deadline - SECONDS)) ] || limit=$((deadline - SECONDS))
  if [ "$limit" -lt 15 ]; then echo "== $name: skipped, $((deadline - SECONDS)) s left" | tee -a "$out/parts.log" "$out/summary.txt"; return; fi
  echo "== $name" >> "$out/parts.log"
  timeout "$limit" "$@" >> "$out/parts.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$out/parts.log" "$out/summary.txt"
}
run shards 75 bash -c "$py -m shards synth celeba --out $data/celeba --faces cartoon --images 3000 &&
  $py -m shards celeba --root $data/celeba --out $data/shards --workers $(nproc) --maxcount 500 --no-progress"
run step 170 $py -m bench.step --device cuda --size 64 128 --batch 128 256 --warmup 10 --steps 50 --out "$out"
run blends 60 $py -m bench.blends --device cuda --size 64 128 --batch 128 --compiled 0 --profile 12 --out "$out"
run gpu-tests 270 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_sbi.py tests/test_data.py \
  tests/test_trainer_rules.py tests/test_detect.py tests/test_evaluate.py
run loader 45 $py -m bench.loader --device cuda --shards "$data/shards/celeba" --threads 8 --batch 256 --out "$out"
run train 100 $py -m bench.train --device cuda --shards "$data/shards/celeba" --batch 128 --steps 100 --warmup 10 \
  --precision bf16 --channels-last 1 --compile 1 --inputs tensors dali --sbi 0 1 --graph-inputs 0 1 --out "$out"
# The step is launch-bound (BENCHMARKS.md): reduce-overhead makes D's and G's passes CUDA graphs too (1.3-1.5x from
# two processes; one process pins it). Last: it gets the time the others left.
run step-graphs 90 $py -m bench.step --device cuda --size 64 --batch 128 --warmup 10 --steps 50 --out "$out" \
  --name step-cuda-compile-modes --compile-mode default reduce-overhead
rm -rf "$data"
echo; grep -h '^| [0-9]' "$out/parts.log" | sort -u
grep -h -E '^(cuda batch|bf16 channels_last|[0-9]+ (passed|failed)|FAILED|ERROR)' "$out/parts.log"
cat "$out/summary.txt"
