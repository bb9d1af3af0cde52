#!/usr/bin/env bash
# Session 6 on the H100 (carry .wheels/core): the FP8 base (model.fp8_base) and the pinned staging of session 5.
#   tests    GPU tests: FP8 kernels against their twins, staging, and the kernels' twin tests
#   gemm     bench/fp8_gemm.py: FP8 against bf16 per linear at issue 8's shapes
#   fp8      issue 8's budget rows with --fp8
#   budget   the same rows without it (staging measured against session 5's rows)
#   small    Qwen2.5-7B 2 x 2048, both ways
# RESULT lines go to $OUT/session6.txt, whole logs to $OUT/session6_log.txt.
set -u
REPORT=session6
source bench/gpu_run.sh
for section in "$@"; do
  echo "## $section" | tee -a "$OUT/session6.txt"
  case $section in
    tests)
      timeout 200 python -m pytest -q -m gpu tests/test_fp8.py tests/test_staging.py tests/test_kernels.py \
        ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider -p no:logging --tb=short > "$OUT/tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/tests.txt" | head -40 | tee -a "$OUT/session6.txt" ;;
    gemm)
      timeout 120 python bench/fp8_gemm.py 2>&1 | tee -a "$OUT/session6.txt" | tail -12 ;;
    fp8)
      run qwen2.5-7b 2048 8 --cap-gb 16 --gpu-memory 16GB --fp8
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 7 --fp8 ;;
    budget)
      run qwen2.5-7b 2048 8 --cap-gb 16 --gpu-memory 16GB
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 7 ;;
    small)
      run qwen2.5-7b 2048 2 --fp8
      run qwen2.5-7b 2048 2 ;;
    small-fp8)
      run qwen2.5-7b 2048 2 --fp8 ;;
    *) echo "unknown section $section" ;;
  esac
done
