"""Evaluate a model (base, or base + adapter) on held-out data: likelihood and generation metrics.

Used by `train` (before, during and after) and by `lorafit eval`. Per-example predictions are written beside the
scores so a person can read what went wrong.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lorafit.config import ConfigError
from lorafit.eval.generate import generate
from lorafit.eval.likelihood import evaluate_loss


def load_eval_conversations(cfg, val_report=None) -> list:
    """Conversations whose last message is the reference answer, from eval.data or data.val."""
    from lorafit.data.formats import detect_format, to_conversation
    from lorafit.data.load import load_records

    path = cfg.eval.data or cfg.data.val
    if not path:
        raise ConfigError("eval.metrics needs held-out conversations: set eval.data or data.val")
    records = load_records(path)
    fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(records[0])
    conversations = [to_conversation(r, fmt, cfg.data.system_prompt) for r in records]
    if any(isinstance(c, str) for c in conversations):
        raise ConfigError(f"{path}: generation metrics need prompt/answer records, not plain text")
    if cfg.eval.max_examples:
        conversations = conversations[: cfg.eval.max_examples]
    return conversations


def score_predictions(metrics: list[str], predictions: list[str], references: list[str]) -> dict:
    from lorafit.eval.metrics import resolve_metric

    scores: dict = {}
    for name in metrics:
        scores.update(resolve_metric(name)(predictions, references))
    return scores


def generate_answers(model, tokenizer, conversations: list, max_new_tokens: int, batch_size: int,
                     autocast=None) -> list[str]:
    from lorafit.data.tokenize import tokenize_prompt

    prompts = [tokenize_prompt(tokenizer, conv[:-1]) for conv in conversations]
    with autocast() if autocast else contextlib.nullcontext():
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def evaluate_run(model, tokenizer, val_examples, conversations, cfg, tag: str, output_dir: Path | None,
                 autocast=None) -> dict:
    """Scores of the model as it is now; predictions go to OUT/eval/<tag>_predictions.jsonl (if OUT is given)."""
    scores: dict = {}
    if val_examples:
        loss = evaluate_loss(model, val_examples, tokenizer.pad_token_id, batch_size=cfg.micro_batch_size,
                             autocast=autocast)
        scores.update(val_loss=loss["loss"], val_perplexity=loss["perplexity"])
    if conversations and cfg.eval.metrics:
        references = [conv[-1]["content"] for conv in conversations]
        predictions = generate_answers(model, tokenizer, conversations, cfg.eval.max_new_tokens,
                                       cfg.eval.batch_size, autocast)
        generated = score_predictions(cfg.eval.metrics, predictions, references)
        scores.update(generated)
        if output_dir is None:
            return scores
        folder = Path(output_dir) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{tag}_predictions.jsonl", "w") as f:
            for conv, pred, ref in zip(conversations, predictions, references):
                f.write(json.dumps({"input": conv[-2]["content"], "reference": ref, "prediction": pred}) + "\n")
        (folder / f"{tag}_scores.json").write_text(json.dumps(scores, indent=1, default=str))
    return scores


def evaluate_model(data: str, model: str | None = None, adapter: str | None = None, metrics: list[str] | None = None,
                   max_examples: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
                   output_dir: str | Path | None = None, device: str = "auto",
                   system_prompt: str | None = None) -> dict:
    """Score a base model, or base + adapter, on a held-out file: target-token loss/perplexity and, with
    `metrics`, generation metrics; per-example predictions go to OUTPUT_DIR/eval/ when given."""
    from lorafit.config import Config, DataConfig, EvalConfig
    from lorafit.data.build import build_examples
    from lorafit.infer import load_for_inference
    from lorafit.train.loop import resolve_device

    net, tokenizer = load_for_inference(model, adapter, device)
    cfg = Config(data=DataConfig(train=data, val=data, system_prompt=system_prompt, max_length=4096),
                 eval=EvalConfig(data=data, metrics=list(metrics or []), max_examples=max_examples,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size), micro_batch_size=batch_size)
    examples, _ = build_examples(cfg.data, tokenizer, data)
    if max_examples:
        examples = examples[:max_examples]
    conversations = load_eval_conversations(cfg) if metrics else []
    autocast = None
    if resolve_device(device).type == "cuda":
        import torch

        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    return evaluate_run(net, tokenizer, examples, conversations, cfg, "adapter" if adapter else "base", output_dir,
                        autocast)

