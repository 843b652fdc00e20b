#!/usr/bin/env bash
# Everything the course checks on a real GPU, in one call (device time is scarce): the test suite on the GPU
# backend (which include the GPU-vs-emulator parity test), every solution notebook under nbval, the training-step
# benchmark against PyTorch (both course precisions), the bf16 step's memory-bound kernels against the copy
# bandwidth, a 500-step GPT-2 124M training run in fp32 and in bf16, and on a machine with several GPUs the
# data-parallel scaling of d12 and d24 against PyTorch's DDP and ZeRO-1 (lesson 17).
#
#   bash tools/gpu_check.sh [stage ...]      stages: env tests arch nbval parts bench kernels memory train multigpu (default: all)
#                                            and, on request: scale (= scale-baseline scale-sizes scale-attention)
#                                            scale-fp32 scale-profiles llama llama-bench attention-profile algorithms
#
# llama (lesson 16): GPT-2 124M (d12) and the LLaMA-style model of the same parameter count (llama-124m), both
# in LLAMA_PRECISION (default fp32, with TF32 matmuls; or bf16), trained for the same LLAMA_STEPS (default 250)
# steps of B=16, T=1024 on the same Shakespeare batches; their loss curves (.jsonl), tokens/s and peak memory
# (.summary.json) go to train/ (llama-<device>-<date>-<precision>-gpt2.* and -llama.*). At most 5 minutes: each
# run is stopped at 140 s.
# llama-bench: the LLaMA-style step (fp32 and bf16) against PyTorch (eager, compiled fp32 with SDPA's GQA,
# compiled bf16) to
# bench/ (bench-<device>-<date>-llama.json).
#
# arch compiles every kernel of the course with NVRTC for sm_75, 80, 86, 89 and 90 and prints the table.
# scale (about 8 minutes on an H100; not in the default): GPT-2 124M against every PyTorch baseline (the plain
# and the padded vocabulary, eager and compiled, each torch.compile mode), then every GPT-2 size (d48, d36, d24,
# d12: the least measured first) in bf16 against PyTorch's compiled step: tokens/s, peak memory, MFU against the
# measured matmul peak, the largest batch each fits; last, causal attention alone at T = 1024 and 2048 in bf16
# and fp32 (the cuBLAS path, the flash kernels, PyTorch's SDPA as it chooses and per backend). Each part has a time limit (SCALE_BASELINE_S, SCALE_SIZES_S seconds)
# and writes its JSON after every row, so a part cut short keeps what it measured (the max-autotune rows, last,
# need minutes of compilation: SCALE_BASELINE_S=600 when there is time); SCALE_ARGS adds arguments to the sizes
# run. The sizes are timed in bf16 with the course also at recompute 1 (llm.c's default).
# scale-fp32 (not in the default; stopped at SCALE_SIZES_S seconds): every size in fp32 (TF32 matmuls and TF32
# flash attention) against PyTorch's compiled fp32 step and its eager one (the fp32 target's baseline), to
# bench/sizes-<device>-<date>-fp32.json (SCALE_ARGS adds arguments).
# scale-profiles (about 3 minutes; not in the default): where the bf16 step's GPU time goes at each size
# PROFILE_SIZES names (default d24:16 d36:16, MODEL:B, the sizes run's batches; d12's and d48's profiles are
# on record): torch.profiler's kernels grouped into products, attention and the rest, to
# bench/bench-<device>-<date>-<model>.json and .log, each stopped at 120 s.
#
# attention-profile (about 2 minutes): why the flash kernels run at the speed they do: torch.profiler's kernel
# names and times for the course's flash kernels and PyTorch's SDPA (which backend, built for which
# architecture), then Nsight Compute's speed-of-light, pipe utilisation, occupancy and warp-stall sections of
# each, in ATTENTION_PRECISIONS (default bf16 fp32), to profile/attention-<device>-<date>-<precision>.log and -<precision>-ncu.log.
#
# algorithms (about 3 minutes): the bf16 step (course only) of each size in ALGORITHMS_SIZES (default d12:16 d48:8,
# MODEL:B) with cuBLASLt's heuristic's first algorithm for every product, then with the measured fastest
# (llmc_lessons.cublas.AlgorithmChoices), to bench/algorithms-<device>-<date>-<model>-<mode>.json and .log; the
# choices themselves to bench/algorithms-<device>-<date>-choices.json.
#
# memory sets the emulator's predicted sectors per request and bank conflicts of a dozen kernels beside Nsight
# Compute's counters (where ncu runs) or the measured bandwidth (tools/memory_check.py; kernels/memory-*.md, .json).
#
# parts trains GPT-2 124M with the solutions' kernels (the student's parts) beside the package's, and prints the table.
# nbval keeps the parts its notebooks' checks pass in a fresh folder, so lessons 10 and 11 build GPT-2 from them;
# it runs the lessons in order in one process (NBVAL_PATHS="-n 6 --dist loadfile solutions" is faster, but a later
# lesson may then run before the parts it uses are kept).
#
# Narrower runs, when device time is short: TEST_ARGS (extra pytest arguments, e.g. --ignore=...; TEST_WORKERS
# the suite's processes, default 12),
# NBVAL_PATHS (default: solutions), BENCH_ARGS (e.g. --attention), TRAIN_PRECISIONS (default: fp32 bf16),
# MULTIGPU_MODELS (default: d12 d24), MULTIGPU_ARGS (e.g. --precisions bf16 --ranks 1 8).
#
# Run from the repository root on a machine with an NVIDIA GPU and CuPy. If nbval and the Jupyter kernel stack
# are missing (an offline GPU machine), carry wheels in .whl/ (see README, "Teachers") and they are installed
# first. Records go to $OUT (or results/gpu-run/) in results/'s layout, <folder>/<topic>-<device>-<date>.<ext>
# (env/, tests/, bench/, kernels/, train/; DEVICE overrides the device's short name, e.g. h100). To keep a run,
# copy its folders into results/ (add a -<what> suffix where a name is taken) and list every file in
# results/README.md's index.
set -u
out=${OUT:-results/gpu-run}
device=${DEVICE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | sed 's/^NVIDIA //' \
  | awk '{print tolower($1)}' | cut -d- -f1)}
device=${device:-gpu}
day=$(date -u +%F)
stages=${*:-env tests arch nbval parts bench kernels memory train multigpu}
expanded=""   # scale names its three parts, which can also be asked for alone
for s in $stages; do
  case $s in
    scale) expanded+=" scale-baseline scale-sizes scale-attention" ;;
    *) expanded+=" $s" ;;
  esac
done
stages=$expanded

export PYTHONUNBUFFERED=1 LLMC_DEVICE=gpu
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  python3 -m ipykernel install --user --name python3 >/dev/null
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
name() {  # name FOLDER TOPIC [WHAT]: the record's path without its extension
  mkdir -p "$out/$1"
  echo "$out/$1/$2-$device-$day${3:+-$3}"
}
run() {  # run STAGE LOG CMD...: log to LOG, remember failures, keep going
  local stage=$1 log=$2; shift 2
  echo "=== $stage: $*"
  local t0=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  tr "\r" "\n" < "$log" | grep -v "step/s" | tail -n 25
  echo "=== $stage: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}
for s in $stages; do
  case $s in
    env) run env "$(name env env).log" bash -c 'date -u; nvidia-smi; nvcc --version | tail -2; python3 -c "
import sys, numpy, cupy, llmc_lessons.device as d
print(sys.version); print(\"numpy\", numpy.__version__, \"cupy\", cupy.__version__, \"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion())
print(d.describe())
try:
    import torch; print(\"torch\", torch.__version__, torch.version.cuda)
except ImportError: print(\"torch missing\")"' ;;
    # tests: across TEST_WORKERS processes (pytest-xdist), one test at a time (--dist load; by file, one worker
    # runs every student notebook, and the suite did not finish within a 10-minute call:
    # results/tests/tests-h100-2026-12-07-unfinished.log; one test at a time it ran in two calls of 40 s and 182 s at
    # 14-15 workers: results/tests/tests-h100-2026-12-07-kernels.log, -rest.log), without the four files about
    # installing the course (the setup cell in a fresh environment, what a student's install holds, nbgrader, a
    # browser): the GPU runs have left them to the CPU CI, whose machine is set up as a student's
    tests) run tests "$(name tests tests).log" python3 -m pytest -q -p no:cacheprovider --durations=15 \
             -n ${TEST_WORKERS:-12} --dist load --ignore=tests/test_setup_cell.py --ignore=tests/test_nbgrader.py \
             --ignore=tests/test_browser.py --ignore=tests/test_student_install.py ${TEST_ARGS:-} tests ;;
    arch) run arch "$(name tests arch).log" python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_arch.py ;;
    nbval) rm -rf /tmp/llmc_parts-nbval
           run nbval "$(name tests nbval).log" env LLMC_PARTS=/tmp/llmc_parts-nbval python3 -m pytest -q \
             -p no:cacheprovider --nbval-lax --nbval-current-env --durations=15 ${NBVAL_PATHS:-solutions} ;;
    parts) run parts "$(name tests parts).log" python3 -m pytest -q -s -p no:cacheprovider -m gpu \
             tests/test_parts.py ;;
    bench) f=$(name bench bench); run bench "$f.log" python3 -m llmc_lessons.bench --profile --json "$f.json" \
             ${BENCH_ARGS:-} ;;
    kernels) f=$(name kernels kernels); run kernels "$f.log" python3 -m llmc_lessons.bench --only-kernels \
               --json "$f.json" ;;
    memory) f=$(name kernels memory); run memory "$f.log" python3 tools/memory_check.py --out "$f" ;;
    train) for precision in ${TRAIN_PRECISIONS:-fp32 bf16}; do  # the same 500-step run in each precision
             rm -rf /tmp/runs/$precision
             f=$(name train train $precision)
             run train-$precision "$f.console.txt" python3 -m llmc_lessons.train --model d12 --batch-size 16 \
               --seq-len 1024 --steps 500 --eval-every 50 --eval-batches 8 --sample-every 100 --sample-tokens 48 \
               --precision $precision --out /tmp/runs/$precision
             cp /tmp/runs/$precision/log.jsonl "$f.jsonl"
             cp /tmp/runs/$precision/summary.json "$f.summary.json"
           done ;;
    algorithms) rm -rf /tmp/llmc_cache-algorithms   # the choices of this stage only, measured on an idle GPU
                for m in ${ALGORITHMS_SIZES:-d12:16 d48:8}; do
                  for mode in heuristic measure; do
                    f=$(name bench algorithms ${m%%:*}-$mode)
                    run algorithms-${m%%:*}-$mode "$f.log" env LLMC_CACHE=/tmp/llmc_cache-algorithms \
                      LLMC_GEMM_ALGORITHMS=$mode python3 -m llmc_lessons.bench --model ${m%%:*} -b ${m##*:} \
                      --precision bf16 --no-torch --steps 10 --warmup 3 --json "$f.json"
                  done
                done
                cp /tmp/llmc_cache-algorithms/cublaslt-*.json "$(name bench algorithms choices).json" ;;
    scale-baseline) f=$(name bench baselines)
                    run scale-baseline "$f.log" timeout ${SCALE_BASELINE_S:-150} python3 -m llmc_lessons.bench \
                      --steps 10 --warmup 3 --compile-modes default max-autotune-no-cudagraphs max-autotune \
                      --json "$f.json" ;;
    scale-sizes) f=$(name bench sizes)
                 run scale-sizes "$f.log" timeout ${SCALE_SIZES_S:-290} python3 -m llmc_lessons.bench \
                   --sizes d48,d36,d24,d12 --steps 5 --warmup 3 --json "$f.json" ${SCALE_ARGS:-} ;;
    scale-attention) f=$(name bench attention)
                     run scale-attention "$f.log" timeout 90 python3 -m llmc_lessons.bench --only-attention \
                       --attention-seq-lens 1024 2048 --precision bf16 fp32 --json "$f.json" ;;
    scale-fp32) f=$(name bench sizes fp32)
                run scale-sizes-fp32 "$f.log" timeout ${SCALE_SIZES_S:-290} python3 -m llmc_lessons.bench \
                  --sizes d48,d36,d24,d12 --precision fp32 --steps 5 --warmup 3 --json "$f.json" ${SCALE_ARGS:-} ;;
    scale-profiles) for m in ${PROFILE_SIZES:-d24:16 d36:16}; do
                      f=$(name bench bench ${m%%:*})
                      run profile-${m%%:*} "$f.log" timeout 120 python3 -m llmc_lessons.bench --model ${m%%:*} \
                        -b ${m##*:} --precision bf16 --no-torch --steps 5 --warmup 2 --profile --json "$f.json"
                    done ;;
    attention-profile) for precision in ${ATTENTION_PRECISIONS:-bf16 fp32}; do
             f=$(name profile attention $precision)
             run attention-names-$precision "$f.log" timeout 120 python3 tools/profile_attention.py $precision
             run attention-ncu-$precision "$(name profile attention $precision-ncu).log" timeout 240 ncu --clock-control none \
               -k "regex:flash|fmha|cudnn|attn|sdpa" --launch-count 16 --section SpeedOfLight \
               --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
               python3 tools/profile_attention.py $precision 1024 --launch-only
           done ;;
    llama) for model in d12 llama-124m; do
             rm -rf /tmp/runs/$model
             f=$(name train llama ${LLAMA_PRECISION:-fp32}-$([ $model = d12 ] && echo gpt2 || echo llama))
             run llama-$model "$f.console.txt" timeout 140 python3 -m llmc_lessons.train --model $model \
               --batch-size 16 --seq-len 1024 --steps ${LLAMA_STEPS:-250} --eval-every 50 --eval-batches 8 \
               --precision ${LLAMA_PRECISION:-fp32} --out /tmp/runs/$model
             cp /tmp/runs/$model/log.jsonl "$f.jsonl"
             cp /tmp/runs/$model/summary.json "$f.summary.json"
           done ;;
    llama-bench) f=$(name bench bench llama); run llama-bench "$f.log" python3 -m llmc_lessons.bench \
                   --model llama-124m --json "$f.json" ;;
    multigpu) gpus=$(nvidia-smi -L | wc -l)   # 1 to every GPU; per GPU 16 (d12) or 8 (d24) sequences of 1024
              if [ "$gpus" -lt 2 ]; then echo "=== multigpu: skipped, $gpus GPU"; continue; fi
              for model in ${MULTIGPU_MODELS:-d12 d24}; do
                [ "$model" = d12 ] && b=16 || b=8
                f=$(name bench multigpu "$model")
                run multigpu-$model "$f.log" python3 tools/multigpu_bench.py --model "$model" --batch-size $b \
                  --json "$f.json" ${MULTIGPU_ARGS:-}
              done ;;
    *) echo "unknown stage $s"; status=1 ;;
  esac
done
exit $status
