"""Metrics on hand-computed cases: every expected number below is worked out in the comment beside it."""

import json
import sys

import pytest

from lorafit.errors import LorafitError
from lorafit.eval.metrics import (
    METRICS,
    MissingPackageError,
    _best_pairs,
    bleu,
    classification_scores,
    exact_match,
    json_example_score,
    json_field_scores,
    load_user_metric,
    parse_json_answer,
    resolve_metric,
    rouge_l,
)


def med(name, dose, route, frequency):
    return {"name": name, "dose": dose, "route": route, "frequency": frequency}


LISINOPRIL = med("lisinopril", "10 mg", "oral", "once daily")
METFORMIN = med("metformin", "500 mg", "oral", "twice daily")
HEPARIN = med("heparin", "5000 units", "subcutaneous", "every 8 hours")
REF = json.dumps({"medications": [LISINOPRIL, METFORMIN, HEPARIN]})  # 12 leaves


def answer(*meds):
    return json.dumps({"medications": list(meds)})


def test_perfect_match():
    assert json_example_score(REF, REF) == {"valid": True, "tp": 12, "fp": 0, "fn": 0}
    scores = json_field_scores([REF], [REF])
    keys = ("json_valid_rate", "json_precision", "json_recall", "json_f1")
    assert tuple(scores[k] for k in keys) == (1, 1, 1, 1)


def test_partial_match_two_of_three_meds_one_field_wrong():
    # lisinopril right (4 tp); metformin with the wrong frequency (3 tp, 1 fp, 1 fn); heparin missing (4 fn).
    pred = answer(LISINOPRIL, {**METFORMIN, "frequency": "once daily"})
    assert json_example_score(pred, REF) == {"valid": True, "tp": 7, "fp": 1, "fn": 5}
    scores = json_field_scores([pred], [REF])
    assert scores["json_precision"] == pytest.approx(7 / 8)
    assert scores["json_recall"] == pytest.approx(7 / 12)
    assert scores["json_f1"] == pytest.approx(0.7)  # 2*7 / (2*7 + 1 + 5)
    # Per field: frequency has tp 1, fp 1, fn 2 -> F1 = 2 / (2 + 1 + 2); the other fields tp 2, fn 1 -> 0.8.
    assert scores["json_field_f1"] == pytest.approx({"medications[].name": 0.8, "medications[].dose": 0.8,
                                                     "medications[].route": 0.8, "medications[].frequency": 0.4})


def test_missing_and_extra_fields():
    ref = json.dumps({"name": "a", "dose": "1 mg"})
    pred = json.dumps({"name": "a", "route": "oral"})  # dose missing (fn), route extra (fp)
    assert json_example_score(pred, ref) == {"valid": True, "tp": 1, "fp": 1, "fn": 1}


def test_extra_medication_counts_its_leaves_as_false_positives():
    pred = answer(LISINOPRIL, METFORMIN, HEPARIN, med("aspirin", "81 mg", "oral", "once daily"))
    assert json_example_score(pred, REF) == {"valid": True, "tp": 12, "fp": 4, "fn": 0}


def test_list_order_does_not_matter():
    assert json_example_score(answer(HEPARIN, LISINOPRIL, METFORMIN), REF)["tp"] == 12
    assert json_field_scores([answer(METFORMIN, HEPARIN, LISINOPRIL)], [REF])["json_f1"] == 1.0


def test_items_are_paired_to_maximise_agreeing_leaves():
    # Greedy would pair p0-r0 (3 agree) and then p1-r1 (0): 3. The best pairing is p0-r1 + p1-r0 = 2 + 2 = 4.
    r0, r1 = dict.fromkeys("abcde", 0), dict.fromkeys("abcde", 1)
    p0 = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1}
    p1 = {"a": 0, "b": 0, "c": 2, "d": 2, "e": 2}
    assert json_example_score(json.dumps([p0, p1]), json.dumps([r0, r1])) == {"valid": True, "tp": 4, "fp": 6, "fn": 6}
    assert sorted(_best_pairs([[3, 2], [2, 0]])) == [(0, 1), (1, 0)]
    assert sorted(_best_pairs([[1, 5, 0]])) == [(0, 1)]  # more reference items than predicted
    assert sorted(_best_pairs([[1], [5], [0]])) == [(1, 0)]


def test_long_lists_are_still_matched_regardless_of_order():
    items = [{"id": i, "name": f"item {i}"} for i in range(9)]  # past the exact search: greedy (or scipy)
    assert json_example_score(json.dumps(items[::-1]), json.dumps(items))["tp"] == 18


def test_invalid_and_empty_predictions():
    assert json_example_score('{"medications": [', REF) == {"valid": False, "tp": 0, "fp": 0, "fn": 12}
    assert json_example_score("", REF) == {"valid": False, "tp": 0, "fp": 0, "fn": 12}
    assert json_example_score(REF + " Hope this helps!", REF)["valid"] is False  # only JSON was asked for
    scores = json_field_scores([REF, "not json"], [REF, REF])
    assert scores["json_valid_rate"] == 0.5
    assert scores["json_precision"] == 1.0 and scores["json_recall"] == 0.5


def test_fences_and_whitespace_are_accepted():
    assert json_example_score(f"\n```json\n{REF}\n```\n", REF)["tp"] == 12
    assert json_example_score(f"```\n{REF}```", REF)["tp"] == 12
    assert json_example_score(f"  {REF}\n", REF)["tp"] == 12
    assert parse_json_answer("[1, 2]") == (True, [1, 2])


def test_nested_objects():
    ref = json.dumps({"patient": {"name": "Ann Lee", "address": {"city": "Paris", "zip": "75001"}}})
    pred = json.dumps({"patient": {"name": " ann  lee", "address": {"city": "Lyon", "zip": "75001"}}})
    # name agrees after strip/casefold/whitespace, zip agrees, city differs: tp 2, fp 1, fn 1.
    assert json_example_score(pred, ref) == {"valid": True, "tp": 2, "fp": 1, "fn": 1}
    assert json_field_scores([pred], [ref])["json_field_f1"] == {
        "patient.name": 1.0, "patient.address.city": 0.0, "patient.address.zip": 1.0}


def test_scalar_lists_are_multisets():
    ref = json.dumps({"tags": ["a", "b", "b", "c"]})
    pred = json.dumps({"tags": ["B", "a", "d"]})  # a and one b agree; d is extra; the second b and c are missing
    assert json_example_score(pred, ref) == {"valid": True, "tp": 2, "fp": 1, "fn": 2}


def test_values_are_compared_lightly_normalised():
    assert json_example_score('{"x": 1}', '{"x": 1.0}')["tp"] == 1  # numbers by value
    assert json_example_score('{"x": "1"}', '{"x": 1}')["tp"] == 0  # a string is not a number
    assert json_example_score('{"x": true}', '{"x": 1}')["tp"] == 0  # nor is a boolean
    assert json_example_score('{"x": null}', '{"x": null}')["tp"] == 1


def test_shape_mismatch_and_empty_containers():
    ref = answer(LISINOPRIL)
    assert json_example_score('{"medications": "none"}', ref) == {"valid": True, "tp": 0, "fp": 1, "fn": 4}
    # An empty list is one leaf ("there are none"): right when the reference is empty, wrong otherwise.
    expected = {"valid": True, "tp": 1, "fp": 0, "fn": 0}
    assert json_example_score('{"medications": []}', '{"medications": []}') == expected
    assert json_example_score('{"medications": []}', ref) == {"valid": True, "tp": 0, "fp": 1, "fn": 4}


def test_invalid_reference_is_an_error():
    with pytest.raises(ValueError, match="reference is not valid JSON"):
        json_example_score(REF, "{oops")
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        json_field_scores([REF], [REF, REF])


def test_exact_match():
    assert exact_match(["Hello  World ", "x"], ["hello world", "y"]) == {"exact_match": 0.5}
    assert exact_match(["Hello  World ", "x"], ["hello world", "y"], normalize=False) == {"exact_match": 0.0}
    assert exact_match([], []) == {"exact_match": 0.0}


def test_classification_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", " A\n", "b", "b", "a", "zzz"]  # " A\n" is label a; "zzz" is no label -> "<other>"
    scores = classification_scores(pred, gold, labels=["a", "b", "c", "d"])
    assert scores["confusion"] == {
        "a": {"a": 2, "b": 1, "c": 0, "d": 0, "<other>": 0},
        "b": {"a": 1, "b": 1, "c": 0, "d": 0, "<other>": 0},
        "c": {"a": 0, "b": 0, "c": 0, "d": 0, "<other>": 1},
        "d": {"a": 0, "b": 0, "c": 0, "d": 0, "<other>": 0},
    }
    assert scores["accuracy"] == 0.5
    # a: P = R = 2/3; b: P = R = 1/2; c: 0; d: no gold and never predicted -> None, left out of the macro mean.
    assert scores["per_label"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0, "d": None})
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert scores["most_confused"] == [("a", "b", 1), ("b", "a", 1), ("c", "<other>", 1)]


def test_classification_labels_default_to_references():
    scores = classification_scores(["x", "y", "x"], ["x", "y", "y"])
    assert list(scores["per_label"]) == ["x", "y"]
    assert scores["most_confused"] == [("y", "x", 1)]
    with pytest.raises(ValueError, match="missing from `labels`"):
        classification_scores(["x"], ["q"], labels=["x"])


def test_rouge_and_bleu_when_installed():
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    assert rouge_l(["the cat sat"], ["the cat sat"])["rouge_l"] == pytest.approx(1.0)
    assert 0 < rouge_l(["the cat sat"], ["the cat sat down"])["rouge_l"] < 1
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)


def test_missing_optional_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` raise ImportError
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(MissingPackageError, match="pip install sacrebleu"):
        bleu(["a"], ["a"])
    with pytest.raises(MissingPackageError, match="pip install rouge-score"):
        rouge_l(["a"], ["a"])


def test_registry_and_user_metrics(tmp_path):
    assert set(METRICS) == {"json", "exact_match", "classification", "rouge", "bleu"}
    assert resolve_metric("json") is json_field_scores
    assert load_user_metric("json:dumps") is json.dumps
    metric_file = tmp_path / "my_metrics.py"
    metric_file.write_text("def length_ratio(predictions, references):\n    return {'ratio': 1.0}\n")
    assert load_user_metric(f"{metric_file}:length_ratio")(["a"], ["b"]) == {"ratio": 1.0}
    assert resolve_metric(f"{metric_file}:length_ratio")([], []) == {"ratio": 1.0}


@pytest.mark.parametrize(("spec", "message"), [
    ("json", "expected 'module:function'"),
    ("no_such_module_xyz:score", "cannot import module"),
    ("json:no_such_function", "has no attribute"),
    ("json:__doc__", "is not a function"),
    ("missing_file.py:score", "not found"),
])
def test_user_metric_errors(spec, message):
    with pytest.raises(LorafitError, match=message):
        load_user_metric(spec)


def test_unknown_metric_name():
    with pytest.raises(LorafitError, match="unknown metric 'blue'"):
        resolve_metric("blue")
