"""A compact decoder for the Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

The model stays pure (gpt-fast style): plain nn.Linear layers with Hugging Face's parameter names, so a
checkpoint loads with `assign=True` and a PEFT adapter's keys map one to one. Quantization, LoRA and kernels are
applied afterwards by wrapping modules (`quantize_nf4`, `apply_lora`).

Attention takes one of three masks:
- none: plain causal attention (one example per row, right padding carries no loss);
- `seq_ids` [B, T]: packed rows, each token attends only to earlier tokens of the same example; on CUDA, with the
  batch's `cu_seqlens`, as segments through flash attention's varlen kernel (`kernels.varlen_attention`) instead of
  a mask;
- `key_padding` [B, S] with a KV cache: left-padded batched generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lorafit.kernels.fused import rms_norm, rope, swiglu
from lorafit.kernels.varlen_attention import Segments, use_varlen, varlen_attention
from lorafit.model.lora import stacked_outputs
from lorafit.model.offload import OffloadedCheckpoint, OffloadState, TiledMLP
from lorafit.model.offload_activations import ActivationOffload

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, cfg) -> ModelArgs:
        kind = cfg.model_type
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        window = getattr(cfg, "sliding_window", None)
        if kind == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            window = None  # Qwen2 configs carry a window they do not use
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            qkv_bias=kind == "qwen2" or attention_bias,  # Qwen2 hard-codes q/k/v biases
            o_bias=attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=kind == "qwen3",
            sliding_window=window,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions given; rope variants (llama3, yarn, linear...) come from transformers."""

    def __init__(self, hf_config, head_dim: int):
        super().__init__()
        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        with torch.device("cpu"):  # real values even when the model is being built on the meta device
            inv_freq, self.attention_scaling = self._inv_freq(hf_config, params, rope_type, head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    @staticmethod
    def _inv_freq(hf_config, params, rope_type, head_dim):
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q, k, v = stacked_outputs(self, ("q_proj", "k_proj", "v_proj"), x) or (self.q_proj(x), self.k_proj(x),
                                                                                self.v_proj(x))
        # stacked, v is a view of the [tokens, q+k+v] output: saved by attention as it is, it would keep q's and
        # k's columns alive until the backward (Qwen2.5-7B at 65,536 tokens: +0.5 GiB at the peak)
        v = v.contiguous()
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(mask, Segments):  # packed rows: [B * T, heads, d], segments back to back
            flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], self.head_dim) for t in (q, k, v)]
            return self.o_proj(varlen_attention(*flat, mask).view(B, T, -1))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

        self.chunk_tokens = 0  # > 0: tiled over this many tokens in training (long sequences; model/offload.py)
        # set per forward: a recomputed layer's saved tensors live one layer's backward only, so it keeps the SwiGLU
        # product rather than making it again (kernels/swiglu_lora.py: that saves memory only where tensors wait)
        self.keep_product = False

    def forward(self, x):
        # tiled with and without gradient: an offloaded checkpoint's forward runs without, and untiled there the MLP of
        # Qwen2.5-7B at 65,536 tokens held 7 GiB of [tokens, intermediate] tensors (the forward's peak)
        if self.chunk_tokens and x.shape[0] * x.shape[1] > self.chunk_tokens:
            return TiledMLP.apply(self, self.chunk_tokens, x)
        return self.plain_forward(x)

    def plain_forward(self, x):
        gate, up = stacked_outputs(self, ("gate_proj", "up_proj"), x) or (self.gate_proj(x), self.up_proj(x))
        if hasattr(self.down_proj, "forward_swiglu"):  # a LoRA linear: it keeps gate and up, not the product
            return self.down_proj.forward_swiglu(gate, up, self.keep_product)
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs, hf_config):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(hf_config, a.head_dim)


class KVCache:
    """Keys and values of every layer, grown by concatenation: simple, and generation here is eval-sized."""

    def __init__(self, num_layers: int):
        self.layers: list[list[torch.Tensor] | None] = [None] * num_layers
        self.current = 0

    def for_layer(self, i: int) -> KVCache:
        self.current = i
        return self

    def update(self, k, v):
        entry = self.layers[self.current]
        if entry is not None:
            k, v = torch.cat([entry[0], k], dim=2), torch.cat([entry[1], v], dim=2)
        self.layers[self.current] = [k, v]
        return k, v

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs, hf_config):
        super().__init__()
        self.args = args
        self.config = hf_config  # kept for rope variants, saving and export
        self.model = Backbone(args, hf_config)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.offload_checkpoints = False  # with checkpointing: keep the saved layer inputs in CPU memory
        self.kept_layers = 0  # with checkpointing: the last N layers keep their activations (no recomputation)
        self.offloaded_layers = 0  # with checkpointing: the first N layers' activations wait in CPU memory instead

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings on the compute device. A table kept in CPU memory (`embeddings_on_cpu`) is read there
        and only the rows travel; ids already on the CPU (a fresh batch) then cost no wait for the GPU."""
        table = self.model.embed_tokens.weight
        device = self.model.norm.weight.device
        if table.device == device:
            return self.model.embed_tokens(input_ids.to(device))
        return F.embedding(input_ids.to(table.device), table).to(device, non_blocking=True)

    def forward(self, input_ids, position_ids=None, seq_ids=None, key_padding=None, cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0):
        """Final hidden states [B, T, H]; `logits(hidden)` turns them into scores (the loss never needs all).
        `cu_seqlens`/`max_seqlen`: the packed batch's segments (`data.batching.segment_bounds` of seq_ids),
        used in place of the seq_ids mask where the varlen kernel runs."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        if cu_seqlens is not None and cache is None and key_padding is None and use_varlen(x):
            mask = Segments(cu_seqlens.to(x.device, non_blocking=True), max_seqlen, self.args.sliding_window)
        else:
            mask = build_mask(position_ids, seq_ids, key_padding, past, self.args.sliding_window)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        offload = OffloadState(x.device) if checkpoint and self.offload_checkpoints else None
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if offload is not None and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # the reentrant form runs backward only for inputs that need grad
        first_kept = len(self.model.layers) - self.kept_layers
        to_host = ActivationOffload(x.device) if checkpoint and self.offloaded_layers else None
        if to_host is not None:
            to_host.keep(cos, sin, mask if isinstance(mask, torch.Tensor) else None)
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.for_layer(i) if cache is not None else None
            layer.mlp.keep_product = checkpoint and self.offloaded_layers <= i < first_kept
            if not checkpoint or i >= first_kept:
                x = layer(x, cos, sin, mask, layer_cache)
            elif i < self.offloaded_layers:
                with to_host.layer(i):
                    x = layer(x, cos, sin, mask, layer_cache)
                continue
            elif offload is not None:
                x = OffloadedCheckpoint.apply(layer, i, offload, x, cos, sin, mask)
            else:  # a CUDA graph capture cannot read RNG state; it runs only without dropout
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False,
                                                      preserve_rng_state=not capturing)
            if to_host is not None and i == self.offloaded_layers:  # the first layer after the offloaded ones
                to_host.bring_back_on_gradient(x, i - 1)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def wants_cpu_embeddings(setting: str, tied: bool, method: str, gpus: int = 1) -> bool:
    """Whether the input embedding table stays in CPU memory (config model.embeddings_on_cpu): only a frozen table
    that is not also the LM head, on one GPU (FSDP shards it with the root instead)."""
    possible = not tied and method in ("lora", "qlora") and gpus == 1
    return possible and setting in ("auto", "on")


def build_mask(position_ids, seq_ids, key_padding, past: int, window: int | None):
    """Boolean attention mask [B, 1, T, S] (True = attend), or None for plain causal attention."""
    B, T = position_ids.shape
    if seq_ids is None and key_padding is None and past == 0 and (window is None or window >= T):
        return None
    device = position_ids.device
    q_index = torch.arange(past, past + T, device=device)
    k_index = torch.arange(past + T, device=device)
    mask = (k_index[None, :] <= q_index[:, None])[None, None]  # [1, 1, T, S]
    if seq_ids is not None:
        mask = mask & (seq_ids[:, None, :, None] == seq_ids[:, None, None, :])
    if key_padding is not None:
        # A left-pad query sees no real key; letting it see itself keeps its row finite (an all-masked row is NaN,
        # and NaN values leak through later layers even at zero attention weight).
        mask = mask & key_padding[:, None, None, :].bool() | (k_index[None, :] == q_index[:, None])[None, None]
    if window is not None:
        mask = mask & ((q_index[:, None] - k_index[None, :]) < window)[None, None]
    return mask.expand(B, 1, T, past + T)
