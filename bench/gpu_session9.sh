#!/usr/bin/env bash
# Session 9 on the H100 (carry .wheels/core .wheels/peers .cache/anchor).
#   tests  every GPU test (cuda_graphs auto is the default now, so the train() tests record and replay)
#   fixed  Qwen2.5-7B 2 x 2048: lorafit as it runs by default (cuda_graphs auto records there), bf16 and --fp8,
#          then Unsloth, one machine
#   graphtests  the graph and train() GPU tests
#   lorafit, unsloth  issue 8's three rows (session 8's commands), one stack per call on one warm machine
# Summary lines go to $OUT/session9.txt.
set -u
REPORT=session9
source bench/gpu_run.sh
for section in "$@"; do
  echo "## $section" | tee -a "$OUT/session9.txt"
  case $section in
    tests)
      timeout 420 python -m pytest -q -m gpu tests/ -p no:cacheprovider -p no:logging --tb=short > "$OUT/tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/tests.txt" | head -40 | tee -a "$OUT/session9.txt" ;;
    fixed)
      python bench/bench_peers.py --stacks lorafit --only fixed --lorafit-flags "all=--fp8" --timeout 200 \
        --out "$OUT/fixed_fp8" 2>&1 | grep -E "^RESULT" | tee -a "$OUT/session9.txt"
      python bench/bench_peers.py --stacks lorafit,unsloth --only fixed --timeout 200 --out "$OUT/fixed" 2>&1 \
        | grep -E "^RESULT" | tee -a "$OUT/session9.txt"
      cat "$OUT/fixed/peers.md" | tee -a "$OUT/session9.txt" ;;
    graphtests)
      timeout 300 python -m pytest -q -m gpu tests/test_graphs.py tests/test_gpu.py -p no:cacheprovider \
        -p no:logging --tb=short > "$OUT/graph_tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/graph_tests.txt" | head -40 | tee -a "$OUT/session9.txt" ;;
    lorafit)
      python bench/bench_peers.py --stacks lorafit --only fixed,7b16,15b12 --cands 7b16.lorafit=8 \
        --cands 15b12.lorafit=32 --lorafit-flags "7b16=--gpu-memory 16GB" --lorafit-flags "15b12=--kept-layers 5" \
        --lorafit-flags "all=--fp8" --timeout 200 --out "$OUT/rows_lorafit" 2>&1 | grep -E "^RESULT" \
        | tee -a "$OUT/session9.txt" ;;
    unsloth)
      python bench/bench_peers.py --stacks unsloth --only fixed,7b16,15b12 --cands 7b16.unsloth=8 \
        --cands 15b12.unsloth=32 --timeout 200 --out "$OUT/rows_unsloth" 2>&1 | grep -E "^RESULT" \
        | tee -a "$OUT/session9.txt" ;;
    *) echo "unknown section $section" ;;
  esac
done
