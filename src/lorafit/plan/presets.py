"""Model shapes and GPU cards the planner knows by name, read from the YAML facts under `plan/presets/`.

A model is given as a preset name (`qwen2.5-7b`) or a Hugging Face folder (its config.json is read, no weights); a
card as a preset name (`rtx4070`, `t4`), a size on the box (`12GB`: a card sold as 12 GB) or an exact allocator budget
(`10.5GiB`, `800MiB`, or bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from lorafit.errors import LorafitError

PRESETS = Path(__file__).parent / "presets"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Keys of a model preset that are planner facts, not Hugging Face config fields.
_NOT_HF = {"source", "qkv_bias"}
# A card's total_memory is 2-3% below its size on the box (RTX 4070: 11.72 GiB of 12); a size with no preset of
# that box size is taken at this fraction.
UNLISTED_CARD_FRACTION = 0.975
# What the CUDA context takes on the card outside PyTorch's allocator (driver context, cuBLAS/cuDNN handles, the
# kernels lazily loaded by torch and bitsandbytes): not in max_memory_reserved, but the card must hold it.
CUDA_CONTEXT_BYTES = 512 * 2**20


class PlanError(LorafitError, ValueError):
    """A model, card or budget the planner cannot resolve, phrased for the user."""


@dataclass(frozen=True)
class Shape:
    """The tensor sizes of a Llama-family decoder: all the planner needs to know about a model."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, has_bias) of one decoder layer's linears, in module order."""
        H, q, kv, inter = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q_proj", H, q, self.qkv_bias), ("k_proj", H, kv, self.qkv_bias), ("v_proj", H, kv, self.qkv_bias),
                ("o_proj", q, H, self.o_bias), ("gate_proj", H, inter, self.mlp_bias),
                ("up_proj", H, inter, self.mlp_bias), ("down_proj", inter, H, self.mlp_bias)]

    def layer_params(self) -> int:
        """Weights, biases and norms of one decoder layer."""
        linear = sum(i * o + (o if b else 0) for _, i, o, b in self.linears())
        return linear + 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def embedding_params(self) -> int:
        """Embedding, plus the LM head when it is not tied to it."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets=ALL_LINEAR) -> int:
        return self.layers * sum(r * (i + o) for name, i, o, _ in self.linears() if name in targets)

    @classmethod
    def from_args(cls, name: str, a) -> Shape:
        """From lorafit.model.llama.ModelArgs (what the model is really built from)."""
        return cls(name, a.vocab_size, a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads,
                   a.head_dim, a.tie_word_embeddings, a.qkv_bias, a.o_bias, a.mlp_bias, a.qk_norm)


@dataclass(frozen=True)
class Card:
    key: str
    name: str
    total_bytes: int  # what torch.cuda.get_device_properties().total_memory reports
    arch: str = "sm80"
    context_bytes: int = CUDA_CONTEXT_BYTES

    @property
    def budget(self) -> int:
        """Bytes PyTorch's allocator may reserve: the card less the CUDA context."""
        return self.total_bytes - self.context_bytes

    @property
    def capability(self) -> tuple[int, int]:
        """The compute capability `arch` names: sm89 -> (8, 9), sm120 -> (12, 0)."""
        digits = self.arch.removeprefix("sm")
        return int(digits[:-1]), int(digits[-1])

    @property
    def cublas_workspace(self) -> int:
        """cuBLAS workspace per handle, allocated through the caching allocator (PyTorch's CublasHandlePool.cpp)."""
        return 32 * 2**20 if self.capability >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


@cache
def model_presets() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted((PRESETS / "models").glob("*.yaml")):
        out.update(yaml.safe_load(path.read_text()))
    return out


@cache
def card_presets() -> dict[str, Card]:
    data = yaml.safe_load((PRESETS / "gpus.yaml").read_text())
    return {k: Card(k, v["name"], int(v["total_bytes"]), v["arch"]) for k, v in data.items()}


def card_nominal_gb() -> dict[str, int]:
    data = yaml.safe_load((PRESETS / "gpus.yaml").read_text())
    return {k: int(v["nominal_gb"]) for k, v in data.items()}


def hf_config(name: str):
    """The transformers config a preset describes (AutoConfig.for_model), as load_model would read it."""
    from transformers import AutoConfig

    fields = {k: v for k, v in model_presets()[name].items() if k not in _NOT_HF}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def shape_from_preset(name: str) -> Shape:
    p = model_presets()[name]
    return Shape(name, p["vocab_size"], p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"],
                 p["num_attention_heads"], p["num_key_value_heads"], p["head_dim"], p["tie_word_embeddings"],
                 p.get("qkv_bias", False))


def resolve_model(spec: str) -> Shape:
    """A preset name, or a Hugging Face folder (config.json only) / 'bundled'."""
    key = spec.lower().strip()
    if key in model_presets():
        return shape_from_preset(key)
    if key == "bundled" or Path(spec).expanduser().is_dir():
        from lorafit.model.llama import ModelArgs
        from lorafit.model.load import read_hf_config, resolve_model_path

        folder = resolve_model_path(spec)
        return Shape.from_args(folder.name, ModelArgs.from_hf(read_hf_config(folder)))
    raise PlanError(f"unknown model '{spec}': give a Hugging Face folder or a preset "
                    f"({', '.join(model_presets())})")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gb|g|gib|mib|mb|b)?\s*$", re.IGNORECASE)


def _norm(s: str) -> str:
    return re.sub(r"[\s_\-]|geforce|nvidia|tesla", "", s.lower())


def resolve_card(spec: str) -> Card:
    """A card preset, a box size ('12GB': the smallest listed card of that size), or an exact budget ('10GiB').

    An exact budget is the allocator's own limit, so no CUDA context is subtracted from it.
    """
    cards = card_presets()
    key = _norm(spec)
    hits = [c for k, c in cards.items() if _norm(k) == key] or [c for k, c in cards.items() if key and key in _norm(k)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise PlanError(f"'{spec}' matches several cards: {', '.join(c.key for c in hits)}")
    m = _SIZE.match(spec)
    if not m:
        raise PlanError(f"unknown GPU '{spec}': give a size (12GB, 10.5GiB) or a card ({', '.join(cards)})")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit in ("gb", "g"):
        same = [cards[k] for k, gb in card_nominal_gb().items() if gb == value]
        if same:
            return min(same, key=lambda c: c.total_bytes)
        return Card(spec, f"{value:g} GB card", int(value * 2**30 * UNLISTED_CARD_FRACTION), "sm80")
    scale = {"gib": 2**30, "mib": 2**20, "mb": 10**6, "b": 1}[unit]
    return Card(spec, f"{spec} budget", int(value * scale), "sm80", context_bytes=0)


def budget_bytes(spec: str) -> int:
    """Bytes lorafit may let PyTorch's allocator reserve for a GPU spec: the card's memory less the CUDA context.

    `lorafit train --gpu-memory SPEC` caps the allocator at this (torch.cuda.set_per_process_memory_fraction).
    """
    return resolve_card(spec).budget
