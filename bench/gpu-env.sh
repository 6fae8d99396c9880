# Sourced by bench/gpu.sh and bench/gpu-detector.sh on the GPU machine: installs the wheels that
# bench/gpu-stage.sh staged in /tmp/parts (once per machine) and puts them and the repository on PYTHONPATH.
# Staged shards, if any, land in /tmp/stage/data/<name>.
py=python3
if [ ! -e /tmp/site/.installed ]; then  # a marker: an import check cost a reinstall per call on the H200
  if compgen -G "/tmp/parts/part-*" >/dev/null; then
    mkdir -p /tmp/stage && cat /tmp/parts/part-* | tar -x -C /tmp/stage &&
      $py -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site /tmp/stage/wheels/* &&
      touch /tmp/site/.installed
  fi
  # Nothing measures without them: stop now rather than spend the call on parts that each fail at import.
  [ -e /tmp/site/.installed ] || { echo "the staged wheels in /tmp/parts are missing or did not install (a part not" \
    "copied, or cut short?): stage every part again (bench/gpu-stage.sh, see its header)" >&2; exit 3; }
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

device_info() {  # the card and the versions, for BENCHMARKS.md; not the commit: the device's copy of the
  # working tree carried an older .git (2026-11-26: it named 559a795 for f1d71f1), so BENCHMARKS.md takes
  # the commit from the machine that made the call
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  $py -c 'import nvidia.dali as d, kornia; print("dali", d.__version__, "kornia", kornia.__version__)'
  echo "cpus $(nproc)"
}
