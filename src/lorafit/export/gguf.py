"""Export a Hugging Face folder (a merged model) to one GGUF file that llama.cpp runs and transformers reads back.

Names follow llama.cpp's own converter (convert_hf_to_gguf.py), through the `gguf` package's tensor-name map:
- architecture "llama" for Llama and Mistral (and SmolLM2, a Llama), "qwen2" for Qwen2/2.5, "qwen3" for Qwen3;
  these are also the names transformers' GGUF loader maps back to its model classes;
- for "llama" only, the q/k projection rows are permuted per head (llama.cpp's llama graph rotates interleaved
  pairs, Hugging Face rotates halves); transformers' loader undoes exactly this permutation (LlamaTensorProcessor),
  and applies none for qwen2/qwen3, whose llama.cpp graphs rotate halves (NEOX) as Hugging Face does;
- 1-D tensors (norms, biases) stay F32; matrices are F16, or Q8_0 (blocks of 32, one fp16 scale each, through
  `gguf.quants`) where the row length allows it, else F16, as llama.cpp's converter does.

The tokenizer is written as llama.cpp's "gpt2" (byte-level BPE) model: tokens, token types, merges, the
pre-tokenizer name llama.cpp needs to split text as the tokenizer.json does, special ids, add_bos and the chat
template. SentencePiece vocabularies (Llama 2, Mistral v0.1) are refused: convert those with llama.cpp's script.

Limits of the transformers round trip (llama.cpp is unaffected): its loader reads no rope scaling, so a
llama3-rope model (written with llama.cpp's `rope_freqs` factors) or a linear-scaled one comes back with plain
rope; and it reads no head_dim for qwen2/qwen3, so those need head_dim == hidden_size / heads there.

Tensors are converted and written one at a time (GGUF's header is planned from the safetensors headers first), so
memory stays at one tensor in fp32, whatever the model size.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lorafit.errors import LorafitError
from lorafit.model.llama import ModelArgs
from lorafit.model.load import read_hf_config, resolve_model_path, weight_files

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TYPES = ("f16", "q8_0")
# tokenizer.json pre-tokenizer regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp)
SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def export_gguf(model_dir: str | Path, out_file: str | Path, type: str = "f16") -> Path:  # noqa: A002 -- the CLI's name
    """Write `model_dir` (a Hugging Face folder of a supported family) as GGUF `type` f16 or q8_0; returns the file."""
    import gguf

    if type not in TYPES:
        raise LorafitError(f"GGUF type must be one of {', '.join(TYPES)}, got {type!r}")
    folder = resolve_model_path(str(model_dir))
    cfg = read_hf_config(folder)
    args = ModelArgs.from_hf(cfg)
    arch = ARCHITECTURES[cfg.model_type]
    if args.sliding_window is not None and args.sliding_window < cfg.max_position_embeddings:
        warnings.warn(f"{folder}: sliding window {args.sliding_window} is not written; llama.cpp attends to the "
                      "whole context, which equals the model only for prompts up to the window", stacklevel=2)
    out = Path(out_file).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    try:
        _write_model_metadata(writer, cfg, args, folder, type)
        _write_tokenizer_metadata(writer, folder, args.vocab_size)
        plan = _plan_tensors(writer, folder, cfg, args, arch, type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, source, qtype in plan:
            writer.write_tensor_data(_convert(gguf_name, source, qtype, args, arch))
    except BaseException:
        writer.close()
        out.unlink(missing_ok=True)
        raise
    writer.close()
    return out


def _write_model_metadata(writer, cfg, args: ModelArgs, folder: Path, type: str) -> None:  # noqa: A002
    import gguf

    # transformers' loader turns a "llama" file named exactly "mistral" into a gguf arch it then cannot map
    writer.add_name(folder.name if folder.name != "mistral" else "mistral (lorafit export)")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)  # transformers reads head_dim from here for the llama arch
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_vocab_size(args.vocab_size)
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is written as the rope_freqs tensor
        raise LorafitError(f"{folder}: rope_type {rope_type!r} cannot be exported to GGUF by lorafit yet")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer_name(data: dict, folder: Path) -> str:
    """llama.cpp's name for the way tokenizer.json splits text before BPE; it refuses files without a known one."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after single digits: SmolLM/StarCoder
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = SPLIT_REGEXES.get((parts[0].get("pattern") or {}).get("Regex", ""))
        if name:
            return name
    raise LorafitError(f"{folder}: tokenizer pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name known to "
                       "lorafit; convert the folder with llama.cpp's convert_hf_to_gguf.py instead")


def _write_tokenizer_metadata(writer, folder: Path, vocab_size: int) -> None:
    import gguf

    from lorafit.data.tokenize import ensure_chat_template
    from lorafit.model.load import load_tokenizer

    tokenizer = load_tokenizer(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The live tokenizer, not tokenizer.json: transformers' Qwen2Tokenizer replaces the file's pre-tokenizer with
    # Qwen2's split, and training tokenized with what was loaded.
    data = json.loads(backend.to_str()) if backend is not None else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise LorafitError(f"{folder}: GGUF export handles byte-level BPE tokenizers (Llama 3, Qwen, SmolLM) only; "
                           "for a SentencePiece vocabulary use llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise LorafitError(f"{folder}: tokenizer has {len(vocab)} tokens but the model only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp needs one token per embedding row: unused rows are named [PADi]
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    ids = tokenizer("a")["input_ids"]  # what encoding does, not a flag: Llama 3 adds BOS in its post-processor
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    ensure_chat_template(tokenizer)  # the template the adapter was trained with, when the folder had none
    writer.add_chat_template(tokenizer.chat_template)


def _plan_tensors(writer, folder: Path, cfg, args: ModelArgs, arch: str, type: str) -> list:  # noqa: A002
    """Declare every tensor (name, shape, type) to the writer; returns (gguf name, source, type) in that order."""
    import gguf

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), args.num_layers)
    plan = []
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            keys = f.keys()
            for key in keys:
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and args.tie_word_embeddings):
                    continue  # llama.cpp recomputes rope, and uses token_embd when output.weight is absent
                module, _, suffix = key.rpartition(".")
                base = names.get_name(module)
                if base is None:
                    raise LorafitError(f"{file}: tensor {key} has no llama.cpp name for architecture {arch}")
                shape = tuple(f.get_slice(key).get_shape())
                qtype = gguf.GGMLQuantizationType.F32
                if len(shape) == 2:
                    qtype = gguf.GGMLQuantizationType.F16
                    if type == "q8_0" and shape[1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                        qtype = gguf.GGMLQuantizationType.Q8_0
                plan.append((f"{base}.{suffix}", (file, key), qtype, shape))
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type") == "llama3":
        plan.append(("rope_freqs.weight", None, gguf.GGMLQuantizationType.F32, (args.head_dim // 2,)))
    for name, _, qtype, shape in plan:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(name, shape, np.float32, int(np.prod(shape)) // block * size, raw_dtype=qtype)
    return [(name, source if source else cfg, qtype) for name, source, qtype, _ in plan]


def _convert(name: str, source, qtype, args: ModelArgs, arch: str) -> np.ndarray:
    import gguf

    if name == "rope_freqs.weight":
        data = _llama3_rope_factors(source, args.head_dim)
    else:
        file, key = source
        with safe_open(str(file), framework="pt") as f:
            data = f.get_tensor(key).float()
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        data = _permute(data, args.num_heads if ".attn_q." in name else args.num_kv_heads)
    array = data.contiguous().numpy()
    out = gguf.quants.quantize(array, qtype)
    check = out.astype(np.float32) if qtype == gguf.GGMLQuantizationType.F16 else array
    if not np.isfinite(check).all():
        raise LorafitError(f"{name}: contains NaN or Inf (or overflows {qtype.name}); refusing to write it")
    return out


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: each head's rows from [first halves, second halves] to interleaved pairs."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _llama3_rope_factors(cfg, head_dim: int) -> torch.Tensor:
    """llama.cpp divides each rope frequency by a factor: plain inverse frequencies over llama3-scaled ones."""
    from lorafit.model.llama import RotaryEmbedding

    params = dict(cfg.rope_parameters)
    scaled, _ = RotaryEmbedding._inv_freq(cfg, params, "llama3", head_dim)
    theta = params.get("rope_theta", 10000.0)
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (plain / scaled.float()).float()
