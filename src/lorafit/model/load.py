"""Load a local Hugging Face folder (or a GGUF file, or the bundled model) into lorafit's model, ready to train.

The model is built on the meta device and the checkpoint tensors are assigned into it one at a time as they are
read (no second copy, no random init, never the whole checkpoint in memory); for QLoRA each decoder linear is
quantized to NF4 the moment its weight is read. LoRA is applied afterwards, by wrapping. A folder written by
`lorafit quantize` (model/nf4_checkpoint.py) holds the NF4 tensors themselves and is marked in its config.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorafit.errors import ModelError
from lorafit.model.llama import SUPPORTED_TYPES, CausalLM, ModelArgs

CPU = torch.device("cpu")
QUANTIZATION_KEY = "lorafit_quantization"  # config.json key of a pre-quantized folder
NF4_MARKER = {"method": "nf4", "blocksize": 64, "double_quant": True}


@dataclass
class Loaded:
    model: CausalLM
    tokenizer: object
    path: Path  # the resolved Hugging Face folder
    streamer: object | None = None  # model.stream.LayerStreamer when decoder layers stream from CPU memory


def resolve_model_path(path: str) -> Path:
    """'bundled' -> the cached SmolLM2 folder; a .gguf file -> a cached converted folder; else the folder itself."""
    if path == "bundled":
        from lorafit.model.bundled import bundled_model_path

        return bundled_model_path()
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: GGUF file not found")
        from lorafit.model.bundled import cache_dir, convert_gguf

        digest = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "models" / f"{p.stem}-{digest}"
        if not (target / "config.json").is_file():
            convert_gguf(p, target)
        return target
    if not p.is_dir():
        raise ModelError(f"{p}: model folder not found (give a local Hugging Face folder, a .gguf file or 'bundled')")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: no config.json; is this a Hugging Face model folder?")
    return p


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if pickles and allow_pickle:
        return pickles
    if pickles:
        raise ModelError(f"{folder}: only pickle weights (.bin/.pt) found; pickle can run code when loaded, so "
                         "lorafit reads safetensors only. Convert the checkpoint to safetensors, or pass "
                         "--model.allow-pickle true if you trust its source.")
    raise ModelError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_hf_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many kinds here; the user needs the reason, not the stack
        raise ModelError(f"{folder}/config.json: cannot be read ({e})") from None
    if cfg.model_type not in SUPPORTED_TYPES:
        raise ModelError(f"{folder}: model_type '{cfg.model_type}' is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    return cfg


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def iter_weights(folder: Path, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor, read one at a time: the caller holds at most one of them."""
    for file in weight_files(folder, allow_pickle):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 -- safe_open has no __iter__
                    yield key, f.get_tensor(key)
        else:  # only reached with allow_pickle; weights_only refuses any object but tensors and plain containers
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            while state:
                yield state.popitem()


def prequantized(hf_config) -> dict | None:
    """The `lorafit_quantization` marker of a folder written by `lorafit quantize`, checked; None for a plain one."""
    marker = getattr(hf_config, QUANTIZATION_KEY, None)
    if marker is None:
        return None
    if not isinstance(marker, dict) or {k: marker.get(k) for k in NF4_MARKER} != NF4_MARKER:
        raise ModelError(f"config.json: {QUANTIZATION_KEY} {marker!r} is not lorafit's NF4 format {NF4_MARKER}")
    return marker


def layer_index(name: str) -> int | None:
    """Decoder layer of a module or tensor name (`model.layers.12.mlp.up_proj` -> 12), else None."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else None


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantize: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False,
               stream_resident: int | None = None) -> Loaded:
    """Build the model from `path`, reading the checkpoint one tensor at a time.

    With `quantize` each decoder linear becomes NF4 on `device` as its 16-bit weight is read, so loading peaks at one
    16-bit matrix beyond the quantized model (on the CPU and on `device`); a folder written by `lorafit quantize` is
    NF4 already and loads as it is (always quantized). With `stream_resident=K` (QLoRA only) the NF4 weights of
    decoder layers K.. stay in pinned CPU memory and are copied to `device` just before each layer runs
    (`model/stream.py`); everything else lives on `device`.
    """
    from lorafit.model.quantize import NF4_TENSORS, NF4Linear, is_quantizable

    folder = resolve_model_path(path)
    hf_config = read_hf_config(folder, trust_remote_code)
    args = ModelArgs.from_hf(hf_config)
    marker = prequantized(hf_config)
    quantize = quantize or marker is not None
    if stream_resident is not None and not quantize:
        raise ModelError("layer streaming moves NF4 weights: it needs method qlora")
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(args, hf_config)
    nf4: dict[str, NF4Linear] = {}
    if quantize:  # empty NF4 modules, filled as their weights arrive
        for name, module in list(model.named_modules()):
            if is_quantizable(name, module):
                parent, _, child = name.rpartition(".")
                nf4[name] = NF4Linear(module.out_features, module.in_features, module.bias, dtype, device="meta")
                setattr(model.get_submodule(parent), child, nf4[name])

    def home(name: str) -> torch.device:  # streamed layers keep their NF4 tensors on the CPU
        index = layer_index(name)
        return CPU if stream_resident is not None and index is not None and index >= stream_resident else device

    expected = set(model.state_dict())
    for key, tensor in iter_weights(folder, allow_pickle):
        module_name, _, leaf = key.rpartition(".")
        if module_name in nf4 and leaf == "weight" and marker is None:
            _fill_nf4(nf4[module_name], tensor, device, dtype, home(module_name))
        elif key in expected and not (key == "lm_head.weight" and args.tie_word_embeddings):
            module = model.get_submodule(module_name)
            floating = tensor.is_floating_point() and not (module_name in nf4 and leaf != "bias")
            place = home(key) if module_name in nf4 and leaf != "bias" else device
            value = tensor.to(place, dtype if floating else tensor.dtype)
            if leaf in module._parameters:
                old = module._parameters[leaf]
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = value
        del tensor  # one checkpoint tensor alive at a time
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = sorted({f"{n.rpartition('.')[0]}.weight" if n.rpartition(".")[2] in NF4_TENSORS and marker is None else n
                      for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta})
    if missing:
        raise ModelError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.to(device, torch.float32)
    streamer = None
    if stream_resident is not None:
        from lorafit.model.stream import stream_layers

        streamer = stream_layers(model, device, stream_resident)
    return Loaded(model=model, tokenizer=load_tokenizer(folder, trust_remote_code), path=folder, streamer=streamer)


def _fill_nf4(module, weight: torch.Tensor, device: torch.device, dtype: torch.dtype, home: torch.device) -> None:
    """Quantize one 16-bit weight on `device` into `module`'s NF4 tensors, then move them `home`."""
    from lorafit.model.quantize import NF4_TENSORS, NF4Linear

    linear = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    quantized = NF4Linear.from_linear(linear, device, dtype)
    del linear, weight
    for name in NF4_TENSORS:
        value = getattr(quantized, name).to(home)
        setattr(module, name, torch.nn.Parameter(value, requires_grad=False) if name == "packed" else value)


def model_identity(folder: Path) -> dict:
    """What run.json records about the base: path and hashes of its config and weight index (not the weights)."""
    out = {"path": str(folder)}
    for name in ("config.json", "model.safetensors.index.json"):
        f = folder / name
        if f.is_file():
            out[name.replace(".", "_") + "_sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    files = weight_files(folder)
    out["weight_files"] = {f.name: f.stat().st_size for f in files}
    return out
