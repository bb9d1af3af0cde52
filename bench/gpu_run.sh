# Sourced by the gpu_session*.sh scripts (set REPORT first): the environment of a GPU call (PYTHONPATH, no hub,
# bitsandbytes from .wheels/core, $OUT), and `run ARGS...`, one bench_train.py run (LIMIT seconds, default 150, with
# the environment assignments in ENVS) whose RESULT line and any error go to $OUT/$REPORT.txt (and the terminal),
# the whole log to $OUT/${REPORT}_log.txt.
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .wheels/core/*.whl 2>&1 | tail -1
ENVS=${ENVS:-}
run() {
  echo "# $*" >> "$OUT/${REPORT}_log.txt"
  timeout "${LIMIT:-150}" env $ENVS python bench/bench_train.py "$@" --log > "$OUT/one.txt" 2>&1
  grep -E "^RESULT|^GAPS|Error|error" "$OUT/one.txt" | tail -8 | tee -a "$OUT/$REPORT.txt"
  cat "$OUT/one.txt" >> "$OUT/${REPORT}_log.txt"
}
