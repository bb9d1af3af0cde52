#!/usr/bin/env bash
# One device call: GPU tests, then lorafit vs the transformers + PEFT + bitsandbytes recipe on Qwen2.5-1.5B shapes.
# Run from the repo root on the GPU machine with .wheels and .cache/anchor carried:
#   bash bench/gpu_core.sh        (results in $OUT/results.txt, log in $OUT/log.txt)
set -u
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/results.txt"
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -4 | tee -a "$OUT/results.txt"
run() {
  local out; out=$("$@" 2>&1); printf '+ %s\n%s\n' "$*" "$out" >> "$OUT/log.txt"
  echo "$out" | grep RESULT >> "$OUT/results.txt" || echo "FAILED $* :: $(echo "$out" | tail -1)" >> "$OUT/results.txt"
}
for bs in 2 4 8; do run python bench/bench_train.py qwen2.5-1.5b 1024 $bs; done
for bs in 8 16; do run python bench/bench_train.py qwen2.5-1.5b 1024 $bs --cap-gb 12; done
for bs in 2 4; do run python .cache/anchor/anchor_step.py hf qwen2.5-1.5b 1024 $bs; done
cat "$OUT/results.txt"
