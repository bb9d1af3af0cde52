# Sourced by the gpu_session*.sh scripts: `run ARGS...` is one bench_train.py run (LIMIT seconds, default 150, with
# the environment assignments in ENVS); its RESULT line and any error go to $OUT/$REPORT.txt (and the terminal), the
# whole log to $OUT/${REPORT}_log.txt.
ENVS=${ENVS:-}
run() {
  echo "# $*" >> "$OUT/${REPORT}_log.txt"
  timeout "${LIMIT:-150}" env $ENVS python bench/bench_train.py "$@" --log > "$OUT/one.txt" 2>&1
  grep -E "^RESULT|Error|error" "$OUT/one.txt" | tail -3 | tee -a "$OUT/$REPORT.txt"
  cat "$OUT/one.txt" >> "$OUT/${REPORT}_log.txt"
}
