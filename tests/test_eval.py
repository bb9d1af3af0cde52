"""Evaluation: perplexity against transformers, generation against itself and transformers, best/early stop."""

import json
import math

import torch

from lorafit.config import DataConfig
from lorafit.data.build import build_examples
from lorafit.data.example import IGNORE_INDEX
from lorafit.data.tokenize import ensure_chat_template
from lorafit.eval.evaluate import evaluate_model
from lorafit.eval.generate import generate
from lorafit.eval.likelihood import evaluate_loss
from lorafit.model.load import load_model
from lorafit.train.loop import train
from lorafit.train.progress import Progress
from tests.test_train import tiny_config, write_chat_data
from tests.tiny import make_tiny_checkpoint


def test_perplexity_equals_transformers(tmp_path):
    folder, hf_model = make_tiny_checkpoint(tmp_path, "llama")
    loaded = load_model(str(folder))
    ensure_chat_template(loaded.tokenizer)
    data = write_chat_data(tmp_path / "val.jsonl", 9)
    examples, _ = build_examples(DataConfig(train=str(data)), loaded.tokenizer, str(data))
    ours = evaluate_loss(loaded.model, examples, loaded.tokenizer.pad_token_id, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # one by one, straight through transformers: no padding, no batching
            logits = hf_model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            keep = targets != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert ours["tokens"] == count
    assert abs(ours["perplexity"] - math.exp(total / count)) / math.exp(total / count) < 1e-4


def test_batched_generation_equals_one_by_one_and_transformers(tmp_path):
    folder, hf_model = make_tiny_checkpoint(tmp_path, "qwen2")
    loaded = load_model(str(folder))
    model, tok = loaded.model.eval(), loaded.tokenizer
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 9, 5, 14, 1, 7)]
    batched = generate(model, tok, prompts, max_new_tokens=10, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=10, batch_size=1)[0] for p in prompts]
    assert batched == single
    for prompt, text in zip(prompts[:3], single[:3]):
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                eos_token_id=sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}),
                                pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, len(prompt):], skip_special_tokens=True) == text


def test_early_stopping_keeps_the_best_adapter(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "llama")
    data = write_chat_data(tmp_path / "train.jsonl", 30)
    val = write_chat_data(tmp_path / "val.jsonl", 6, seed=1)
    # a learning rate too small to move the loss: no evaluation improves on the first, so patience runs out
    cfg = tiny_config(tmp_path, folder, data, max_steps=20, learning_rate=1e-12, val_every=2,
                      data={"train": str(data), "val": str(val), "max_length": 64},
                      eval={"before_training": True, "patience": 2, "best_metric": "val_loss"})
    result = train(cfg, Progress(quiet=True))
    assert result.stopped_early and result.best["step"] == 2
    assert len([r for r in result.history if "loss" in r]) == 6  # evaluations at 2 (best), 4, 6 (stop)
    assert (result.output_dir / "best" / "adapter_model.safetensors").is_file()
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["stopped_early"] and run["metrics"]["best"]["step"] == 2 and "val_loss" in run["metrics"]["before"]


def test_evaluate_model_scores_base_and_adapter(tmp_path):
    folder, _ = make_tiny_checkpoint(tmp_path, "qwen2")
    data = write_chat_data(tmp_path / "train.jsonl", 20)
    result = train(tiny_config(tmp_path, folder, data, max_steps=4), Progress(quiet=True))
    base = evaluate_model(str(data), model=str(folder), metrics=["exact_match"], max_examples=5, max_new_tokens=6,
                          device="cpu")
    tuned = evaluate_model(str(data), adapter=str(result.artifact_dir), metrics=["exact_match"], max_examples=5,
                           max_new_tokens=6, output_dir=tmp_path / "ev", device="cpu")
    assert {"val_loss", "val_perplexity", "exact_match"} <= set(base) and base["val_loss"] != tuned["val_loss"]
    lines = (tmp_path / "ev" / "eval" / "adapter_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 5 and {"input", "reference", "prediction"} == set(json.loads(lines[0]))
