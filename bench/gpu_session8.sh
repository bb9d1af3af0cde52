#!/usr/bin/env bash
# Session 8 on the H100 (carry .wheels/core).
#   tests   GPU tests: the flat adapter buffer (train/flat.py) and the optimizer
#   gaps7   7B 2 x 2048 --fp8: the GPU's idle stretches per train() step, flat buffer vs per tensor (bench/gaps.py)
#   pairs15 1.5B 1024 x 32 in 12 GB --fp8 (5 kept layers): flat buffer vs per tensor
#   gaps15  the idle stretches at 1.5B
#   graphtests, graphs7, graphs15: CUDA graphs with the FP8 base (tests; 7B 2 x 2048 on/off; 1.5B in 12 GB)
# RESULT and GAPS lines go to $OUT/session8.txt, whole logs to $OUT/session8_log.txt.
set -u
REPORT=session8
source bench/gpu_run.sh
for section in "$@"; do
  echo "## $section" | tee -a "$OUT/session8.txt"
  case $section in
    tests)
      timeout 240 python -m pytest -q -m gpu tests/test_flat.py tests/test_optim.py ${TESTS_K:+-k "$TESTS_K"} \
        -p no:cacheprovider -p no:logging --tb=short > "$OUT/tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/tests.txt" | head -40 | tee -a "$OUT/session8.txt" ;;
    gaps7)
      LIMIT=${LIMIT:-240} run qwen2.5-7b 2048 2 --fp8 --gaps
      run qwen2.5-7b 2048 2 --fp8 --gaps --per-tensor ;;
    pairs15)
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 5 --fp8
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 5 --fp8 --per-tensor ;;
    gaps15)
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 5 --fp8 --gaps ;;
    graphtests)
      timeout 240 python -m pytest -q -m gpu tests/test_graphs.py -p no:cacheprovider -p no:logging --tb=short \
        > "$OUT/graph_tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/graph_tests.txt" | head -40 | tee -a "$OUT/session8.txt" ;;
    graphs7)
      LIMIT=${LIMIT:-240} run qwen2.5-7b 2048 2 --fp8 --cuda-graphs on
      run qwen2.5-7b 2048 2 --fp8 ;;
    graphs15)
      run qwen2.5-1.5b 1024 32 --cap-gb 12 --kept-layers 5 --fp8 --cuda-graphs on ;;
    *) echo "unknown section $section" ;;
  esac
done
