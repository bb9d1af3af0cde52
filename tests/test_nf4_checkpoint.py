"""Loading shard by shard (one 16-bit matrix at a time) and the pre-quantized NF4 folder format."""

import json
import re
import weakref

import pytest
import torch
from safetensors import safe_open

import lorafit.model.load as load
from lorafit.errors import ModelError
from lorafit.model.load import load_model
from lorafit.model.nf4_checkpoint import quantize_checkpoint
from lorafit.model.quantize import NF4_TENSORS, import_bitsandbytes, is_nf4
from tests.tiny import make_tiny_checkpoint

DENSE_LINEAR = re.compile(r"layers\.\d+\..*_proj\.weight$")


def test_quantized_loading_holds_one_dense_matrix_at_a_time(tmp_path, monkeypatch):
    """Every time bitsandbytes quantizes, count the decoder-linear weights read from the checkpoint that are still
    alive: loading shard by shard keeps exactly one (the one being quantized); reading the checkpoint first and
    quantizing afterwards would keep all 21."""
    folder, _ = make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=3)
    alive: list[weakref.ref] = []
    real_open = load.safe_open

    class TrackingOpen:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            tensor = self.inner.get_tensor(key)
            if DENSE_LINEAR.search(key):
                alive.append(weakref.ref(tensor))
            return tensor

    bnb = import_bitsandbytes()
    real_quantize = bnb.functional.quantize_4bit
    counts = []

    def counting_quantize(weight, *args, **kwargs):
        counts.append(sum(ref() is not None for ref in alive))
        return real_quantize(weight, *args, **kwargs)

    monkeypatch.setattr(load, "safe_open", TrackingOpen)
    monkeypatch.setattr(bnb.functional, "quantize_4bit", counting_quantize)
    model = load_model(str(folder), quantize=True).model
    assert len(alive) == len(counts) == 3 * 7
    assert max(counts) == 1, counts
    assert sum(ref() is not None for ref in alive) == 0  # none kept after loading
    assert sum(is_nf4(m) for m in model.modules()) == 21


def quantized_pair(tmp_path, family="qwen2", **quantize_kwargs):
    folder, _ = make_tiny_checkpoint(tmp_path, family)
    out = quantize_checkpoint(folder, tmp_path / "nf4", device="cpu", **quantize_kwargs)
    return folder, out


def test_prequantized_folder_loads_the_same_weights_bit_for_bit(tmp_path, monkeypatch):
    folder, out = quantized_pair(tmp_path, shard_size=20_000)  # small shards: an index and several files
    config = json.loads((out / "config.json").read_text())
    assert config["lorafit_quantization"] == {"method": "nf4", "blocksize": 64, "double_quant": True,
                                              "compute_dtype": "float32", "source": str(folder)}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert "model.layers.1.mlp.down_proj.packed" in index and "model.layers.1.mlp.down_proj.weight" not in index
    assert "model.layers.0.self_attn.q_proj.bias" in index  # Qwen2's biases are copied as they are
    with safe_open(str(out / index["model.layers.0.self_attn.q_proj.packed"]), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.packed").dtype == torch.uint8

    reference = load_model(str(folder), quantize=True).model.eval()
    bnb = import_bitsandbytes()

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a pre-quantized folder must load without quantizing")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_quantizing)
    loaded = load_model(str(out)).model.eval()  # quantize=False: the marker makes it NF4 anyway
    ours = dict(loaded.named_modules())
    nf4 = [name for name, m in reference.named_modules() if is_nf4(m)]
    assert len(nf4) == 14 and all(is_nf4(ours[name]) for name in nf4)
    for name in nf4:
        assert torch.equal(ours[name].dequantize(), reference.get_submodule(name).dequantize()), name
        for tensor in NF4_TENSORS:
            assert torch.equal(getattr(ours[name], tensor), getattr(reference.get_submodule(name), tensor))
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(ids)), reference.logits(reference(ids)))


def test_quantize_command_and_its_refusals(tmp_path):
    from lorafit.cli import main

    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    main(["quantize", str(folder), str(tmp_path / "nf4"), "--device", "cpu"])
    assert (tmp_path / "nf4" / "model.safetensors").is_file()  # one shard: no index
    assert not list(tmp_path.glob(".nf4.*"))  # the temporary folder was renamed
    with pytest.raises(ModelError, match="already exists"):
        quantize_checkpoint(folder, tmp_path / "nf4", device="cpu")
    with pytest.raises(ModelError, match="already quantized"):
        quantize_checkpoint(tmp_path / "nf4", tmp_path / "again", device="cpu")
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    config["lorafit_quantization"]["blocksize"] = 128
    (tmp_path / "nf4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not lorafit's NF4 format"):
        load_model(str(tmp_path / "nf4"))
