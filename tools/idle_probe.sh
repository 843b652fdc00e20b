# The idle-time change against main (1b9cf43) on one GPU, in one call: the old step alone, then the new step
# against compiled PyTorch with its profile, then the GPU tests the change touches.
export LLMC_DEVICE=gpu PYTHONUNBUFFERED=1
d=$(date -u +%F); mkdir -p $OUT/bench $OUT/tests
PYTHONPATH=.probe_tmp/old timeout 60 python3 -m llmc_lessons.bench --precision bf16 --no-torch --steps 20 --warmup 3 \
  --json $OUT/bench/bench-h100-$d-before-idle.json > $OUT/bench/bench-h100-$d-before-idle.log 2>&1
grep -E "course kernels" $OUT/bench/bench-h100-$d-before-idle.log | head -3
PYTHONPATH=$PWD timeout 60 python3 -m llmc_lessons.bench --precision bf16 --no-torch --steps 20 --warmup 3 \
  --json $OUT/bench/bench-h100-$d-idle-alone.json > $OUT/bench/bench-h100-$d-idle-alone.log 2>&1
grep -E "course kernels" $OUT/bench/bench-h100-$d-idle-alone.log | head -3
PYTHONPATH=$PWD timeout 130 python3 -m llmc_lessons.bench --precision bf16 --steps 10 --warmup 3 --profile \
  --json $OUT/bench/bench-h100-$d-idle.json > $OUT/bench/bench-h100-$d-idle.log 2>&1
grep -E "tokens/s against|GPU time" $OUT/bench/bench-h100-$d-idle.log
PYTHONPATH=$PWD timeout 90 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_bf16_training.py tests/test_train.py \
  tests/test_cuda_graph.py tests/test_flash_attention.py -k "not large" > $OUT/tests/tests-h100-$d-idle.log 2>&1
tail -3 $OUT/tests/tests-h100-$d-idle.log
