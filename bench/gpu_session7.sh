#!/usr/bin/env bash
# Session 7 on the H100 (carry .wheels/core).
#   profile   where the step's time goes in the two rows still short of issue 8's 1.3x (bench/profile_step.py, --fp8)
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
    *) echo "unknown section $section" ;;
  esac
done
