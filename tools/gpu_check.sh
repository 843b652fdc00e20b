#!/usr/bin/env bash
# Everything the course checks on a real GPU, in one call (device time is scarce): the test suite on the GPU
# backend, every solution notebook under nbval, the GPU-vs-emulator parity check and the benchmarks.
#
#   bash tools/gpu_check.sh [stage ...]      stages: env tests nbval parity bench train (default: all)
#
# Run from the repository root on a machine with an NVIDIA GPU and CuPy. If nbval and the Jupyter kernel stack
# are missing (an offline GPU machine), carry wheels in .whl/ (see README, "Teachers") and they are installed
# first. Logs go to $OUT (or results/gpu-run/) as <stage>.log; copy the ones worth keeping to
# results/<topic>-<device>-<date>.log.
set -u
out=${OUT:-results/gpu-run}
mkdir -p "$out"
stages=${*:-env tests nbval parity bench train}
export PYTHONUNBUFFERED=1 LLMC_DEVICE=gpu
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  python3 -m ipykernel install --user --name python3 >/dev/null
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
run() {  # run STAGE CMD...: log to $out/STAGE.log, remember failures, keep going
  local stage=$1; shift
  echo "=== $stage: $*"
  local t0=$SECONDS
  "$@" > "$out/$stage.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$stage.log"
  echo "=== $stage: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
for s in $stages; do
  case $s in
    env) run env bash -c 'date -u; nvidia-smi; nvcc --version | tail -2; python3 -c "
import sys, numpy, cupy, llmc_lessons.device as d
print(sys.version); print(\"numpy\", numpy.__version__, \"cupy\", cupy.__version__, \"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion())
print(d.describe())
try:
    import torch; print(\"torch\", torch.__version__, torch.version.cuda)
except ImportError: print(\"torch missing\")"' ;;
    tests) run tests python3 -m pytest -q -p no:cacheprovider --durations=15 ${TEST_ARGS:-} tests ;;
    nbval) run nbval python3 -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env --durations=15 solutions ;;
    parity) run parity python3 tools/gpu_parity.py ;;
    bench) run bench python3 -m llmc_lessons.bench --profile --json "$out/bench.json" ${BENCH_ARGS:-} ;;
    train) run train python3 -m llmc_lessons.train --model d12 --batch-size 16 --seq-len 1024 --steps 300 --out /tmp/runs/d12 ;;
    *) echo "unknown stage $s"; status=1 ;;
  esac
done
exit $status
