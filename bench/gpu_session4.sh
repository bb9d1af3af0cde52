#!/usr/bin/env bash
# What session 4 wrote without a GPU, measured on one (carry .wheels/core). Sections, each a few minutes: run them
# over two or three device calls on the same warm machine, e.g. `bash bench/gpu_session4.sh tests packed` then
# `bash bench/gpu_session4.sh budget offload` then `bash bench/gpu_session4.sh long`.
#   tests    GPU tests of the new kernels (varlen attention, product-free SwiGLU + down_proj LoRA, offloaded
#            activations) and of the recorded micro-step (incl. the 60-replay loss check)
#   packed   Qwen2.5-7B 2 x 2048, 4 documents per row: varlen segments vs the seq_ids mask vs one document per row
#   budget   the default path (graphs off) at issue 8's budgets, and --gpu-memory (kept_layers from the planner)
#   offload  offloaded activations (the first N layers neither recomputed nor kept), Qwen2.5-7B 4 x 2048 in 16 GB
#   long     65,536 and 98,304 tokens at batch 1 in 16 GB
# RESULT lines go to $OUT/session4.txt, whole logs to $OUT/session4_log.txt.
set -u
REPORT=session4
source bench/gpu_run.sh
for section in "$@"; do
  echo "## $section" | tee -a "$OUT/session4.txt"
  case $section in
    tests)
      timeout 240 python -m pytest -q -m gpu tests/test_varlen_attention.py tests/test_kernels.py \
        tests/test_offload.py tests/test_graphs.py tests/test_staging.py ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider -p no:logging \
        --tb=short > "$OUT/tests.txt" 2>&1
      grep -E "^(FAILED|ERROR|E )|passed|failed" "$OUT/tests.txt" | head -40 | tee -a "$OUT/session4.txt" ;;
    packed)
      run qwen2.5-7b 2048 2 --docs-per-row 4
      run qwen2.5-7b 2048 2 --docs-per-row 4 --masked-packing
      run qwen2.5-7b 2048 2 ;;
    budget)
      run qwen2.5-7b 2048 8 --cap-gb 16
      run qwen2.5-7b 2048 8 --cap-gb 16 --gpu-memory 16GB
      run qwen2.5-7b 2048 2 --cap-gb 16 --gpu-memory 16GB
      run qwen2.5-1.5b 1024 16 --cap-gb 12 --gpu-memory 12GB
      run qwen2.5-1.5b 1024 32 --cap-gb 12 ;;
    offload)
      run qwen2.5-7b 2048 4 --cap-gb 16
      run qwen2.5-7b 2048 4 --cap-gb 16 --offload-activations 12
      run qwen2.5-7b 2048 4 --cap-gb 16 --offload-activations 12 --kept-layers 6 ;;
    long)
      ENVS="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
      LIMIT=200 run qwen2.5-7b 65536 1 --cap-gb 16 --steps 4 --offload --mlp-chunk 8192
      LIMIT=200 run qwen2.5-7b 98304 1 --cap-gb 16 --steps 4 --offload --mlp-chunk 8192
      ENVS="" ;;
    *) echo "unknown section $section" ;;
  esac
done
