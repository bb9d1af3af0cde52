"""The synthetic tasks: deterministic, well-formed answers, and test sets disjoint from train."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.data.tasks import intents, load_task, medication, split_without_overlap, user_text
from lorafit.eval.metrics import json_example_score


def roles(record):
    return [m["role"] for m in record["messages"]]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", [medication, intents])
def test_generate_is_deterministic_for_a_seed(task):
    assert task.generate(30, seed=3) == task.generate(30, seed=3)
    assert task.generate(30, seed=3) != task.generate(30, seed=4)
    assert len(task.generate(7, seed=0)) == 7


def test_medication_records_are_well_formed():
    for record in medication.generate(300, seed=1):
        assert roles(record) == ["system", "user", "assistant"]
        system, note, answer = (m["content"] for m in record["messages"])
        assert system == "Extract medication information from clinical notes. Return valid JSON only."
        parsed = json.loads(answer)
        assert answer == json.dumps(parsed)  # compact default separators, nothing around it
        assert list(parsed) == ["medications"]
        assert 1 <= len(parsed["medications"]) <= 3
        for med in parsed["medications"]:
            assert list(med) == ["name", "dose", "route", "frequency"]
            assert med["name"] == med["name"].lower()
            assert med["name"] in note.lower() and med["dose"].lower() in note.lower()
            assert med["route"] in medication.ROUTES
            assert med["frequency"] in medication.FREQUENCIES
        assert len(note.split()) <= medication.MAX_WORDS


def test_medication_notes_vary():
    notes = [user_text(r) for r in medication.generate(500, seed=0)]
    assert len(set(notes)) == len(notes)
    assert any(n[0].isupper() and n.split()[0].lower() in {d.name for d in medication.DRUGS} for n in notes)
    assert sum("BID" in n for n in notes) and sum("twice a day" in n for n in notes)  # several writings per value


def test_drug_table_is_consistent():
    assert len({d.name for d in medication.DRUGS}) == len(medication.DRUGS) >= 40
    for drug in medication.DRUGS:
        assert set(drug.routes) <= set(medication.ROUTES), drug.name
        assert set(drug.frequencies) <= set(medication.FREQUENCIES), drug.name
        assert drug.doses, drug.name


def test_medication_answers_score_perfectly_against_themselves():
    for record in medication.generate(50, seed=2):
        answer = record["messages"][2]["content"]
        assert json_example_score(answer, answer)["fp"] == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_medication_order_in_the_answer_does_not_change_the_score(seed):
    answer = medication.generate(1, seed)[0]["messages"][2]["content"]
    meds = json.loads(answer)["medications"]
    random.Random(seed).shuffle(meds)
    shuffled = json.dumps({"medications": meds})
    assert json_example_score(shuffled, answer) == {"valid": True, "tp": 4 * len(meds), "fp": 0, "fn": 0}


def test_medication_files_have_no_test_note_in_train(tmp_path):
    train_path, test_path = medication.write_demo_files(tmp_path, n_train=150, n_test=40, seed=5)
    assert (train_path.name, test_path.name) == ("medication_train.jsonl", "medication_test.jsonl")
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    assert (len(train), len(test)) == (150, 40)
    train_notes = {user_text(r) for r in train}
    test_notes = [user_text(r) for r in test]
    assert not train_notes & set(test_notes) and len(set(test_notes)) == len(test_notes)
    assert train == medication.generate(150, 5)


def test_intent_records():
    records = intents.generate(200, seed=0)
    labels = [r["messages"][2]["content"] for r in records]
    assert set(labels) == set(intents.LABELS) and len(intents.LABELS) == 10
    assert all(labels.count(label) == 20 for label in intents.LABELS)  # balanced
    system = records[0]["messages"][0]["content"]
    assert system.startswith("Classify the customer message into one intent. Answer with the intent label only.")
    assert all(label in system for label in intents.LABELS)
    assert all(roles(r) == ["system", "user", "assistant"] and user_text(r) for r in records)


def test_intent_files_have_no_test_message_in_train(tmp_path):
    train_path, test_path = intents.write_task_files(tmp_path, n_train=300, n_test=100, seed=0)
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    assert (len(train), len(test)) == (300, 100)
    assert not {user_text(r) for r in train} & {user_text(r) for r in test}
    assert {r["messages"][2]["content"] for r in test} == set(intents.LABELS)


def test_split_gives_up_when_the_generator_cannot_vary():
    def same_every_time(n, seed):
        return [{"messages": [{"role": "user", "content": "hi"}]}] * n

    with pytest.raises(ValueError, match="found only 0 of 3"):
        split_without_overlap(same_every_time, 2, 3, seed=0)


def test_load_task():
    assert load_task("medication") is medication and load_task("intents") is intents
    with pytest.raises(ValueError, match="unknown task"):
        load_task("summaries")
