r"""Merge a LoRA adapter into its base: a Hugging Face folder that transformers, vLLM and SGLang load as it is.

For every adapted linear, in fp32:

    W' = W + s * B @ A,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

then cast to the output dtype. A NaN or Inf in an adapter matrix, a merged weight or any output tensor (an fp16
overflow too) stops the merge with the tensor's name; nothing half-written is left behind.

Which W: a QLoRA adapter was trained against the NF4-rounded weights, not the checkpoint's. `base="original"`
merges into the checkpoint's 16/32-bit weights (what the base model really is); `base="nf4"` first rounds each
adapted weight through NF4 exactly as `quantize_nf4` did in training (blocksize 64, double quantization, from the
weight cast to training's compute dtype: from bf16 instead of fp32, 0.4% of SmolLM2's adapted weights land on
another NF4 level), which is the function the adapter was fitted to. `merge_fidelity`
measures both against the model + adapter.

Streaming: tensors are read one at a time with `safe_open` (in the input shards' order) and gathered into one
output shard of at most `shard_size` bytes, which is written before the next starts; so peak memory is one output
shard plus the largest tensor and its fp32 temporaries, never the whole model. bench/bench_merge.py measures it:
Qwen2.5-7B-shaped, bf16, 2 GB shards: 3.2 GB peak RSS.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafit.errors import LorafitError
from lorafit.model.load import read_hf_config, resolve_model_path, weight_files
from lorafit.model.lora import ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASES = ("original", "nf4")
DEFAULT_SHARD_BYTES = 2 * 10**9  # 2 GB per output shard, as the brief asks; each shard is held in memory once
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}


@dataclass
class Adapter:
    folder: Path
    base: str  # base model path as the adapter config records it
    method: str  # qlora or lora (run.json beside the adapter)
    scaling: float
    modules: dict[str, tuple[str, str]]  # module name -> (lora_A key, lora_B key)


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """The adapter's scaling and modules; refuses what a plain W + s B A merge cannot express."""
    from lorafit.infer import adapter_base_and_method

    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    for flag in ("use_dora", "use_qalora"):
        if cfg.get(flag):
            raise LorafitError(f"{folder}: {flag} adapters are not plain LoRA; lorafit cannot merge them")
    if cfg.get("modules_to_save") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LorafitError(f"{folder}: modules_to_save / rank_pattern / alpha_pattern are not supported by the merge")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LorafitError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else ""
        module, _, leaf = body.rpartition(".lora_")
        if not module or leaf not in ("A.weight", "B.weight"):
            raise LorafitError(f"{weights}: unexpected tensor {key!r} (only {PEFT_PREFIX}<module>.lora_A/B.weight "
                               "can be merged)")
        modules.setdefault(module, {})[leaf[0]] = key
    incomplete = sorted(m for m, pair in modules.items() if len(pair) != 2)
    if incomplete:
        raise LorafitError(f"{weights}: {incomplete[0]} has lora_A or lora_B but not both")
    base, method = adapter_base_and_method(folder)
    return Adapter(folder, base, method, scaling, {m: (p["A"], p["B"]) for m, p in sorted(modules.items())})


def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """fp32 values of `weight` quantized to NF4 and back, exactly as `quantize_nf4` + `dequantize_weight` give.

    Dequantized by lorafit's kernel, not bitsandbytes': on the CPU bitsandbytes 0.50 dequantizes matrices narrower
    than one 64-weight block wrongly (errors of ~4x the quantization step; the tiny test models have such layers).
    """
    from lorafit.model.quantize import NF4Linear

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return NF4Linear.from_linear(linear, weight.device, compute_dtype).dequantize(torch.float32)


def training_compute_dtype(adapter: Adapter) -> torch.dtype:
    """The dtype training cast each weight to before NF4: fp32 on CPU, bf16 on a GPU (see train.loop.train)."""
    run = adapter.folder.parent / "run.json"
    if run.is_file():
        info = json.loads(run.read_text())
        device = str(info.get("device") or info.get("config", {}).get("device", "auto"))
        if device.startswith("cuda"):
            return torch.bfloat16
        if device == "auto":  # resolved at run time; a GPU run logs its memory in metrics.jsonl
            metrics = adapter.folder.parent / "metrics.jsonl"
            if metrics.is_file() and '"gpu_mem_gb"' in metrics.read_text():
                return torch.bfloat16
    return torch.float32


def _finite(tensor: torch.Tensor, name: str, what: str) -> torch.Tensor:
    # in row blocks: a whole-tensor mask of Qwen2.5-7B's embeddings alone would be 0.5 GB
    if tensor.is_floating_point() and not all(bool(torch.isfinite(rows).all()) for rows in tensor.split(4096)):
        raise LorafitError(f"{name}: {what} contains NaN or Inf; refusing to write a broken model")
    return tensor


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _plan(files: list[Path], out_dtype: torch.dtype, skip: set[str], shard_size: int) -> list[list[str]]:
    """Output shards as lists of tensor names, in reading order, from the safetensors headers alone."""
    shards: list[list[str]] = [[]]
    used = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable, so ruff's SIM118 advice does not apply
            for key in names:
                if key in skip:
                    continue
                info = f.get_slice(key)
                dtype = info.get_dtype()
                width = out_dtype.itemsize if dtype in ("F64", "F32", "F16", "BF16") else SAFETENSORS_DTYPES[dtype]
                size = math.prod(info.get_shape()) * width
                if shards[-1] and used + size > shard_size:
                    shards.append([])
                    used = 0
                shards[-1].append(key)
                used += size
    return shards


def _check_shapes(adapter: Adapter, files: list[Path]) -> None:
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
            shapes.update({k: f.get_slice(k).get_shape() for k in names})
    with safe_open(str(adapter.folder / ADAPTER_WEIGHTS), framework="pt") as f:
        for module, (a_key, b_key) in adapter.modules.items():
            target = f"{module}.weight"
            if target not in shapes:
                raise LorafitError(f"{adapter.folder}: adapter module {module} has no weight {target} in the base "
                                   "checkpoint; is this the base the adapter was trained on?")
            (rows, cols), a, b = shapes[target], f.get_slice(a_key).get_shape(), f.get_slice(b_key).get_shape()
            if a[1] != cols or b[0] != rows or a[0] != b[1]:
                raise LorafitError(f"{adapter.folder}: {module} adapter A{a} B{b} does not fit base weight "
                                   f"[{rows}, {cols}]")


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16", base: str = "original",
                  model: str | None = None, shard_size: int = DEFAULT_SHARD_BYTES,
                  nf4_dtype: str = "auto") -> Path:
    """Write base + adapter as one Hugging Face model folder in `dtype` (bf16, fp16 or fp32); returns `out_dir`.

    `model` overrides the base recorded in the adapter config. `base` is "original" or "nf4" (module docstring).
    `nf4_dtype` is what training cast weights to before NF4: "auto" (from run.json), "fp32" or "bf16".
    """
    if dtype not in DTYPES:
        raise LorafitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if base not in BASES:
        raise LorafitError(f"base must be 'original' or 'nf4', got {base!r}")
    out_dtype = DTYPES[dtype]
    adapter = read_adapter(adapter_dir)
    compute = training_compute_dtype(adapter) if nf4_dtype == "auto" else DTYPES[nf4_dtype]
    folder = resolve_model_path(model or adapter.base)
    hf_config = read_hf_config(folder)
    if getattr(hf_config, "quantization_config", None):
        raise LorafitError(f"{folder}: the base checkpoint is already quantized; merge needs 16/32-bit weights")
    tied = bool(hf_config.tie_word_embeddings)
    if tied and "lm_head" in adapter.modules:
        raise LorafitError(f"{adapter.folder}: the adapter changes lm_head, whose weight is tied to the embeddings; "
                           "a merge would change both")
    files = weight_files(folder)
    _check_shapes(adapter, files)
    shards = _plan(files, out_dtype, {"lm_head.weight"} if tied else set(), shard_size)
    shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise LorafitError(f"{out}: already exists and is not empty; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        weight_map, total = {}, 0
        buffer: dict[str, torch.Tensor] = {}
        current = 0
        with safe_open(str(adapter.folder / ADAPTER_WEIGHTS), framework="pt") as lora:
            for file, key in [(path, key) for path in files for key in _keys(path)]:
                if key not in shard_of:
                    continue
                if shard_of[key] != current:  # the plan keeps reading order, so a shard ends here
                    save_file(buffer, str(partial / names[current]), metadata={"format": "pt"})
                    buffer, current = {}, shard_of[key]
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                # The file is opened per tensor and each tensor copied out: get_tensor returns a view into the
                # file's memory map, and every page read stays resident while the map is open. Measured on the
                # 7B bench: 6.3 GB peak with views kept, 5.0 GB with copies and one open per shard, 3.2 GB
                # like this (output shards 2 GB).
                with safe_open(str(file), framework="pt") as f:
                    tensor = f.get_tensor(key)
                    if module in adapter.modules:
                        tensor = _merge_one(key, tensor, lora, adapter, base, compute)
                    elif tensor.is_floating_point():
                        tensor = tensor.to(out_dtype, copy=True)
                    else:
                        tensor = tensor.clone()
                if tensor.is_floating_point():
                    tensor = _finite(tensor.to(out_dtype), key, f"the {dtype} output tensor")
                buffer[key] = tensor.contiguous()
                weight_map[key] = names[current]
                total += tensor.numel() * tensor.element_size()
        save_file(buffer, str(partial / names[current]), metadata={"format": "pt"})
        del buffer
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_config_and_tokenizer(folder, hf_config, out_dtype, partial)
        (partial / "README.md").write_text(
            f"# Merged model\n\nBase `{folder}` + adapter `{adapter.folder}` ({adapter.method}), merged by lorafit "
            f"in fp32 into the {base} base weights, saved in {dtype}.\n")
        _use_default_modes(partial)
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs it gone
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _merge_one(key, weight, lora, adapter: Adapter, base: str, compute: torch.dtype) -> torch.Tensor:
    a_key, b_key = adapter.modules[key[: -len(".weight")]]
    a = _finite(lora.get_tensor(a_key).float(), a_key, "the adapter matrix")
    b = _finite(lora.get_tensor(b_key).float(), b_key, "the adapter matrix")
    w = weight.float() if base == "original" else nf4_round_trip(weight, compute)
    w = w.clone() if w.data_ptr() == weight.data_ptr() else w  # never write into a tensor we did not allocate
    w.addmm_(b, a, alpha=adapter.scaling)  # in place: no second [out, in] fp32 matrix for s * B @ A
    return _finite(w, key, "the merged fp32 weight")


def _write_config_and_tokenizer(base: Path, hf_config, out_dtype: torch.dtype, out: Path) -> None:
    """config.json (dtype updated), generation_config.json and the tokenizer with the chat template training used."""
    from transformers import GenerationConfig

    from lorafit.data.tokenize import ensure_chat_template
    from lorafit.model.load import load_tokenizer

    hf_config.dtype = out_dtype
    hf_config.save_pretrained(str(out))
    if (base / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(base))
    else:
        generation = GenerationConfig.from_model_config(hf_config)
    generation.save_pretrained(str(out))
    tokenizer = load_tokenizer(base)
    ensure_chat_template(tokenizer)  # training rendered conversations with this template; serving must too
    tokenizer.save_pretrained(str(out))


def _use_default_modes(folder: Path) -> None:
    """mkdtemp makes the folder owner-only; give it the modes the umask asks for, as a normal folder would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


@torch.no_grad()
def merge_fidelity(adapter_dir: str | Path, data_file: str | Path, max_examples: int = 32, dtype: str = "bf16",
                   model: str | None = None, batch_size: int = 4) -> dict:
    """How far each merge base lands from the model + adapter, on held-out data, on CPU.

    The reference is lorafit's own model with the adapter applied, on the NF4 base when the adapter is QLoRA.
    Both merged folders (base "original" and "nf4", saved in `dtype`) are loaded in fp32 and run on the first
    `max_examples` examples of `data_file`: max and mean |logit difference| over every real token, how often the
    top-1 token agrees on the answer (target) tokens, and the answer perplexity next to the reference's. Holds the
    reference and both merged models at once (the NF4 reference is the slow part on CPU, so it runs once per batch).
    """
    from lorafit.config import DataConfig
    from lorafit.data.batching import collate
    from lorafit.data.build import build_examples
    from lorafit.data.example import IGNORE_INDEX
    from lorafit.eval.likelihood import evaluate_loss
    from lorafit.infer import load_for_inference
    from lorafit.model.load import load_model

    reference, tokenizer = load_for_inference(model, str(adapter_dir), device="cpu")
    examples, _ = build_examples(DataConfig(train=str(data_file)), tokenizer)
    examples = examples[:max_examples] if max_examples else examples
    pad_id = tokenizer.pad_token_id
    ref_loss = evaluate_loss(reference, examples, pad_id, batch_size=batch_size)
    report = {"examples": len(examples), "tokens": sum(len(e) for e in examples), "answer_tokens": ref_loss["tokens"],
              "dtype": dtype, "method": read_adapter(adapter_dir).method,
              "reference_perplexity": ref_loss["perplexity"]}
    with tempfile.TemporaryDirectory(prefix="lorafit-fidelity-") as tmp:
        merged = {base: load_model(str(merge_adapter(adapter_dir, Path(tmp) / base, dtype=dtype, base=base,
                                                     model=model)), "cpu", torch.float32).model.eval()
                  for base in BASES}
        stats = {base: {"worst": 0.0, "total": 0.0, "agree": 0} for base in BASES}
        for start in range(0, len(examples), batch_size):
            index = list(range(start, min(start + batch_size, len(examples))))
            batch = collate(examples, [[i] for i in index], pad_id, packing=False)
            lengths = torch.tensor([len(examples[i]) for i in index])
            real = torch.arange(batch.input_ids.shape[1])[None, :] < lengths[:, None]  # right padding
            answer = torch.zeros_like(real)
            answer[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX  # positions whose next token is a target
            want = reference.logits(reference(batch.input_ids, position_ids=batch.position_ids)).float()
            for base, net in merged.items():
                got = net.logits(net(batch.input_ids, position_ids=batch.position_ids)).float()
                diff = (got - want).abs()[real]
                s = stats[base]
                s["worst"], s["total"] = max(s["worst"], float(diff.max())), s["total"] + float(diff.mean(-1).sum())
                s["agree"] += int((got.argmax(-1) == want.argmax(-1))[answer].sum())
        for base, net in merged.items():
            loss = evaluate_loss(net, examples, pad_id, batch_size=batch_size)
            s = stats[base]
            report[base] = {"max_abs_logit_diff": s["worst"], "mean_abs_logit_diff": s["total"] / report["tokens"],
                            "answer_top1_agreement": s["agree"] / max(ref_loss["tokens"], 1),
                            "perplexity": loss["perplexity"],
                            "perplexity_change": loss["perplexity"] - ref_loss["perplexity"]}
    return report
