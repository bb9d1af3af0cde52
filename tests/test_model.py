"""lorafit's model against transformers' on tiny random checkpoints of each supported family."""

import pytest
import torch

from lorafit.config import LoraConfig
from lorafit.model.llama import KVCache
from lorafit.model.load import load_model
from lorafit.model.lora import LoRALinear, apply_lora, load_adapter, save_adapter
from tests.tiny import FAMILIES, make_tiny_checkpoint


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    folder, hf_model = make_tiny_checkpoint(tmp_path, family)
    ours = load_model(str(folder)).model.eval()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
        got = ours.logits(ours(ids))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_packed_rows_equal_separate_examples(tmp_path):
    """Two examples packed in one row, positions restarting and no attention across them, give each example's
    own hidden states exactly."""
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder)).model.eval()
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    seq_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = model(packed, position_ids=positions, seq_ids=seq_ids)
        torch.testing.assert_close(together[:, :7], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 7:], model(b), atol=1e-5, rtol=1e-5)


def test_kv_cache_with_left_padding_matches_full_forward(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    model = load_model(str(folder)).model.eval()
    seq = torch.randint(1, 256, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    key_padding = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).bool()
    positions = (key_padding.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        reference = model.logits(model(seq))
        cache = KVCache(len(model.model.layers))
        first = model.logits(model(padded[:, :8], position_ids=positions[:, :8], key_padding=key_padding[:, :8],
                                   cache=cache))
        rest = [model.logits(model(padded[:, i:i + 1], position_ids=positions[:, i:i + 1],
                                   key_padding=key_padding[:, :i + 1], cache=cache)) for i in range(8, 12)]
    got = torch.cat([first[:, 3:]] + rest, dim=1)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_nf4_model_is_close_to_dense_and_frozen(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    dense = load_model(str(folder)).model.eval()
    nf4 = load_model(str(folder), quantize=True).model.eval()
    assert type(nf4.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"
    assert type(nf4.lm_head).__name__ == "Linear"  # head and embeddings stay 16-bit
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        a, b = dense.logits(dense(ids)), nf4.logits(nf4(ids))
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < rel < 0.2, rel  # quantized (so not equal), but the same function


@pytest.mark.parametrize("quantize", [False, True])
def test_adapter_round_trip_through_peft(tmp_path, quantize):
    """Our saved adapter, loaded by PEFT onto transformers' model, gives our model's logits."""
    from peft import PeftModel

    folder, hf_model = make_tiny_checkpoint(tmp_path, "qwen2")
    model = load_model(str(folder), quantize=quantize).model.eval()
    cfg = LoraConfig(r=4, alpha=8)
    wrapped = apply_lora(model, cfg)
    assert len(wrapped) == 7 * len(model.model.layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(folder))
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ours = model.logits(model(ids))
        if quantize:  # the adapter was trained on NF4 weights: compare with the NF4 base of our own model
            fresh = load_model(str(folder), quantize=True).model.eval()
            load_adapter(fresh, tmp_path / "adapter")
            torch.testing.assert_close(fresh.logits(fresh(ids)), ours, atol=1e-5, rtol=1e-5)
            return
        peft_model = PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
        theirs = peft_model(input_ids=ids).logits
        base = hf_model.get_base_model()(input_ids=ids).logits if hasattr(hf_model, "get_base_model") else None
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert base is None or (base - theirs).abs().max() > 1e-3  # the adapter really changed the output


def test_nf4_gradients_unchanged_by_an_eval_pass(tmp_path):
    """Regression: bitsandbytes' Linear4bit repacks its weight in eval mode on AVX512-BF16 CPUs, after which
    backward is silently wrong. Evaluating before training must leave the gradients exactly as they were."""
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    model = load_model(str(folder), quantize=True).model
    apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    ids = torch.randint(0, 256, (2, 16))

    def grads():
        model.train()
        model.zero_grad()
        model.logits(model(ids)).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model.logits(model(ids[:, :5]))
        cache = KVCache(len(model.model.layers))
        model(ids[:1, :1], cache=cache)  # the single-token decode path too
    after = grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0)
