#!/usr/bin/env bash
# One device call for what session 4 wrote without a GPU (carry .wheels/core):
# 1. GPU tests of the new kernels (varlen attention, product-free SwiGLU + down_proj LoRA) and the recorded micro-step
#    (incl. the 60-replay loss check);
# 2. packed rows, Qwen2.5-7B 2048 x 2 with 4 documents per row: varlen segments vs the seq_ids mask vs one document
#    per row;
# 3. the default path (graphs off) at the issue-8 shapes, and --gpu-memory (kept_layers from the planner);
# 4. the long row: 65,536 and 98,304 tokens at batch 1 in 16 GB.
#   bash bench/gpu_session4.sh            (RESULT lines in $OUT/session4.txt, logs in $OUT/session4_log.txt)
set -u
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl 2>&1 | tail -1
timeout 240 python -m pytest -q -m gpu tests/test_varlen_attention.py tests/test_kernels.py tests/test_graphs.py \
  -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/session4.txt"
run() {  # one bench_train.py run: its RESULT line (and any error) to session4.txt, the whole log to session4_log.txt
  echo "# $*" >> "$OUT/session4_log.txt"
  timeout "${LIMIT:-150}" env $ENVS python bench/bench_train.py "$@" --log > "$OUT/one.txt" 2>&1
  grep -E "^RESULT|Error|error" "$OUT/one.txt" | tail -3 | tee -a "$OUT/session4.txt"
  cat "$OUT/one.txt" >> "$OUT/session4_log.txt"
}
ENVS=""
run qwen2.5-7b 2048 2 --docs-per-row 4
run qwen2.5-7b 2048 2 --docs-per-row 4 --masked-packing
run qwen2.5-7b 2048 2
run qwen2.5-7b 2048 8 --cap-gb 16
run qwen2.5-7b 2048 8 --cap-gb 16 --gpu-memory 16GB
run qwen2.5-7b 2048 2 --cap-gb 16 --gpu-memory 16GB
run qwen2.5-1.5b 1024 16 --cap-gb 12 --gpu-memory 12GB
run qwen2.5-1.5b 1024 32 --cap-gb 12
ENVS="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
LIMIT=200 run qwen2.5-7b 65536 1 --cap-gb 16 --steps 4 --offload --mlp-chunk 8192
LIMIT=200 run qwen2.5-7b 98304 1 --cap-gb 16 --steps 4 --offload --mlp-chunk 8192
