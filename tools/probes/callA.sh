#!/usr/bin/env bash
# one device call: the kernel probes (old against new), then the whole suite on the GPU, then cuBLASLt's algorithms
set -u
export PYTHONUNBUFFERED=1 LLMC_DEVICE=gpu
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/profile
date -u +"probe start %F %T"
PYTHONPATH=$PWD timeout 110 python3 .probe_tmp/probe2.py 2>&1 | grep -v Warn | tee $OUT/profile/probe2.log | tail -16
date -u +"tests start %F %T"
OUT=$OUT TEST_WORKERS=15 timeout 300 bash tools/gpu_check.sh env tests 2>&1 | tail -4
date -u +"probe3 start %F %T"
PYTHONPATH=$PWD timeout 90 python3 .probe_tmp/probe3.py > $OUT/profile/probe3.log 2>&1; tail -3 $OUT/profile/probe3.log | cut -c1-300
date -u +"end %F %T"
