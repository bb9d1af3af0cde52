#!/usr/bin/env bash
# Session 7 on the H100 (carry .wheels/core).
#   profile   where the step's time goes in the two rows still short of issue 8's 1.3x (bench/profile_step.py, --fp8)
#   tests     GPU tests: stacked siblings, the optimizer without per-parameter waits, FP8 kernels, kernel twins, graphs
#   rows      issue 8's rows with --fp8, stacked siblings (default) and the optimizer fix; A/B against --unstacked
# RESULT lines go to $OUT/session7.txt, whole logs to $OUT/session7_log.txt.
set -u
REPORT=session7
source bench/gpu_run.sh
for section in "$@"; do
  echo "## $section" | tee -a "$OUT/session7.txt"
  case $section in
    profile)
      for shape in "qwen2.5-7b 2048 2 --fp8" "qwen2.5-1.5b 1024 32 --fp8 --kept-layers 7" "qwen2.5-1.5b 1024 48 --fp8"; do
        timeout 200 python bench/profile_step.py $shape --top 40 2>&1 | grep -v Warning | tee -a "$OUT/profile.txt" | tail -3
      done ;;
    profile15)
      timeout 200 python bench/profile_step.py qwen2.5-1.5b 1024 32 --fp8 --kept-layers 7 --top 40 2>&1 \
        | grep -v Warning | tee -a "$OUT/profile.txt" | tail -3 ;;
    tests)
      timeout 300 python -m pytest -q -m gpu tests/test_lora_siblings.py tests/test_optim.py tests/test_fp8.py \
        tests/test_kernels.py tests/test_graphs.py ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider -p no:logging \
        --tb=short > "$OUT/tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/tests.txt" | head -40 | tee -a "$OUT/session7.txt" ;;
    rows)
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 7 --fp8
      run qwen2.5-7b 2048 2 --fp8
      run qwen2.5-1.5b 1024 48 --cap-gb 12 --fp8 ;;
    rows16)
      run qwen2.5-7b 2048 8 --cap-gb 16 --gpu-memory 16GB --fp8 ;;
    ab)
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 7 --fp8 --unstacked
      run qwen2.5-7b 2048 2 --fp8 --unstacked ;;
    alloc)
      ENVS="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 7 --fp8
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 5 --fp8
      ENVS="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" run qwen2.5-1.5b 1024 48 --cap-gb 12 --fp8
      ENVS="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" run qwen2.5-7b 2048 2 --fp8 ;;
    bf16)
      run qwen2.5-7b 2048 2
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 7 ;;
    *) echo "unknown section $section" ;;
  esac
done
