"""Tiny random checkpoints of each supported family, saved as real Hugging Face folders."""

from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3-rope": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=8)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
}


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello world fine tuning with low rank adapters", "the quick brown fox jumps over the lazy dog",
          "Extract medication information: metformin 500 mg PO BID", '{"medications": [{"name": "x"}]}',
          "system user assistant 0123456789 .,:;!?'\"{}[]()-_/"]


def make_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE with ChatML specials and no chat template (lorafit must add ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_tiny_checkpoint(tmp_path: Path, family: str, seed: int = 0, **overrides):
    """`overrides` replace COMMON's fields (e.g. num_hidden_layers=5)."""
    import transformers

    config_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **overrides}, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF initialises norms to one; random norms catch a misplaced norm weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    folder = tmp_path / family
    model.save_pretrained(folder)
    make_tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder, model


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    """Two fp32 computations of the same math that sum in other orders (a fused kernel against the plain
    composition, or another CPU's BLAS): equal to within `rel` of the tensor's largest magnitude, a few units of
    fp32 rounding there. A per-element 1e-5 is too tight for a gradient summed over many tokens (an AMD EPYC's BLAS
    put a 120-sized LoRA A gradient 3e-5 off its plain twin); the logic errors this catches are orders larger."""
    torch.testing.assert_close(got, want, rtol=0, atol=rel * float(want.abs().max()))
