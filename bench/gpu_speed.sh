#!/usr/bin/env bash
# One device call: GPU kernel tests, then lorafit's train() at the issue-8 budgets (bench/bench_train.py).
#   bash bench/gpu_speed.sh      (RESULT lines in $OUT/speed.txt)
set -u
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl 2>&1 | tail -1
python -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/speed.txt"
b() { timeout 240 python bench/bench_train.py "$@" 2>&1 | grep -E "^RESULT|Error" | tail -2 | tee -a "$OUT/speed.txt"; }
b qwen2.5-7b 2048 2 --offload
b qwen2.5-7b 2048 12 --cap-gb 16 --offload
b qwen2.5-7b 65536 1 --cap-gb 16 --offload --mlp-chunk 8192 --steps 4
b qwen2.5-1.5b 1024 16 --cap-gb 12
b qwen2.5-1.5b 1024 32 --cap-gb 12 --offload
