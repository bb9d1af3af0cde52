"""Load a local Hugging Face folder (or a GGUF file, or the bundled model) into lorafit's model, ready to train.

The model is built on the meta device and the checkpoint tensors are assigned into it (no second copy, no random
init); quantization and LoRA are applied afterwards, by wrapping.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorafit.errors import ModelError
from lorafit.model.llama import SUPPORTED_TYPES, CausalLM, ModelArgs


@dataclass
class Loaded:
    model: CausalLM
    tokenizer: object
    path: Path  # the resolved Hugging Face folder


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
        raise ModelError(f"{folder}: only pickle weights (.bin/.pt) found; pickle can run code when loaded, so lorafit "
                         "reads safetensors only. Convert the checkpoint to safetensors, or pass --model.allow-pickle true "
                         "if you trust its source.")
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


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    # only reached with allow_pickle; weights_only refuses any object but tensors and plain containers
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantize: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False) -> Loaded:
    """Build the model from `path`; with `quantize`, decoder linears become NF4 on `device` layer by layer."""
    folder = resolve_model_path(path)
    hf_config = read_hf_config(folder, trust_remote_code)
    args = ModelArgs.from_hf(hf_config)
    with torch.device("meta"):
        model = CausalLM(args, hf_config)
    state = {}
    for file in weight_files(folder, allow_pickle):
        state.update(read_weights(file))
    expected = set(model.state_dict())
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, assign=True, strict=False)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if quantize:
        from lorafit.model.quantize import quantize_nf4

        quantize_nf4(model, device, dtype)
    model.to(device=device, dtype=dtype) if not quantize else _move_dense(model, device, dtype)
    model.model.rotary_emb.inv_freq.data = model.model.rotary_emb.inv_freq.data.float()
    return Loaded(model=model, tokenizer=load_tokenizer(folder, trust_remote_code), path=folder)


def _move_dense(model: torch.nn.Module, device, dtype):
    from lorafit.model.quantize import is_nf4

    """Move everything but the NF4 weights (already on device) to `device`, floating tensors in `dtype`."""
    for module in model.modules():
        if is_nf4(module):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = b.to(device)


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
