"""Serving artifacts: merged model folders, GGUF files and adapter folders, checked against the model + adapter."""

import json
import re

import numpy as np
import pytest
import torch

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.export.gguf import export_gguf
from lorafit.export.merge import merge_adapter, nf4_round_trip
from lorafit.export.readme import write_adapter_readme
from lorafit.model.load import load_model
from lorafit.model.lora import LoRALinear, apply_lora, save_adapter
from lorafit.model.quantize import dequantize_weight
from tests.tiny import make_tiny_checkpoint, make_tiny_tokenizer

GGUF_TOL = {"f16": 2e-3, "q8_0": 5e-2}  # max |logit diff| on the tiny models; measured 3e-4 and 1.1e-2


def make_adapter(tmp_path, folder, quantize: bool, r: int = 4, seed: int = 1, std: float = 0.1):
    """lorafit model (NF4 base when `quantize`) with random-B adapters, saved; returns (model, adapter folder)."""
    model = load_model(str(folder), quantize=quantize).model.eval()
    cfg = LoraConfig(r=r, alpha=2.0 * r)
    apply_lora(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, std)
    adapter = tmp_path / ("qlora" if quantize else "lora") / "adapter"
    save_adapter(model, adapter, cfg, base_model=str(folder))
    return model, adapter


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("quantize,base", [(False, "original"), (True, "nf4")])
def test_merged_folder_gives_model_plus_adapter_logits(tmp_path, family, quantize, base):
    """transformers, loading the merged folder, computes what lorafit's model + adapter computes: exactly in fp32,
    within bf16 rounding in bf16. A QLoRA adapter is compared on the NF4 base it was trained against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = make_tiny_checkpoint(tmp_path, family)
    model, adapter = make_adapter(tmp_path, folder, quantize)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.logits(model(ids))
    for dtype, atol in (("fp32", 2e-5), ("bf16", 3e-2)):
        out = merge_adapter(adapter, tmp_path / f"merged-{dtype}", dtype=dtype, base=base)
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    base_model = load_model(str(folder), quantize=quantize).model.eval()
    with torch.no_grad():
        assert (expected - base_model.logits(base_model(ids))).abs().max() > 1e-2  # the adapter mattered
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == family
    assert (out / "generation_config.json").is_file()
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(str(out)).chat_template  # ChatML that training used


def test_merge_is_sharded_with_an_index(tmp_path):
    from safetensors import safe_open

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")  # tied embeddings: lm_head must not be written
    _, adapter = make_adapter(tmp_path, folder, quantize=False)
    out = merge_adapter(adapter, tmp_path / "merged", shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as transformers expects
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            names = f.keys()
            tensors = [f.get_tensor(k) for k in names]
        assert all(t.dtype == torch.bfloat16 for t in tensors)
        total += sum(t.numel() * 2 for t in tensors)
    assert index["metadata"]["total_size"] == total
    for shard in shards:  # one tensor may exceed the cap on its own; otherwise shards stay under it
        size = (out / shard).stat().st_size
        assert size < 60_000 + 8_192 or len([k for k, v in index["weight_map"].items() if v == shard]) == 1


def test_nf4_round_trip_is_what_training_computes_with(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    dense = load_model(str(folder)).model
    nf4 = load_model(str(folder), quantize=True).model
    for name in ("q_proj", "k_proj"):
        w = getattr(dense.model.layers[1].self_attn, name).weight.data
        expected = dequantize_weight(getattr(nf4.model.layers[1].self_attn, name))
        torch.testing.assert_close(nf4_round_trip(w, torch.float32), expected, atol=0, rtol=0)


def test_merge_refuses_nan_and_fp16_overflow_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    _, adapter = make_adapter(tmp_path, folder, quantize=False)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    weights[key][3, 1] = float("nan")
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LorafitError, match=re.escape(key)):
        merge_adapter(adapter, tmp_path / "merged")
    weights[key] = torch.full_like(weights[key], 1e6)  # finite, but W' far beyond fp16's 65504
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LorafitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*fp16"):
        merge_adapter(adapter, tmp_path / "merged", dtype="fp16")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_adapter_folder_is_what_vllm_and_peft_load(tmp_path):
    """Keys are exactly PEFT's `base_model.model.<module>.lora_A/B.weight` for modules named as the base model
    names them, nothing else; PEFT loads the folder with no missing or unexpected key."""
    from peft import PeftModel
    from safetensors import safe_open

    folder, hf_model = make_tiny_checkpoint(tmp_path, "llama")
    model, adapter = make_adapter(tmp_path, folder, quantize=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = set(config["target_modules"])
    hf_modules = {name for name, _ in hf_model.named_modules() if name.rsplit(".", 1)[-1] in targets}
    expected = {f"base_model.model.{m}.lora_{x}.weight" for m in hf_modules for x in "AB"}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == expected
    assert config["peft_type"] == "LORA" and not config.get("modules_to_save") and not config.get("use_dora")
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model.logits(model(ids)), atol=2e-5, rtol=1e-4)


def test_adapter_readme_names_base_data_and_metrics(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": "/models/base"}))
    run = {"config": {"method": "qlora", "learning_rate": 1e-3},
           "base_model": {"path": "/models/base", "config_json_sha256": "ab" * 32, "weight_files": {"m.st": 10}},
           "data": {"train": {"path": "train.jsonl", "sha256": "cd" * 32, "files": 1},
                    "train_report": {"records": 5, "examples": 4}, "val": None},
           "metrics": {"before": {"val_loss": 1.5, "json_f1": 0.0}, "after": {"val_loss": 0.25, "json_f1": 0.875}},
           "steps": 12, "versions": {"torch": "2.13"}}
    text = write_adapter_readme(adapter, run).read_text()
    assert text.startswith("---\nlibrary_name: peft\nbase_model: /models/base\n")
    for needle in ("ab" * 32, "cd" * 32, "4 examples of 5 records", "| val_loss | 1.5 | 0.25 |",
                   "| json_f1 | 0 | 0.875 |", "--max-lora-rank 8", "--lora-paths adapter=", "NF4", "torch 2.13"):
        assert needle in text, needle


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_reads_back_through_transformers(tmp_path, family, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, hf_model = make_tiny_checkpoint(tmp_path, family)
    out = export_gguf(folder, tmp_path / "gguf" / f"{family}.gguf", kind)
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - hf_model(input_ids=ids).logits).abs().max().item()
    assert diff < GGUF_TOL[kind], diff
    tokenizer = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    original = AutoTokenizer.from_pretrained(str(folder))
    text = "Started metformin 500 mg PO BID.<|im_end|> {\"name\": \"x\"}"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template


def test_adapter_to_merged_to_gguf(tmp_path):
    """The whole chain: a QLoRA adapter merged into the NF4 base in bf16, then GGUF q8_0, read by transformers,
    still computes the model + adapter's logits (within bf16 + Q8_0 rounding)."""
    from transformers import AutoModelForCausalLM

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    model, adapter = make_adapter(tmp_path, folder, quantize=True)
    merged = merge_adapter(adapter, tmp_path / "merged", dtype="bf16", base="nf4")
    out = export_gguf(merged, tmp_path / "gguf" / "model.gguf", "q8_0")
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - model.logits(model(ids))).abs().max().item()
    assert diff < GGUF_TOL["q8_0"] + 3e-2, diff


def test_gguf_qwen3_reads_back_through_transformers(tmp_path):
    """transformers reads no head_dim for qwen3 GGUF files and takes Qwen3's 128, so the tiny model uses 128."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                      tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    hf_model.save_pretrained(tmp_path / "qwen3")
    make_tiny_tokenizer(320).save_pretrained(tmp_path / "qwen3")
    out = export_gguf(tmp_path / "qwen3", tmp_path / "gguf" / "qwen3.gguf", "q8_0")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                               dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - hf_model(input_ids=ids).logits).abs().max().item()
    assert diff < GGUF_TOL["q8_0"], diff


def test_gguf_metadata_follows_llama_cpp(tmp_path):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    reader = GGUFReader(str(export_gguf(folder, tmp_path / "m.gguf", "q8_0")))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "qwen2" and field("qwen2.block_count") == 2
    assert field("qwen2.attention.head_count_kv") == 2 and field("qwen2.context_length") == 256
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "qwen2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert field("tokenizer.ggml.token_type")[tokens.index("<|im_start|>")] == 3  # CONTROL
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp falls back to token_embd
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.attn_q.bias"] == Q.F32
    assert types["blk.1.ffn_down.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q8_0
    assert len(types) == 1 + 1 + 2 * 12  # embeddings, final norm, per layer 7 matrices + 3 biases + 2 norms


def test_gguf_llama3_rope_is_written_as_llama_cpp_factors(tmp_path):
    """llama.cpp's converter: factor 1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    import math

    from gguf import GGUFReader

    folder, _ = make_tiny_checkpoint(tmp_path, "llama3-rope")
    reader = GGUFReader(str(export_gguf(folder, tmp_path / "m.gguf", "f16")))
    got = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    dim, base, factor, low, high, old = 16, 500000.0, 8.0, 1.0, 4.0, 64
    expected = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            expected.append(1.0)
        elif wavelen > old / low:
            expected.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gguf_of_bundled_model_matches_llama_cpps_own_file(tmp_path):
    """The bundled folder came from llama.cpp's GGUF of SmolLM2; exporting it again must give llama.cpp's tensor
    names and its permuted q/k rows (to within Q8_0 rounding), and the same metadata keys llama.cpp reads."""
    from gguf import GGUFReader, dequantize

    from lorafit.model.bundled import bundled_gguf_path, bundled_model_path

    ours = GGUFReader(str(export_gguf(bundled_model_path(), tmp_path / "smol.gguf", "q8_0")))
    theirs = GGUFReader(str(bundled_gguf_path()))
    mine, ref = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert set(mine) == set(ref)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.17.attn_q.weight", "blk.29.ffn_down.weight"):
        a, b = (dequantize(t.data, t.tensor_type) for t in (mine[name], ref[name]))
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max(), name  # Q8_0 rounding only
    a = dequantize(mine["blk.0.attn_q.weight"].data, mine["blk.0.attn_q.weight"].tensor_type)
    unpermuted = load_model("bundled").model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(a - unpermuted).max() > 0.5  # the permutation is really applied
    model_keys = {k for k in theirs.fields if k.startswith(("llama.", "tokenizer.ggml."))}
    missing = model_keys - set(ours.fields) - {"tokenizer.ggml.add_space_prefix"}  # a SentencePiece-only flag
    assert not missing, missing


def test_bundled_merged_model_answers_like_model_plus_adapter(tmp_path):
    """QLoRA on the bundled SmolLM2 (random-B adapter, r=8), merged into the NF4 base in fp32: the merged folder,
    loaded as a plain model, writes the same greedy answers as the NF4 base + adapter on held-out notes.
    (fp32 because bf16 rounding of SmolLM2's weights alone flips ~3% of its greedy tokens; see model/bundled.py.)"""
    from lorafit.data.tasks import medication
    from lorafit.data.tokenize import ensure_chat_template, tokenize_prompt
    from lorafit.eval.generate import generate

    loaded = load_model("bundled", quantize=True)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ensure_chat_template(tokenizer)
    _, test_path = medication.write_demo_files(tmp_path / "data", n_train=1, n_test=5, seed=1)
    conversations = [json.loads(line)["messages"] for line in test_path.read_text().splitlines()]
    prompts = [tokenize_prompt(tokenizer, conv[:-1]) for conv in conversations]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        before = model.logits(model(ids))
    cfg = LoraConfig(r=8, alpha=16)
    apply_lora(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.02)
        assert (model.logits(model(ids)) - before).abs().max() > 0.5  # the adapter changes the answers' scores
    adapter = tmp_path / "run" / "adapter"
    save_adapter(model, adapter, cfg, base_model=str(loaded.path))
    (adapter.parent / "run.json").write_text(json.dumps({"config": {"method": "qlora", "device": "cpu"}}))

    merged_dir = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", base="nf4")
    want = generate(model, tokenizer, prompts, max_new_tokens=48)
    merged = load_model(str(merged_dir), "cpu", torch.float32)
    ensure_chat_template(merged.tokenizer)
    assert [tokenize_prompt(merged.tokenizer, conv[:-1]) for conv in conversations] == prompts
    assert generate(merged.model, merged.tokenizer, prompts, max_new_tokens=48) == want


def test_merge_fidelity_reports_both_bases(tmp_path):
    """On a QLoRA adapter the NF4 base reproduces the model + adapter (fp32: to rounding), the original does not."""
    from lorafit.export.merge import merge_fidelity

    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    _, adapter = make_adapter(tmp_path, folder, quantize=True)
    (adapter.parent / "run.json").write_text(json.dumps({"config": {"method": "qlora", "device": "cpu"}}))
    data = tmp_path / "val.jsonl"
    notes = ["metformin 500 mg PO BID", "the quick brown fox", "hello world fine tuning"]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": n},
                                                     {"role": "assistant", "content": n[::-1]}]}) + "\n"
                            for n in notes))
    report = merge_fidelity(adapter, data, dtype="fp32")
    assert report["method"] == "qlora" and report["examples"] == 3
    assert report["nf4"]["max_abs_logit_diff"] < 1e-4 and report["nf4"]["answer_top1_agreement"] == 1.0
    assert report["original"]["max_abs_logit_diff"] > 100 * report["nf4"]["max_abs_logit_diff"]
    assert abs(report["nf4"]["perplexity_change"]) < 1e-5 * report["reference_perplexity"]
