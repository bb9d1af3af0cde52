"""`lorafit data stats` and `lorafit data preview`: the numbers and the marked tokens are the trainer's own."""

import importlib.util
import json
import random
import re

import pytest
from rich.console import Console

from lorafit.cli import main
from lorafit.config import load_config
from lorafit.data.build import build_examples
from lorafit.data.example import IGNORE_INDEX
from lorafit.data.formats import to_conversation
from lorafit.data.inspect import data_stats, load_tokenizer_for, plain_preview, preview_examples
from lorafit.data.show import print_preview
from lorafit.data.tasks import intents, load_task, medication, write_jsonl
from lorafit.data.tokenize import ensure_chat_template, render, tokenize_conversation
from lorafit.model import bundled
from tests.tiny import make_tiny_checkpoint

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def bundled_tokenizer():
    cached = (bundled.cache_dir() / "models" / bundled.BUNDLED_NAME / "config.json").is_file()
    if not cached and importlib.util.find_spec(bundled.BUNDLED_PACKAGE) is None:
        pytest.skip(f"the bundled model needs: {bundled.INSTALL_HINT}")
    return load_tokenizer_for("bundled")


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("task", ["medication", "intents"])
def test_preview_highlights_exactly_the_tokens_the_trainer_labels(tmp_path, bundled_tokenizer, task):
    records = load_task(task).generate(8, seed=3)
    path = write_jsonl(tmp_path / f"{task}.jsonl", records)
    examples = preview_examples(path, n=8, tokenizer=bundled_tokenizer)
    assert len(examples) == 8
    tok = bundled_tokenizer
    for ex, record in zip(examples, records):
        # labels straight from the function the trainer uses, not from the preview
        ids, labels = tokenize_conversation(tok, to_conversation(record, "messages"))
        assert ex.input_ids == ids
        target_positions = {t for t, label in enumerate(labels) if label != IGNORE_INDEX}
        assert ex.loss_positions == target_positions
        assert 0 < len(target_positions) < len(ids)
        assert tok.convert_ids_to_tokens(ids[max(target_positions)]) == "<|im_end|>"  # the model learns to stop
        # the plain rendering: markers removed it is the whole decoded text; inside them, each run of loss tokens
        text = plain_preview(ex)
        assert text.replace("⟦", "").replace("⟧", "") == render(tok, to_conversation(record, "messages"))
        runs, start = [], None
        for t in range(len(ids) + 1):
            inside = t in target_positions
            if inside and start is None:
                start = t
            if not inside and start is not None:
                runs.append(tok.decode(ids[start:t], skip_special_tokens=False))
                start = None
        assert re.findall("⟦(.*?)⟧", text, flags=re.S) == runs
        assert runs[-1] == record["messages"][-1]["content"] + "<|im_end|>"


def test_preview_styles_loss_tokens_on_a_terminal(tmp_path, bundled_tokenizer):
    path = write_jsonl(tmp_path / "intents.jsonl", intents.generate(2, seed=0))
    console = Console(force_terminal=True, color_system="standard", width=200, record=True)
    print_preview(preview_examples(path, n=1, tokenizer=bundled_tokenizer), console)
    out = console.export_text(styles=True)
    answer = json.loads(path.read_text().splitlines()[0])["messages"][-1]["content"]
    assert f"\x1b[1;32m{answer}<|im_end|>" in out  # bold green: carries loss
    assert "\x1b[2m<|im_start|>user" in out  # dim: masked
    assert "⟦" not in out


def length_records(rng, n):
    """Chat records of widely varying length, some with answers entirely past a short max_length."""
    out = []
    for i in range(n):
        user = " ".join(rng.choices(WORDS[:50], k=rng.choice([2, 5, 30, 60])))
        out.append(chat(user, " ".join(rng.choices(WORDS[:50], k=rng.choice([1, 4, 20]))) + f" end{i}"))
    return out


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_stats_counts_equal_what_training_reports(tmp_path, tiny_tokenizer, overlong):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in length_records(random.Random(0), 60)]
    lines.insert(7, '{"messages": [{"role": "user", "content": "no answer"}]}')  # bad: skipped and counted
    path.write_text("\n".join(lines) + "\n")
    stats = data_stats(path, max_length=96, overlong=overlong, skip_bad=True, tokenizer=tiny_tokenizer)
    cfg = load_config(overrides={"data": {"train": str(path), "max_length": 96, "overlong": overlong,
                                          "skip_bad_examples": True}}).data
    examples, report = build_examples(cfg, tiny_tokenizer)
    assert (stats.records, stats.examples, stats.truncated, stats.dropped_overlong, stats.no_target_tokens,
            stats.skipped_bad) == (report.records, report.examples, report.truncated, report.dropped_overlong,
                                   report.no_target_tokens, report.skipped_bad)
    assert stats.target_tokens == sum(ex.num_targets for ex in examples)
    assert stats.records == 61 and stats.skipped_bad == 1 and f"{path}:8" in stats.skipped_sources[0]
    ensure_chat_template(tiny_tokenizer)
    full = [len(tokenize_conversation(tiny_tokenizer, to_conversation(json.loads(line), "messages"))[0])
            for i, line in enumerate(lines) if i != 7]
    over = sum(length > 96 for length in full)
    assert over > 5 and stats.lengths["max"] == max(full) and stats.lengths["total"] == sum(full)
    if overlong == "truncate":
        assert stats.truncated == over and stats.no_target_tokens > 0  # some answers lie wholly past 96 tokens
        assert stats.tokens_cut == sum(length - 96 for length in full if length > 96)
    else:
        assert stats.dropped_overlong == over and stats.truncated == 0
    assert sum(row["count"] for row in stats.histogram) == len(full)
    assert sum(row["count"] for row in stats.histogram if row["over_max_length"]) == over
    assert any(row["lo"] == 96 for row in stats.histogram)  # max_length sits on a bin edge


def jaccard_words(n, change=()):
    """n distinct words, the positions in `change` replaced by other words."""
    return " ".join(f"x{i}" if i in change else WORDS[i] for i in range(n))


def test_exact_and_near_duplicates(tmp_path, tiny_tokenizer):
    # with the answer, 41 words: 39 word 3-grams; a new first word changes one of them: Jaccard 38/40 = 0.95
    a, a_near = jaccard_words(40), jaccard_words(40, change={0})
    c, c_far = jaccard_words(20), jaccard_words(20, change={10})  # 19 3-grams, 3 changed: 16/22 = 0.73, not near
    rows = [chat(a, "yes"), chat(a, "yes"), chat(a_near, "yes"), chat("something else entirely here", "no"),
            chat(c, "ok"), chat(c_far, "ok")]
    # 20 more near pairs (Jaccard 28/30 = 0.93): every one must be found (MinHash misses one with p = 1e-6)
    for k in range(20):
        words = [f"p{k}q{i}" for i in range(30)]
        rows += [chat(" ".join(words), "a"), chat(" ".join(["zz"] + words[1:]), "a")]
    stats = data_stats(write_jsonl(tmp_path / "d.jsonl", rows), max_length=512, tokenizer=tiny_tokenizer)
    src = lambda line: f"{tmp_path / 'd.jsonl'}:{line}"  # noqa: E731
    assert stats.exact_duplicates["extra_copies"] == 1 and stats.exact_duplicates["examples"] == [[src(1), src(2)]]
    assert stats.near_duplicates["extra_copies"] == 21 and stats.near_duplicates["groups"] == 21
    assert [src(1), src(3)] in stats.near_duplicates["examples"]
    assert all(src(5) not in group for group in stats.near_duplicates["examples"])
    assert "Jaccard similarity >= 0.9" in stats.near_duplicates["method"]


def test_label_and_role_balance(tmp_path, tiny_tokenizer):
    records = intents.generate(40, seed=1)
    first = records[0]["messages"]
    other = next(label for label in intents.LABELS if label != first[-1]["content"])
    records.append(chat(first[1]["content"], other, first[0]["content"]))  # the same message labelled differently
    stats = data_stats(write_jsonl(tmp_path / "i.jsonl", records), max_length=512, tokenizer=tiny_tokenizer)
    expected = {}
    for r in records:
        expected[r["messages"][-1]["content"]] = expected.get(r["messages"][-1]["content"], 0) + 1
    assert stats.labels == expected and set(stats.labels) <= set(intents.LABELS)
    assert stats.roles == {"messages": {"system": 41, "user": 41, "assistant": 41}, "assistant_turns": {1: 41}}
    path = tmp_path / "i.jsonl"
    assert stats.conflicting_answers["prompts"] >= 1 and [f"{path}:1", f"{path}:41"] in stats.conflicting_answers[
        "examples"]
    free_text = data_stats(write_jsonl(tmp_path / "m.jsonl", medication.generate(20, seed=1)), max_length=512,
                           tokenizer=tiny_tokenizer)
    assert free_text.labels is None and free_text.roles["messages"]["assistant"] == 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("model"), "qwen2")
    return str(folder)


def test_cli_stats_text_and_json(tmp_path, tiny_model, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", length_records(random.Random(1), 30))
    main(["data", "stats", str(path), "--model", tiny_model, "--max-length", "64", "--json"])
    printed = json.loads(capsys.readouterr().out)
    expected = data_stats(path, tiny_model, max_length=64).to_dict()
    expected["roles"]["assistant_turns"] = {str(k): v for k, v in expected["roles"]["assistant_turns"].items()}
    assert printed == expected and printed["truncated"] > 0
    main(["data", "stats", str(path), "--model", tiny_model, "--max-length", "64"])
    out = capsys.readouterr().out
    assert f"truncated {printed['truncated']}" in out and "max_length 64" in out and "█" in out
    assert "exact duplicates: 0" in out and "hint: " in out


def test_cli_preview_marks_loss_spans_without_a_terminal(tmp_path, tiny_model, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [chat("hello world", "the quick brown fox")])
    main(["data", "preview", str(path), "--model", tiny_model, "-n", "3"])
    out = capsys.readouterr().out
    assert "⟦the quick brown fox<|im_end|>⟧" in out and "<|im_start|>user\nhello world<|im_end|>" in out
    assert f"{path}:1" in out


@pytest.mark.parametrize("command", ["stats", "preview"])
def test_bad_input_is_named_without_traceback(tmp_path, tiny_model, capsys, command):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    for path, message in ((bad, f"{bad}:2: not valid JSON"), (tmp_path / "none.jsonl", "file not found")):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", command, str(path), "--model", tiny_model])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    good = write_jsonl(tmp_path / "good.jsonl", [chat("hello", "world")])
    with pytest.raises(SystemExit) as exit_info:
        main(["data", command, str(good), "--model", str(tmp_path / "no-model")])
    assert exit_info.value.code == 2 and "model folder not found" in capsys.readouterr().err
