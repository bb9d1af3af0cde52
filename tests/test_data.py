"""Data path: files -> records -> conversations -> (input_ids, labels), and every way bad input is reported."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.config import DataConfig
from lorafit.data.build import build_datasets, build_examples
from lorafit.data.example import IGNORE_INDEX
from lorafit.data.formats import detect_format, to_conversation
from lorafit.data.load import Record, load_records
from lorafit.data.tokenize import ensure_chat_template, label_spans, tokenize_conversation, tokenize_prompt
from lorafit.errors import DataError

CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello wörld"},
        {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "again please"},
        {"role": "assistant", "content": " lazy dog\n"}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def sources(examples):
    return [e.source for e in examples]


def labelled_runs(tokenizer, ids, labels):
    """The decoded text of each contiguous run of tokens that carry loss."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


# --- tokenization and the loss mask -------------------------------------------------------------------------------


def test_ensure_chat_template_adds_chatml_and_keeps_existing(tiny_tokenizer):
    assert not tiny_tokenizer.chat_template
    ensure_chat_template(tiny_tokenizer)
    text = tiny_tokenizer.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text == "<|im_start|>user\nhello wörld<|im_end|>\n<|im_start|>assistant\nthe quick fox<|im_end|>\n"
    tiny_tokenizer.chat_template = "{{ messages[0]['content'] }}"
    ensure_chat_template(tiny_tokenizer)
    assert tiny_tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_only_assistant_tokens_carry_loss(tiny_tokenizer):
    ensure_chat_template(tiny_tokenizer)
    ids, labels = tokenize_conversation(tiny_tokenizer, CHAT)
    full = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids)
    assert labelled_runs(tiny_tokenizer, ids, labels) == ["the quick fox<|im_end|>", " lazy dog\n<|im_end|>"]
    prompt_text = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    for text in ("be brief", "hello wörld", "again please", "<|im_start|>assistant\n"):
        assert text in prompt_text


def test_label_spans_takes_tokens_wholly_inside_a_span():
    ids = [10, 11, 12, 13, 14, 15, 16]
    offsets = [(0, 3), (3, 6), (6, 9), (9, 9), (9, 12), (12, 15), (15, 18)]
    # span [4, 12): token 1 straddles its start (not labelled), token 3 is zero-width inside it (labelled)
    assert label_spans(ids, offsets, [(4, 12), (15, 18)]) == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14, IGNORE_INDEX, 16]
    assert label_spans(ids, offsets, [(0, 10)]) == [10, 11, 12, 13, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_loss_mask_survives_trimmed_offsets(tiny_tokenizer):
    # tokenizers with a ByteLevel post-processor (trim_offsets=True) report offsets without the leading space
    from tokenizers import processors

    ensure_chat_template(tiny_tokenizer)
    expected = tokenize_conversation(tiny_tokenizer, CHAT)
    tiny_tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    assert tokenize_conversation(tiny_tokenizer, CHAT) == expected


def test_loss_on_all_and_plain_text(tiny_tokenizer):
    ensure_chat_template(tiny_tokenizer)
    ids, labels = tokenize_conversation(tiny_tokenizer, CHAT, loss_on="all")
    assert labels == ids and tiny_tokenizer.decode(ids).startswith("<|im_start|>system\nbe brief")
    ids, labels = tokenize_conversation(tiny_tokenizer, "hello world")
    assert labels == ids
    assert ids[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.decode(ids) == "hello world<|im_end|>"


def test_tokenize_prompt_is_the_conversation_up_to_the_reply(tiny_tokenizer):
    ensure_chat_template(tiny_tokenizer)
    prompt = tokenize_prompt(tiny_tokenizer, CHAT[:2])
    ids, labels = tokenize_conversation(tiny_tokenizer, CHAT[:3])
    assert tiny_tokenizer.decode(prompt).endswith("hello wörld<|im_end|>\n<|im_start|>assistant\n")
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] == ids[len(prompt)]


def test_template_that_is_not_prefix_stable_is_refused(tiny_tokenizer):
    # marks the last message, so a prefix renders differently from the start of the whole conversation
    tiny_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                                    "{% if loop.last %} [last]{% endif %}\n{% endfor %}")
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_conversation(tiny_tokenizer, CHAT[1:3])
    ids, labels = tokenize_conversation(tiny_tokenizer, CHAT[1:3], loss_on="all")  # no spans needed
    assert labels == ids


# --- formats -------------------------------------------------------------------------------------------------------

USER_ASSISTANT = [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("record, fmt, expected", [
    ({"messages": USER_ASSISTANT}, "messages", USER_ASSISTANT),
    ({"prompt": "add 2 and 3", "completion": "5"}, "prompt_completion", USER_ASSISTANT),
    ({"instruction": "add", "input": "2 and 3", "output": "5"}, "alpaca",
     [{"role": "user", "content": "add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
    ({"instruction": "add 2 and 3", "input": "", "output": "5"}, "alpaca", USER_ASSISTANT),
    ({"instruction": "add 2 and 3", "output": "5"}, "alpaca", USER_ASSISTANT),
    ({"text": "just text", "meta": 1}, "text", "just text"),
])
def test_formats_are_detected_and_converted(tmp_path, record, fmt, expected):
    (loaded,) = load_records(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert loaded.source == f"{tmp_path / 'd.jsonl'}:1"
    assert detect_format(loaded) == fmt
    assert to_conversation(loaded, fmt, None) == expected


def test_system_prompt_is_added_only_where_missing():
    system = {"role": "system", "content": "S"}
    assert to_conversation(Record("x:1", {"prompt": "p", "completion": "c"}), "prompt_completion", "S")[0] == system
    own = {"messages": [{"role": "system", "content": "own"}] + USER_ASSISTANT}
    assert to_conversation(Record("x:1", own), "messages", "S") == own["messages"]


def test_explicit_format_overrides_detection(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "text": "hello world"}])
    examples, report = build_examples(DataConfig(train=str(path)), tiny_tokenizer)
    assert report.format == "prompt_completion" and labelled_runs(tiny_tokenizer, examples[0].input_ids,
                                                                    examples[0].labels) == ["c<|im_end|>"]
    examples, report = build_examples(DataConfig(train=str(path), format="text"), tiny_tokenizer)
    assert report.format == "text" and tiny_tokenizer.decode(examples[0].input_ids) == "hello world<|im_end|>"


@pytest.mark.parametrize("data, fmt, message", [
    ({"prompt": "p"}, "prompt_completion", "x.jsonl:4: missing field 'completion'"),
    ({"instruction": "i", "output": 5}, "alpaca", "field 'output' must be text, got int"),
    ({"messages": "hi"}, "messages", "field 'messages' must be a list"),
    ({"messages": []}, "messages", "field 'messages' is empty"),
    ({"messages": [{"role": "user", "content": 3}, USER_ASSISTANT[1]]}, "messages", "content must be text"),
    ({"messages": [USER_ASSISTANT[0], USER_ASSISTANT[0], USER_ASSISTANT[1]]}, "messages",
     "message 1 is user where assistant was expected"),
    ({"messages": [USER_ASSISTANT[1], USER_ASSISTANT[0]]}, "messages", "message 0 is assistant where user"),
    ({"messages": USER_ASSISTANT + [{"role": "system", "content": "s"}]}, "messages", "message 2 is system"),
    ({"messages": [USER_ASSISTANT[0]]}, "messages", "no assistant message"),
    ({"messages": USER_ASSISTANT + [USER_ASSISTANT[0]]}, "messages", "must end with an assistant message"),
    ({"messages": USER_ASSISTANT + [{"role": "tool", "content": "{}"}]}, "messages", "tool use is not supported"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "role 'bot'"),
    ({"text": ""}, "text", "field 'text' is empty"),
    ({"text": "\ud800"}, "text", "lone UTF-16 surrogate"),
])
def test_bad_records_are_named(data, fmt, message):
    with pytest.raises(DataError) as e:
        to_conversation(Record("x.jsonl:4", data), fmt, None)
    assert message in str(e.value) and str(e.value).startswith("x.jsonl:4: ")


def test_unknown_format_lists_fields_and_formats(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        build_examples(DataConfig(train=str(path)), tiny_tokenizer)
    message = str(e.value)
    assert message.startswith(f"{path}:1: ") and "answer, question" in message
    assert all(name in message for name in ("messages", "prompt_completion", "alpaca", "text"))


# --- loading -------------------------------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n\n" + '{"prompt": "x" "completion": "y"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid JSON \(Expecting ',' delimiter at column 16\)"):
        load_records(path)


def test_utf8_bom_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    assert [r.data["text"] for r in load_records(path)] == ["a", "b"]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'[{"text": "a"}]')
    assert [r.data["text"] for r in load_records(tmp_path / "bom.json")] == ["a"]


def test_bad_bytes_and_shapes_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(chat("a", "b")).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_records(path)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: record is a list"):
        load_records(path)
    path.write_text('{"a": ' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: not valid JSON"):
        load_records(path)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "empty.jsonl: no records"),
    ("blank.jsonl", "\n  \n", "blank.jsonl: no records"),
    ("empty.json", "[]", "empty.json: no records"),
    ("data.txt", "hello", "unsupported file type '.txt' (supported: .jsonl, .json, .parquet, .csv)"),
    ("scalar.json", "3", "expected a list of records"),
    ("broken.json", '[\n{"text": "a"},\n{"text": }\n]', "broken.json:3: not valid JSON"),
])
def test_file_level_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_records(tmp_path / name)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="folder has no data files"):
        load_records(tmp_path)


def test_json_files_give_record_lines(tmp_path):
    records = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 2, "data": records}, indent=1))
    (tmp_path / "one.json").write_text(json.dumps({"messages": USER_ASSISTANT}))
    assert [(r.source.rsplit(":", 1)[1], r.data) for r in load_records(tmp_path / "list.json")] == \
        [("2", records[0]), ("5", records[1])]
    assert [r.source.rsplit(":", 1)[1] for r in load_records(tmp_path / "wrapped.json")] == ["4", "7"]
    assert [r.data for r in load_records(tmp_path / "one.json")] == [{"messages": USER_ASSISTANT}]


def test_folder_reads_every_data_file_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a1"}]))
    (tmp_path / "notes.md").write_text("ignored")
    assert [r.data["text"] for r in load_records(tmp_path)] == ["a1", "b1", "b2"]


def test_parquet_and_csv(tmp_path, tiny_tokenizer):
    import pandas as pd

    pd.DataFrame({"prompt": ["what is 2+3", "hi"], "completion": ["5", "hello"]}).to_parquet(tmp_path / "d.parquet")
    records = load_records(tmp_path / "d.parquet")
    assert [(r.source, r.data) for r in records] == [
        (f"{tmp_path / 'd.parquet'}:row 0", {"prompt": "what is 2+3", "completion": "5"}),
        (f"{tmp_path / 'd.parquet'}:row 1", {"prompt": "hi", "completion": "hello"})]
    pd.DataFrame({"messages": [USER_ASSISTANT]}).to_parquet(tmp_path / "m.parquet")
    assert load_records(tmp_path / "m.parquet")[0].data == {"messages": USER_ASSISTANT}

    # numbers stay text and empty cells stay empty strings, so CSV records validate like JSON ones
    (tmp_path / "d.csv").write_text('instruction,input,output\n"add, then say",2 and 3,5\nsay hi,,NA\n')
    records = load_records(tmp_path / "d.csv")
    assert [r.source for r in records] == [f"{tmp_path / 'd.csv'}:2", f"{tmp_path / 'd.csv'}:3"]
    assert records[0].data == {"instruction": "add, then say", "input": "2 and 3", "output": "5"}
    assert records[1].data == {"instruction": "say hi", "input": "", "output": "NA"}
    examples, report = build_examples(DataConfig(train=str(tmp_path / "d.csv")), tiny_tokenizer)
    assert report.format == "alpaca" and len(examples) == 2
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: cannot read as parquet"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "ragged.csv").write_text("prompt,completion\na,b\nc,d,e,f\n")
    with pytest.raises(DataError, match="ragged.csv: cannot read as csv .*Expected 2 fields in line 3, saw 4"):
        load_records(tmp_path / "ragged.csv")


# --- building ------------------------------------------------------------------------------------------------------


def test_skip_bad_examples_counts_skips(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    good = [json.dumps(chat(f"q{i}", f"a{i}")) for i in range(5)]
    lines = good[:2] + ["{oops", "[1]", json.dumps({"messages": [USER_ASSISTANT[1]]})] + good[2:]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="train.jsonl:3: not valid JSON"):
        build_examples(DataConfig(train=str(path)), tiny_tokenizer)
    examples, report = build_examples(DataConfig(train=str(path), skip_bad_examples=True), tiny_tokenizer)
    assert (report.records, report.examples, report.skipped_bad) == (8, 5, 3)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2", "6", "7", "8"]
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in report.skipped_sources] == ["3", "4", "5"]


def test_overlong_truncate_or_drop(tmp_path, tiny_tokenizer):
    ensure_chat_template(tiny_tokenizer)
    answers = ["ok", "the quick brown fox jumps over the lazy dog " * 3, "fine"]
    path = write_jsonl(tmp_path / "d.jsonl", [chat("hi", a) for a in answers] + [chat("hello world " * 20, "late")])
    lengths = [len(tokenize_conversation(tiny_tokenizer, to_conversation(r, "messages"))[0])
               for r in load_records(path)]
    max_length = 24
    assert lengths[0] <= max_length and lengths[2] <= max_length and lengths[1] > max_length
    assert lengths[3] > max_length

    examples, report = build_examples(DataConfig(train=str(path), max_length=max_length), tiny_tokenizer)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2", "3"]
    assert len(examples[1]) == max_length and examples[1].num_targets > 0
    # record 4's answer lies past max_length: truncation leaves nothing to learn
    assert (report.truncated, report.dropped_overlong, report.no_target_tokens, report.examples) == (2, 0, 1, 3)

    examples, report = build_examples(DataConfig(train=str(path), max_length=max_length, overlong="drop"),
                                      tiny_tokenizer)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "3"]
    assert (report.truncated, report.dropped_overlong, report.no_target_tokens, report.examples) == (0, 2, 0, 2)
    assert report.records == report.examples + report.dropped_overlong + report.no_target_tokens + report.skipped_bad


def test_val_split_is_deterministic_and_disjoint(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(40)])
    cfg = DataConfig(train=str(path), val_ratio=0.25)
    train, val, train_report, val_report = build_datasets(cfg, tiny_tokenizer, seed=3)
    again = build_datasets(cfg, tiny_tokenizer, seed=3)
    other = build_datasets(cfg, tiny_tokenizer, seed=4)
    assert (len(train), len(val)) == (30, 10)
    assert sources(again[0]) == sources(train) and sources(again[1]) == sources(val)
    assert sources(other[1]) != sources(val)
    assert not set(sources(train)) & set(sources(val)) and len(set(sources(train + val))) == 40
    assert (train_report.examples, train_report.records, val_report.examples) == (30, 30, 10)

    val_path = write_jsonl(tmp_path / "v.jsonl", [chat("held", "out")])
    train, val, _, val_report = build_datasets(DataConfig(train=str(path), val=str(val_path)), tiny_tokenizer, 0)
    assert (len(train), len(val), val_report.format) == (40, 1, "messages")
    train, val, _, _ = build_datasets(DataConfig(train=str(path)), tiny_tokenizer, 0)
    assert (len(train), val) == (40, [])


def test_empty_result_names_the_file(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("hello world " * 20, "x")])
    with pytest.raises(DataError, match=r"d\.jsonl: no usable examples .*1 longer than max_length 8"):
        build_examples(DataConfig(train=str(path), max_length=8, overlong="drop"), tiny_tokenizer)


# --- fuzz: bad input is a DataError, never a traceback ---------------------------------------------------------------

words = st.text(max_size=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | words,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
                           max_leaves=8)
turns = st.lists(st.tuples(words, words), min_size=1, max_size=3).map(
    lambda pairs: [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))])
good_records = st.one_of(
    st.fixed_dictionaries({"messages": turns}),
    st.fixed_dictionaries({"prompt": words, "completion": words}),
    st.fixed_dictionaries({"instruction": words, "output": words}, optional={"input": words | st.none()}),
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}))
messy_records = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant", "tool", 1]), "content": words | json_values}),
        max_size=4) | json_values}),
    st.fixed_dictionaries({"prompt": words | json_values, "completion": words}),
    st.fixed_dictionaries({"instruction": words, "output": json_values}),
    st.fixed_dictionaries({"text": json_values}),
    json_values)
dump = lambda record: json.dumps(record).encode()
# mostly good records, so the fuzz also reaches tokenization, truncation and the report, not only the parser
lines = st.one_of(good_records.map(dump), good_records.map(dump), messy_records.map(dump), st.binary(max_size=30),
                  st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, max_size=6), st.booleans(), st.sampled_from([8, 40]))
def test_fuzz_bad_input_is_a_data_error(tmp_path, tiny_tokenizer, contents, skip_bad, max_length):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(contents))
    cfg = DataConfig(train=str(path), skip_bad_examples=skip_bad, max_length=max_length)
    try:
        examples, report = build_examples(cfg, tiny_tokenizer)
    except DataError:
        return
    assert examples and report.examples == len(examples)
    assert report.records == report.examples + report.dropped_overlong + report.no_target_tokens + report.skipped_bad
    assert all(len(e) <= max_length and len(e.labels) == len(e) for e in examples)
