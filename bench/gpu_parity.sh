#!/usr/bin/env bash
# Issue 8's 50-step loss-curve parity (bench/bench_parity.py) on the bundled SmolLM2-135M-Instruct, on a GPU machine
# that cannot download it: the 98 MB GGUF travels in two halves over two calls on the same (warm) machine.
#   call 1 (carry .cache/gguf_a):                      cp .cache/gguf_a/part /tmp/gguf_a
#   call 2 (carry .cache/gguf_b .wheels/gguf .wheels/core):  [PARITY_VARIANTS=graphs,fast] bash bench/gpu_parity.sh
set -eu
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl .wheels/gguf/*.whl 2>&1 | tail -1
cat /tmp/gguf_a .cache/gguf_b/part > /tmp/smollm2.gguf
echo "$(cat .cache/gguf_b/sha256)  /tmp/smollm2.gguf" | sha256sum -c
python -c "from lorafit.model.bundled import convert_gguf; convert_gguf('/tmp/smollm2.gguf', '/tmp/smollm2')"
python bench/bench_parity.py --model /tmp/smollm2 --steps 50 ${PARITY_VARIANTS:+--variants $PARITY_VARIANTS} 2>&1 | grep -vi warn | tee "$OUT/parity.txt" | tail -60
