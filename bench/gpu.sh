#!/usr/bin/env bash
# Everything the GPU machine can tell us, in one call of at most 10 minutes (stage first: bench/gpu-stage.sh).
#   bench/gpu.sh OUT        (make bench-gpu: OUT = bench/results/gpu)
# 1. installs the staged wheels (DALI, kornia, dlib) from /tmp/parts; 2. the `gpu` tests; 3. the step alone
# at 64 and 128 px, batch 128 and 256, new against old, split into parts, with MFU (bench.step); 4. the
# DALI loader alone, mixed decoding from shards on local disk (bench.loader); 5. end to end, the trainer
# fed by DALI against the same trainer on a batch already on the GPU (bench.train). JSON and logs go to
# OUT; the tables are printed last.
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=python3
if ! $py -c 'import nvidia.dali, kornia' 2>/dev/null; then
  if compgen -G "/tmp/parts/part-*" >/dev/null; then
    cat /tmp/parts/part-* | tar -x -C /tmp && $py -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site /tmp/wheels/*
  else
    echo "no staged wheels in /tmp/parts: run bench/gpu-stage.sh first (see its header)" >&2
  fi
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  $py -c 'import nvidia.dali as d; print("dali", d.__version__)'
  git rev-parse HEAD 2>/dev/null; } > "$out/device.txt" 2>&1
run() {  # name, seconds, command...: each part is bounded so that the call's total fits in 10 minutes
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "exit $?" >> "$out/$name.log"
  tail -n 12 "$out/$name.log" | tee -a "$out/summary.txt"
}
run gpu-tests 150 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_step.py tests/test_sbi.py tests/test_data.py
run step 200 $py -m bench.step --device cuda --size 64 128 --batch 128 256 --warmup 10 --steps 50 --out "$out"
run loader 90 $py -m bench.loader --device cuda --threads 8 --batch 256 --synthetic-images 12000 --out "$out"
run train 120 $py -m bench.train --device cuda --batch 128 --steps 100 --warmup 10 --precision bf16 --channels-last 1 \
  --compile 1 --inputs tensors dali --sbi 0 1 --out "$out"
cat "$out/device.txt"
