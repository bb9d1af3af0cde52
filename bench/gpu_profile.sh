#!/usr/bin/env bash
# One device call: kernel tests on the GPU, then profiles of a QLoRA step (bench/profile_step.py).
#   bash bench/gpu_profile.sh "qwen2.5-1.5b 1024 16" "qwen2.5-1.5b 1024 4"
set -u
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl 2>&1 | tail -1
python -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py -p no:cacheprovider -x 2>&1 | tail -15 | tee "$OUT/tests.txt"
for shape in "$@"; do
  python bench/profile_step.py $shape 2>&1 | grep -v Warning | tee -a "$OUT/profile.txt"
done
