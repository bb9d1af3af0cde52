"""One typed config for a training run, loaded from YAML with `--key value` overrides, checked before any work.

Each field carries its help text in `metadata["help"]`; the CLI builds `lorafit train --help` from it, so the
documentation and the schema cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorafit.errors import LorafitError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(LorafitError, ValueError):
    """A config problem, phrased for the user: it names the file and field at fault."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    path: str = _help("local Hugging Face folder, a .gguf file, or 'bundled' (SmolLM2-135M-Instruct)",
                      default="bundled")
    trust_remote_code: bool = _help("allow the folder's own Python code to run (off: we never execute model code)",
                                    default=False)
    allow_pickle: bool = _help("read .bin/.pt weights (PyTorch's restricted unpickler); off: safetensors only",
                               default=False)
    stream_layers: Literal["auto", "off", "on"] = _help(
        "QLoRA: keep decoder layers' 4-bit weights in CPU memory and copy each to the GPU as it runs (70B on 24 GB); "
        "auto: when --gpu-memory says the model does not fit resident", default="auto")
    resident_layers: int | None = _help("with streaming, decoder layers that stay on the GPU (null: as many as "
                                        "the --gpu-memory plan fits, 0 without one)", default=None)
    embeddings_on_cpu: Literal["auto", "on", "off"] = _help(
        "keep the frozen input embedding table in CPU memory and copy only the looked-up rows to the GPU (saves "
        "vocab x hidden x 2 bytes: 1.1 GB for Qwen2.5-7B); auto: on one GPU when the table is not tied to the LM "
        "head and the method is lora or qlora", default="auto")
    fp8_base: bool = _help(
        "qlora: run the frozen base's matmuls in FP8 (e4m3, per-token and per-channel scales) on Hopper GPUs (H100, "
        "H200): faster, with a slightly noisier base (see BENCHMARKS.md); the adapters, their gradients and the "
        "optimizer are unchanged", default=False)

    def __post_init__(self):
        if self.resident_layers is not None and self.resident_layers < 0:
            raise ConfigError(f"model.resident_layers must be >= 0, got {self.resident_layers}")


@dataclass
class LoraConfig:
    r: int = _help("rank of the adapter matrices; 8-64 is usual", default=16)
    alpha: float = _help("scaling numerator: the update is (alpha / r) * B @ A", default=32.0)
    dropout: float = _help("dropout on the adapter's input", default=0.0)
    target_modules: list[str] = _help("linear layers that get an adapter (default: every attention and MLP projection)",
                                      default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = _help("rank-stabilised scaling alpha / sqrt(r), which keeps high ranks learning", default=False)

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty: name at least one linear layer, e.g. q_proj")


@dataclass
class DataConfig:
    train: str = _help("training data: a .jsonl/.json/.parquet/.csv file or a folder of them", default="")
    val: str | None = _help("validation data file (otherwise val_ratio of train is held out)", default=None)
    val_ratio: float = _help("fraction of train held out for validation when no val file is given", default=0.0)
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text"] = _help(
        "record format; auto detects it from the fields of the first record", default="auto")
    system_prompt: str | None = _help("system message put before examples that have none", default=None)
    max_length: int = _help("tokens per sequence (and per packed row)", default=2048)
    overlong: Literal["truncate", "drop"] = _help("what to do with examples longer than max_length", default="truncate")
    loss_on: Literal["assistant", "all"] = _help("which tokens carry loss: the assistant's/completion's, or all",
                                                 default="assistant")
    packing: bool = _help("pack short examples into max_length rows (no attention across examples)", default=True)
    skip_bad_examples: bool = _help("skip and count malformed records instead of stopping at the first", default=False)

    def __post_init__(self):
        if not 0 <= self.val_ratio < 1:
            raise ConfigError(f"data.val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class EvalConfig:
    before_training: bool = _help("evaluate the base model before the first step", default=True)
    data: str | None = _help("held-out file for generation metrics (default: the validation data)", default=None)
    metrics: list[str] = _help("generation metrics: json, exact_match, classification, rouge, bleu, or module:function",
                               default_factory=list)
    max_examples: int = _help("examples used for generation metrics (0: all)", default=0)
    max_new_tokens: int = _help("generation budget per example", default=256)
    batch_size: int = _help("examples decoded together", default=16)
    every: int = _help("also run generation metrics every N steps (0: only before and after)", default=0)
    best_metric: str = _help("metric that picks the best checkpoint, e.g. val_loss or json_f1", default="val_loss")
    patience: int = _help("stop after this many evaluations without improvement of best_metric (0: never)", default=0)


@dataclass
class Config:
    model: ModelConfig = _help("the base model", default_factory=ModelConfig)
    method: Literal["qlora", "lora", "full"] = _help(
        "qlora: frozen NF4 base + adapters; lora: frozen 16-bit base + adapters; full: every weight (small models)",
        default="qlora")
    lora: LoraConfig = _help("adapter settings", default_factory=LoraConfig)
    data: DataConfig = _help("training data", default_factory=DataConfig)
    eval: EvalConfig = _help("evaluation before, during and after training", default_factory=EvalConfig)
    output_dir: str = _help("where the adapter, checkpoints, metrics and run.json go", default="runs/run")
    epochs: float = _help("passes over the training data (ignored when max_steps > 0)", default=1.0)
    max_steps: int = _help("optimizer steps to run (0: derived from epochs)", default=0)
    micro_batch_size: int = _help("rows per forward pass; reduce to 4, 2, 1 if you run out of memory", default=4)
    grad_accum: int = _help("micro-batches per optimizer step (effective batch = micro_batch_size * grad_accum)",
                            default=1)
    learning_rate: float = _help("peak learning rate; 1e-4 to 3e-4 for LoRA on 7B, higher for small models",
                                 default=2e-4)
    lr_schedule: Literal["cosine", "linear", "constant"] = _help("decay after warmup", default="cosine")
    warmup_ratio: float = _help("fraction of steps spent warming up linearly from 0", default=0.03)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("clip the gradient norm to this (0: no clipping)", default=1.0)
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = _help(
        "auto: paged 8-bit AdamW on GPU, AdamW on CPU", default="auto")
    gradient_checkpointing: bool = _help("recompute layer activations in backward: far less memory, ~30% slower",
                                         default=True)
    kept_layers: int = _help("with gradient_checkpointing, the last N decoder layers keep their activations instead of "
                             "recomputing them: faster, more memory (--gpu-memory sets it from the spare memory)",
                             default=0)
    offload_activations: int = _help("with gradient_checkpointing, the first N decoder layers neither recompute nor "
                                     "keep their activations on the GPU: each goes to pinned CPU memory on a side "
                                     "stream and comes back one layer ahead of its backward (experimental)", default=0)
    offload_checkpoints: bool = _help("with gradient_checkpointing, keep each layer's saved input in pinned CPU "
                                      "memory (copied on a side stream): long sequences fit", default=False)
    mlp_chunk_tokens: int = _help("> 0: run each MLP over this many tokens at a time in training, keeping only its "
                                  "input (long sequences; one extra MLP forward)", default=0)
    cuda_graphs: Literal["auto", "on", "off"] = _help(
        "record the training micro-step as a CUDA graph and replay it, so the GPU no longer waits for Python to "
        "issue thousands of kernels (one GPU, lora.dropout 0, batches padded to data.max_length). auto: on where "
        "that wait is large, packed micro-batches of at most 8,192 tokens (Qwen2.5-7B at 2 x 2048 on an H100: +30-47%)",
        default="auto")
    max_bad_steps: int = _help("stop after this many NaN/Inf steps in a row (each one is skipped)", default=5)
    seed: int = _help("seed for data order, adapter init and dropout", default=0)
    device: str = _help("auto, cpu, cuda or cuda:N", default="auto")
    gpu_memory: str | None = _help("fit the run to this GPU budget (12GB, rtx4070, t4, ...): settings from the "
                                   "memory plan, allocator capped there", default=None)
    distributed: Literal["auto", "ddp", "fsdp"] = _help(
        "with several processes (lorafit train --gpus N, or torchrun): ddp keeps the whole model on every GPU and "
        "sums the LoRA gradients; fsdp shards weights, adapters and optimizer states; auto: ddp when the memory "
        "plan fits one GPU, else fsdp. micro_batch_size is per process", default="auto")
    log_every: int = _help("steps between metric lines", default=1)
    val_every: int = _help("steps between validation-loss evaluations (0: only at the end)", default=0)
    save_every: int = _help("steps between checkpoints (0: only the final adapter)", default=0)
    keep_checkpoints: int = _help("most recent checkpoints kept on disk", default=2)
    resume: str | None = _help("checkpoint folder to continue from, or 'auto' for the latest in output_dir",
                               default=None)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _help(
        "experiment trackers that also get the logged scalars (each needs its package)", default_factory=list)

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        if self.kept_layers < 0:
            raise ConfigError(f"kept_layers must be >= 0, got {self.kept_layers}")
        if self.offload_activations < 0:
            raise ConfigError(f"offload_activations must be >= 0, got {self.offload_activations}")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError("offload_activations takes layers out of gradient checkpointing; with "
                              "gradient_checkpointing false no layer is recomputed: set it to 0")
        if self.cuda_graphs == "on":
            conflicts = {"method full": self.method == "full", "lora.dropout > 0": self.lora.dropout > 0,
                         "offload_checkpoints": self.offload_checkpoints, "mlp_chunk_tokens": self.mlp_chunk_tokens > 0,
                         "offload_activations": self.offload_activations > 0}
            if any(conflicts.values()):
                raise ConfigError("cuda_graphs on cannot record a micro-step with "
                                  + ", ".join(k for k, v in conflicts.items() if v) + "; set cuda_graphs off")
        if self.model.fp8_base and self.method != "qlora":
            raise ConfigError(f"model.fp8_base runs the NF4 base in FP8: it needs method qlora, not {self.method}")
        if self.model.stream_layers == "on" and self.method != "qlora":
            raise ConfigError(f"model.stream_layers on streams the NF4 base: it needs method qlora, not {self.method}")


# --- loading -------------------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".") if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where and ':' not in str(e) else ''}{e}") from None


def parse_overrides(args: list[str]) -> dict:
    """`--lora.r 8 --learning-rate=1e-4 --packing` into a nested dict; values parsed as YAML scalars."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --field value or "
                              "--section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def merge_settings(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section (nested dicts merge, other values replace)."""
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge_settings(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (optional), apply overrides, and validate every field; raises ConfigError."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    if overrides:
        data = merge_settings(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def field_help(cls=Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(flag name, help, default) for every leaf field, for the CLI's help text."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_help(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return rows
