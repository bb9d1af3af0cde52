#!/usr/bin/env bash
# One device call: GPU tests of the recorded micro-step, then train() with CUDA graphs on and off (bench_train.py).
#   bash bench/gpu_graphs.sh "qwen2.5-1.5b 1024 16 --cap-gb 12" "qwen2.5-7b 2048 2"     (RESULT lines in $OUT/graphs.txt)
set -u
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl 2>&1 | tail -1
timeout 150 python -m pytest -q -m gpu tests/test_graphs.py tests/test_kernels.py -p no:cacheprovider -x 2>&1 \
  | tail -15 | tee "$OUT/graphs.txt"
for shape in "$@"; do
  for graphs in on off; do
    timeout 200 python bench/bench_train.py $shape --cuda-graphs $graphs --log > "$OUT/log_tmp.txt" 2>&1
    grep -E "^RESULT|CUDA graphs|Error|error" "$OUT/log_tmp.txt" | tail -4 | tee -a "$OUT/graphs.txt"
    cat "$OUT/log_tmp.txt" >> "$OUT/graphs_log.txt"
  done
done
