"""Peak CPU memory of `merge_adapter` on a 7B-shaped checkpoint: it must stay near two shards, not the model.

    python bench/bench_merge.py [qwen2.5-7b] [--root /tmp/lorafit-bench-merge] [--input-shard-gb 2]
                                [--output-shard-gb 2] [--base original|nf4] [--keep]

Builds a random bf16 checkpoint of the shape in bench/shapes.yaml (15.2 GB for Qwen2.5-7B) one layer at a time,
writing each input shard as soon as it is full, so the builder never holds more than one shard either; adds a
random r=16 adapter on all seven projections; then runs the merge in a subprocess and reports that subprocess's
peak RSS (VmHWM, which counts the resident pages of memory-mapped input files too) next to the shard sizes and to
the peak of a subprocess that only imports what the merge imports (the fixed overhead). One merged weight is
checked against W + s B A. Everything is deleted afterwards unless --keep. Needs ~2.1x the model size on disk.

Measured on a 2-core, 24 GB CPU machine (Qwen2.5-7B shape, 15.2 GB bf16, 7 input shards of <= 2.33 GB, 2 GB
output shards), with other jobs on the machine: base "original" 3.23 GB peak RSS (0.41 GB of it the imports
alone) in 120 s; base "nf4" 3.65 GB in 627 s, most of it bitsandbytes' CPU NF4 quantization.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

SHAPES = yaml.safe_load((Path(__file__).parent / "shapes.yaml").read_text())
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GB = 10**9


def layer_shapes(s: dict, i: int) -> dict[str, tuple[int, ...]]:
    hd = s["hidden_size"] // s["num_attention_heads"]
    q, kv, h, f = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd, s["hidden_size"], s["intermediate_size"]
    p = f"model.layers.{i}."
    shapes = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
              p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    if s["model_type"] == "qwen2":
        shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def build_checkpoint(name: str, folder: Path, shard_bytes: int) -> list[int]:
    """Random bf16 weights written shard by shard; returns the shard sizes in bytes."""
    from transformers import AutoConfig

    from lorafit.model.bundled import bundled_model_path

    s = dict(SHAPES[name])
    folder.mkdir(parents=True)
    groups = [{"model.embed_tokens.weight": (s["vocab_size"], s["hidden_size"])}]
    groups += [layer_shapes(s, i) for i in range(s["num_hidden_layers"])]
    groups.append({"model.norm.weight": (s["hidden_size"],)} | (
        {} if s["tie_word_embeddings"] else {"lm_head.weight": (s["vocab_size"], s["hidden_size"])}))
    shards: list[list[str]] = []  # names only: the tensors of a written shard are dropped at once
    current, used = {}, 0
    for group in groups:
        for key, shape in group.items():
            matrix = len(shape) == 2  # weights ~ N(0, 0.02); norms and biases ones
            current[key] = torch.randn(shape, dtype=torch.bfloat16) * 0.02 if matrix else torch.ones(shape).bfloat16()
            used += math.prod(shape) * 2
        if used >= shard_bytes:
            shards.append(list(current))
            save_file(current, str(folder / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            current, used = {}, 0
    if current:
        shards.append(list(current))
        save_file(current, str(folder / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
    del current
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, shard in enumerate(shards):
        (folder / f"part-{i + 1}.safetensors").rename(folder / names[i])
        weight_map.update({key: names[i] for key in shard})
    sizes = [(folder / n).stat().st_size for n in names]
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    kind = s.pop("model_type")
    AutoConfig.for_model(kind, **s, dtype="bfloat16").save_pretrained(str(folder))
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # any real tokenizer will do
        shutil.copy(bundled_model_path() / file, folder / file)
    return sizes


def build_adapter(name: str, model_dir: Path, folder: Path, r: int = 16) -> None:
    from peft import LoraConfig

    s = SHAPES[name]
    tensors = {}
    for i in range(s["num_hidden_layers"]):
        for key, shape in layer_shapes(s, i).items():
            module = key[: -len(".weight")]
            if module.rsplit(".", 1)[-1] in TARGETS and key.endswith(".weight"):
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, shape[1]) / math.sqrt(shape[1])
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], r) * 1e-3
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM",
               base_model_name_or_path=str(model_dir)).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address space.

    Not getrusage's ru_maxrss: a child's starts from its parent's RSS at fork (Linux carries the pre-exec address
    space's high-water mark over exec), so a large parent would be counted as the child's peak.
    """
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def child_peak_rss(code: str) -> tuple[int, float]:
    """Peak RSS in bytes of a fresh Python running `code` (as the child itself reads it at the end), and wall time."""
    start = time.perf_counter()
    report = ("\nimport re\n"
              "print('PEAK', int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024)")
    done = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True)
    peak = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK ")))
    return peak, time.perf_counter() - start


def check_one_weight(model_dir: Path, adapter: Path, out: Path, key: str) -> float:
    """Max |merged - (W + s B A)| in bf16 units of one weight, read straight from the files."""
    def read(folder: Path, name: str):
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(folder / index[name]), "pt") as f:
            return f.get_tensor(name)

    module = key[: -len(".weight")]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        a, b = f.get_tensor(f"base_model.model.{module}.lora_A.weight"), f.get_tensor(
            f"base_model.model.{module}.lora_B.weight")
    expected = (read(model_dir, key).float() + 2.0 * b @ a).to(torch.bfloat16)
    return float((read(out, key).float() - expected.float()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", nargs="?", default="qwen2.5-7b", choices=sorted(SHAPES))
    parser.add_argument("--root", default="/tmp/lorafit-bench-merge")
    parser.add_argument("--input-shard-gb", type=float, default=2.0)
    parser.add_argument("--output-shard-gb", type=float, default=2.0)
    parser.add_argument("--base", default="original", choices=["original", "nf4"])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, adapter and merged folder")
    a = parser.parse_args()
    root = Path(a.root)
    model_dir, adapter, out = root / "model", root / "adapter", root / "merged"
    s = SHAPES[a.shape]
    n_params = s["vocab_size"] * s["hidden_size"] * (1 if s["tie_word_embeddings"] else 2) + sum(
        math.prod(shape) for i in range(s["num_hidden_layers"]) for shape in layer_shapes(s, i).values())
    need = 2.1 * n_params * 2
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if not (model_dir / "config.json").is_file() and free < need:
        sys.exit(f"{root}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed")
    try:
        t0 = time.perf_counter()
        if not (model_dir / "config.json").is_file():
            build_checkpoint(a.shape, model_dir, int(a.input_shard_gb * GB))
            build_adapter(a.shape, model_dir, adapter)
        built, build_peak = time.perf_counter() - t0, peak_rss()
        shutil.rmtree(out, ignore_errors=True)
        overhead, _ = child_peak_rss("import torch, transformers, bitsandbytes, safetensors, peft\n"
                                     "import lorafit.export.merge, lorafit.infer")
        peak, seconds = child_peak_rss(
            "from lorafit.export.merge import merge_adapter\n"
            f"merge_adapter({str(adapter)!r}, {str(out)!r}, dtype='bf16', base={a.base!r}, "
            f"shard_size={int(a.output_shard_gb * GB)})")
        inputs = sorted(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        outputs = sorted(p.stat().st_size for p in out.glob("*.safetensors"))
        error = check_one_weight(model_dir, adapter, out, "model.layers.27.mlp.down_proj.weight") if (
            a.base == "original") else None
        result = {"shape": a.shape, "params": n_params, "base": a.base, "build_s": round(built, 1),
                  "build_peak_rss_gb": round(build_peak / GB, 2),
                  "merge_s": round(seconds, 1), "peak_rss_gb": round(peak / GB, 2),
                  "import_only_rss_gb": round(overhead / GB, 2),
                  "largest_input_shard_gb": round(inputs[-1] / GB, 2), "input_shards": len(inputs),
                  "largest_output_shard_gb": round(outputs[-1] / GB, 2), "output_shards": len(outputs),
                  "model_gb": round(sum(inputs) / GB, 2),
                  "bound_gb": round((inputs[-1] + outputs[-1] + overhead) / GB, 2),
                  "down_proj_27_max_err": error}
        print("RESULT " + json.dumps(result), flush=True)
        if peak > inputs[-1] + outputs[-1] + overhead + 1.5 * GB:  # 1.5 GB: one weight's fp32 temporaries and slack
            sys.exit("peak RSS is above two shards plus the fixed overhead")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
