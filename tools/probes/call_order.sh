#!/usr/bin/env bash
# One device call: the flash block-order probe, the GPU tests of what changed, the d12 bf16 bench against
# PyTorch, d48 against PyTorch (course with and without -r 1), attention alone. All in /tmp/gc, tarred to $OUT.
set -u
G=/tmp/gc; mkdir -p $G/probe
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD LLMC_DEVICE=gpu PYTHONUNBUFFERED=1
pack() { tar -C /tmp -czf $OUT/gc.tar.gz gc; }
T0=$SECONDS
echo "== flash order probe"; timeout 120 python3 .probe_tmp/flash_order_probe.py > $G/probe/flash-order.log 2>&1; echo rc=$?; tail -20 $G/probe/flash-order.log; pack
echo "== tests $((SECONDS-T0))"; timeout 200 python3 -m pytest -q -p no:randomly -n 8 tests/test_cublas.py tests/test_cuda_graph.py tests/test_flash_attention.py tests/test_flash_attention_tf32.py tests/test_gpu_arch.py tests/test_recompute.py tests/test_bf16_training.py > $G/probe/tests.log 2>&1; echo rc=$?; tail -5 $G/probe/tests.log; pack
echo "== bench $((SECONDS-T0))"; OUT=$G BENCH_ARGS="--precision bf16 --padded-only" timeout 150 bash tools/gpu_check.sh bench; pack
echo "== d48 $((SECONDS-T0))"; OUT=$G SCALE_ARGS="--no-max-batch --sizes d48" SCALE_SIZES_S=$((540-SECONDS+T0)) bash tools/gpu_check.sh scale-sizes 2>&1 | tail -30; pack
echo "== attention skipped"
echo "== done $((SECONDS-T0))"
