"""Pre-quantized checkpoints: a Hugging Face folder whose decoder linears are stored as lorafit's NF4 tensors.

`quantize_checkpoint` (the `lorafit quantize` command) reads a 16-bit folder one tensor at a time, quantizes each
decoder linear exactly as `load_model(quantize=True)` would (NF4Linear.from_linear: bitsandbytes, blocksize 64,
double quantization, from the weight cast to `dtype`), and writes safetensors shards in which `<module>.weight`
becomes `<module>.packed`, `.absmax_q`, `.absmax_map`, `.absmax_scale`, `.absmax_offset` and `.nf4_code` (the
layout in kernels/nf4.py). Everything else (embeddings, head, norms, biases) is copied as it is, with config.json
(plus the `lorafit_quantization` marker) and the tokenizer files. `load_model` reads such a folder without
bitsandbytes, a quarter of the bytes from disk, and the same dequantized weights, bit for bit.

Which dtype: training casts each weight to its compute dtype before quantizing (bf16 on a GPU, fp32 on a CPU), and
the codes can differ between the two, so the folder records it and `dtype="auto"` picks what `lorafit train` would
on this machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafit.errors import ModelError
from lorafit.model.llama import CausalLM, ModelArgs
from lorafit.model.load import (
    NF4_MARKER,
    QUANTIZATION_KEY,
    iter_weights,
    prequantized,
    read_hf_config,
    resolve_model_path,
    weight_files,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
INDEX = "model.safetensors.index.json"


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, device: str = "auto", dtype: str = "auto",
                        shard_size: int = 4 * 10**9, allow_pickle: bool = False) -> Path:
    """Write `model_dir` with NF4 decoder linears to `out_dir`; returns `out_dir`.

    Peak memory: one output shard plus one 16-bit matrix (on `device` while it is quantized). The folder appears
    whole or not at all (written to a temporary folder beside it, then renamed).
    """
    folder = resolve_model_path(str(model_dir))
    out = Path(out_dir)
    if out.exists():
        raise ModelError(f"{out}: already exists; give a new folder")
    hf_config = read_hf_config(folder)
    if prequantized(hf_config) is not None:
        raise ModelError(f"{folder}: already quantized by lorafit")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    compute_dtype = DTYPES[dtype]
    from lorafit.model.quantize import NF4_TENSORS, NF4Linear, is_quantizable

    with torch.device("meta"):
        model = CausalLM(ModelArgs.from_hf(hf_config), hf_config)
    linears = {name for name, module in model.named_modules() if is_quantizable(name, module)}
    expected = set(model.state_dict())
    del model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        index: dict[str, str] = {}
        current: dict[str, torch.Tensor] = {}
        size = 0
        part = 0

        def flush():
            nonlocal current, size, part
            if current:
                part += 1
                name = f"model-{part:05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                index.update(dict.fromkeys(current, name))
            current, size = {}, 0

        for key, tensor in iter_weights(folder, allow_pickle):
            module_name, _, leaf = key.rpartition(".")
            if module_name in linears and leaf == "weight":
                linear = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta")
                linear.weight = torch.nn.Parameter(tensor, requires_grad=False)
                quantized = NF4Linear.from_linear(linear, dev, compute_dtype)
                pieces = {f"{module_name}.{n}": getattr(quantized, n).detach().cpu().contiguous() for n in NF4_TENSORS}
                del linear, quantized
            elif key in expected:
                pieces = {key: tensor.contiguous()}
            else:
                continue  # e.g. rotary tables of old checkpoints: load_model ignores them too
            del tensor
            for name, value in pieces.items():
                current[name] = value
                size += value.numel() * value.element_size()
            if size >= shard_size:
                flush()
        flush()
        if part == 1:
            (tmp / "model-00001.safetensors").rename(tmp / "model.safetensors")
        else:
            total = sum((tmp / n).stat().st_size for n in set(index.values()))
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        config = json.loads((folder / "config.json").read_text())
        config[QUANTIZATION_KEY] = {**NF4_MARKER, "compute_dtype": str(compute_dtype).replace("torch.", ""),
                                    "source": str(folder)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weights = {f.name for f in weight_files(folder, allow_pickle)} | {INDEX, "config.json"}
        for f in folder.iterdir():  # tokenizer, generation config, chat template, licence...
            if f.is_file() and f.name not in weights and f.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(f, tmp / f.name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
