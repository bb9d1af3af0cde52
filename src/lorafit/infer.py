"""Load base (+ adapter) for inference, and answer prompts: the library side of `lorafit generate`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafit.data.tokenize import ensure_chat_template, tokenize_prompt
from lorafit.eval.generate import generate
from lorafit.model.load import load_model
from lorafit.model.lora import load_adapter, read_adapter_config
from lorafit.train.loop import resolve_device


def adapter_base_and_method(adapter: str | Path) -> tuple[str, str]:
    """The base model an adapter was trained on and whether its base was NF4 (from run.json beside it)."""
    base = read_adapter_config(adapter).get("base_model_name_or_path") or "bundled"
    run = Path(adapter).parent / "run.json"
    method = json.loads(run.read_text())["config"]["method"] if run.is_file() else "lora"
    return base, method


def load_for_inference(model: str | None = None, adapter: str | None = None, device: str = "auto"):
    """(model, tokenizer) in eval mode; a QLoRA adapter gets the NF4 base it was trained against."""
    dev = resolve_device(device)
    method = "lora"
    if adapter:
        base, method = adapter_base_and_method(adapter)
        model = model or base
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    loaded = load_model(model or "bundled", dev, dtype, quantize=method == "qlora")
    if adapter:
        load_adapter(loaded.model, adapter)
    ensure_chat_template(loaded.tokenizer)
    return loaded.model.eval(), loaded.tokenizer


def answer(prompt: str, adapter: str | None = None, model: str | None = None, system: str | None = None,
           max_new_tokens: int = 256, temperature: float = 0.0, device: str = "auto") -> str:
    net, tokenizer = load_for_inference(model, adapter, device)
    conversation = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenize_prompt(tokenizer, conversation)
    return generate(net, tokenizer, [ids], max_new_tokens=max_new_tokens, temperature=temperature)[0]
