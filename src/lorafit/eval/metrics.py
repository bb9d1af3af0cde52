"""Evaluation metrics: plain functions from (predictions, references) to a dict, pure Python, schema-agnostic.

`METRICS` maps a metric's name to its function; `load_user_metric("module:function")` brings in one of the
user's own with the same signature. ROUGE and BLEU use the standard packages (rouge-score, sacrebleu), imported
only when asked for, so that the scores match published numbers and neither is a hard dependency.

JSON scoring, in one paragraph: both texts are parsed, flattened into leaves (a scalar, or an empty list/object)
with paths like `medications[].name`, and leaves are counted as true positives (same path, equal value), false
positives (in the prediction only) and false negatives (in the reference only). Objects are compared key by key;
lists of objects are matched item to item regardless of order, pairing items so that the most leaves agree;
lists of scalars are matched as multisets. Micro precision/recall/F1 sum the counts over all examples.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

OTHER = "<other>"  # confusion-matrix column for predictions that are not one of the labels


class MissingPackageError(LorafitError, ImportError):
    """An optional package a metric needs is not installed; the message names the pip package."""


# --- JSON field scores -------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """(True, value) if `text` is one JSON value once surrounding whitespace and a ```json fence are removed.

    Text before or after the value makes the answer invalid: a model asked for "valid JSON only" that adds a
    sentence has not done what was asked, and guessing where the JSON starts would hide that from the score.
    """
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return True, json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return False, None


def json_leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Flatten `value` into (path, leaf) pairs; a leaf is a scalar or an empty list/object."""
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in json_leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list) and value:
        return [leaf for item in value for leaf in json_leaves(item, f"{path}[]")]
    return [(path, value)]


def json_example_score(pred: str, ref: str) -> dict:
    """Leaf counts for one example: {"valid": bool, "tp": int, "fp": int, "fn": int}.

    An unparseable prediction scores tp = fp = 0 and fn = every reference leaf. The reference must parse.
    """
    valid, by_path = _json_tally(pred, ref)
    totals = _totals(by_path)
    return {"valid": valid, "tp": totals["tp"], "fp": totals["fp"], "fn": totals["fn"]}


def json_field_scores(predictions: list[str], references: list[str]) -> dict:
    """json_valid_rate, and micro json_precision / json_recall / json_f1 over all leaves of all examples.

    `json_field_f1` breaks F1 down by leaf path (e.g. `medications[].route`), to show which field a model gets
    wrong. An example whose prediction and reference are both `{}` counts one agreeing leaf.
    """
    _check_lengths(predictions, references)
    by_path: Counter = Counter()
    valid = 0
    for pred, ref in zip(predictions, references):
        example_valid, example_by_path = _json_tally(pred, ref)
        valid += example_valid
        by_path.update(example_by_path)
    totals = _totals(by_path)
    precision, recall, f1 = _prf(totals["tp"], totals["fp"], totals["fn"])
    paths = dict.fromkeys(path for path, _ in by_path)  # first-seen order: the reference's own field order
    return {
        "json_valid_rate": valid / len(predictions) if predictions else 0.0,
        "json_precision": precision,
        "json_recall": recall,
        "json_f1": f1,
        "json_field_f1": {p: _prf(by_path[p, "tp"], by_path[p, "fp"], by_path[p, "fn"])[2] for p in paths},
    }


def _json_tally(pred: str, ref: str) -> tuple[bool, Counter]:
    """Whether `pred` parsed, and a Counter of (leaf path, "tp" | "fp" | "fn") -> count."""
    ref_ok, ref_value = parse_json_answer(ref)
    if not ref_ok:
        raise ValueError(f"reference is not valid JSON: {ref[:80]!r}")
    pred_ok, pred_value = parse_json_answer(pred)
    by_path: Counter = Counter()
    if pred_ok:
        _compare(pred_value, ref_value, "", by_path)
    else:
        _count_all(ref_value, "", "fn", by_path)
    return pred_ok, by_path


def _totals(by_path: Counter) -> Counter:
    totals: Counter = Counter(dict.fromkeys(("tp", "fp", "fn"), 0))
    for (_, kind), n in by_path.items():
        totals[kind] += n
    return totals


def _compare(pred: Any, ref: Any, path: str, tally: Counter) -> None:
    """Add (path, "tp"/"fp"/"fn") counts for `pred` against `ref` to `tally`."""
    if isinstance(pred, dict) and isinstance(ref, dict) and pred and ref:
        for key in dict.fromkeys([*ref, *pred]):  # reference order first, so reports list paths as the schema does
            sub = f"{path}.{key}" if path else key
            if key in pred and key in ref:
                _compare(pred[key], ref[key], sub, tally)
            elif key in pred:
                _count_all(pred[key], sub, "fp", tally)
            else:
                _count_all(ref[key], sub, "fn", tally)
    elif isinstance(pred, list) and isinstance(ref, list) and pred and ref:
        _compare_lists(pred, ref, f"{path}[]", tally)
    elif _is_leaf(pred) and _is_leaf(ref) and _same_scalar(pred, ref):
        tally[(path, "tp")] += 1
    else:  # different shapes or different values: nothing in common at this path
        _count_all(pred, path, "fp", tally)
        _count_all(ref, path, "fn", tally)


def _compare_lists(pred: list, ref: list, path: str, tally: Counter) -> None:
    pred_scalars = Counter(_scalar_key(v) for v in pred if _is_leaf(v))
    ref_scalars = Counter(_scalar_key(v) for v in ref if _is_leaf(v))
    if pred_scalars or ref_scalars:
        common = sum((pred_scalars & ref_scalars).values())
        tally[(path, "tp")] += common
        tally[(path, "fp")] += sum(pred_scalars.values()) - common
        tally[(path, "fn")] += sum(ref_scalars.values()) - common

    pred_items = [v for v in pred if not _is_leaf(v)]
    ref_items = [v for v in ref if not _is_leaf(v)]
    pair_tallies = {}
    for i, p in enumerate(pred_items):
        for j, r in enumerate(ref_items):
            pair_tallies[i, j] = Counter()
            _compare(p, r, path, pair_tallies[i, j])
    agree = [[_true_positives(pair_tallies[i, j]) for j in range(len(ref_items))] for i in range(len(pred_items))]
    pairs = _best_pairs(agree)
    for i, j in pairs:
        tally.update(pair_tallies[i, j])
    for i in set(range(len(pred_items))) - {i for i, _ in pairs}:
        _count_all(pred_items[i], path, "fp", tally)
    for j in set(range(len(ref_items))) - {j for _, j in pairs}:
        _count_all(ref_items[j], path, "fn", tally)


def _best_pairs(agree: list[list[int]]) -> list[tuple[int, int]]:
    """Pairs (row, col) that maximise the summed agreement; every item of the shorter side is paired.

    scipy's Hungarian solver when it is installed; otherwise an exact search when the shorter side has at most
    7 items (7! = 5,040 orderings, well under a millisecond per example of ours, which have 1-3), else greedy.
    """
    rows, cols = len(agree), len(agree[0]) if agree else 0
    if not rows or not cols:
        return []
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        pass
    else:
        row_ind, col_ind = linear_sum_assignment(agree, maximize=True)
        return list(zip(row_ind.tolist(), col_ind.tolist()))
    if min(rows, cols) <= 7:
        if rows <= cols:
            best = max(itertools.permutations(range(cols), rows),
                       key=lambda p: sum(agree[i][p[i]] for i in range(rows)))
            return list(enumerate(best))
        best = max(itertools.permutations(range(rows), cols), key=lambda p: sum(agree[p[j]][j] for j in range(cols)))
        return [(i, j) for j, i in enumerate(best)]
    cells = sorted(((agree[i][j], i, j) for i in range(rows) for j in range(cols)), key=lambda c: -c[0])
    pairs: list[tuple[int, int]] = []
    for _, i, j in cells:
        if all(i != a and j != b for a, b in pairs):
            pairs.append((i, j))
    return pairs


def _count_all(value: Any, path: str, kind: str, tally: Counter) -> None:
    for leaf_path, _ in json_leaves(value, path):
        tally[(leaf_path, kind)] += 1


def _true_positives(by_path: Counter) -> int:
    return sum(n for (_, kind), n in by_path.items() if kind == "tp")


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, (dict, list)) or not value


def _scalar_key(value: Any) -> tuple:
    """A hashable key under which equal leaves (after light normalisation) coincide."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, (int, float)):
        # By value, so 1 and 1.0 agree; NaN gets its own key, as no two NaNs are "the same answer" by ==.
        return ("number", float(value)) if not math.isnan(value) else ("nan", id(value))
    if isinstance(value, str):
        return ("string", " ".join(value.split()).casefold())
    return ("empty", type(value).__name__)  # [] or {}


def _same_scalar(a: Any, b: Any) -> bool:
    return _scalar_key(a) == _scalar_key(b)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# --- Exact match and classification ------------------------------------------------------------------------------


def _normalize_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_match(predictions: list[str], references: list[str], normalize: bool = True) -> dict:
    """Fraction of predictions equal to their reference; `normalize` ignores case and runs of whitespace."""
    _check_lengths(predictions, references)
    clean = _normalize_text if normalize else (lambda s: s)
    hits = sum(clean(p) == clean(r) for p, r in zip(predictions, references))
    return {"exact_match": hits / len(predictions) if predictions else 0.0}


def classification_scores(predictions: list[str], references: list[str], labels: list[str] | None = None,
                          top_confused: int = 10) -> dict:
    """accuracy, macro_f1, per_label f1, confusion (gold -> predicted -> count) and most_confused pairs.

    Predictions are stripped and matched to a label ignoring case; anything else lands in the "<other>" column.
    `labels` defaults to the labels seen in the references. A label with no gold examples and no predictions
    has no defined F1: it is reported as None and left out of macro_f1, rather than counted as 0, so a test set
    that happens to lack a label does not lower the score.
    """
    _check_lengths(predictions, references)
    gold = [r.strip() for r in references]
    labels = list(labels) if labels is not None else sorted(set(gold))
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise ValueError(f"references hold labels missing from `labels`: {unknown[:5]}")
    by_casefold = {label.casefold(): label for label in labels}
    predicted = [by_casefold.get(p.strip().casefold(), OTHER) for p in predictions]

    confusion = {g: dict.fromkeys([*labels, OTHER], 0) for g in labels}
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_label = {}
    for label in labels:
        tp = confusion[label][label]
        support = sum(confusion[label].values())
        predicted_as = sum(row[label] for row in confusion.values())
        per_label[label] = _prf(tp, predicted_as - tp, support - tp)[2] if support or predicted_as else None
    defined = [f1 for f1 in per_label.values() if f1 is not None]
    confused = [(g, p, n) for g, row in confusion.items() for p, n in row.items() if g != p and n]
    confused.sort(key=lambda c: (-c[2], c[0], c[1]))
    return {
        "accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else 0.0,
        "macro_f1": sum(defined) / len(defined) if defined else 0.0,
        "per_label": per_label,
        "confusion": confusion,
        "most_confused": confused[:top_confused],
    }


# --- Text overlap (optional packages) ----------------------------------------------------------------------------


def _import_optional(module: str, package: str, metric: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(f"the {metric} metric needs the {package!r} package: pip install {package}") from err


def rouge_l(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-L F-measure (rouge-score, with its Porter stemmer, as most papers report it)."""
    _check_lengths(predictions, references)
    rouge_scorer = _import_optional("rouge_score.rouge_scorer", "rouge-score", "rouge")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"rouge_l": sum(scores) / len(scores) if scores else 0.0}


def bleu(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu defaults, 0-100), one reference per prediction."""
    _check_lengths(predictions, references)
    sacrebleu = _import_optional("sacrebleu", "sacrebleu", "bleu")
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


# --- Registry and user metrics -----------------------------------------------------------------------------------

METRICS: dict[str, Callable[[list[str], list[str]], dict]] = {
    "json": json_field_scores,
    "exact_match": exact_match,
    "classification": classification_scores,
    "rouge": rouge_l,
    "bleu": bleu,
}


def load_user_metric(spec: str) -> Callable[[list[str], list[str]], dict]:
    """The function named by "package.module:function" (or "path/to/file.py:function"), checked to be callable."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise LorafitError(f"metric {spec!r}: expected 'module:function', e.g. 'my_metrics:score'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise LorafitError(f"metric {spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise LorafitError(f"metric {spec!r}: cannot import module {module_name!r} ({err})") from err
    function = getattr(module, function_name, None)
    if function is None:
        raise LorafitError(f"metric {spec!r}: module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise LorafitError(f"metric {spec!r}: {function_name!r} is not a function")
    return function


def resolve_metric(name: str) -> Callable[[list[str], list[str]], dict]:
    """A metric from `METRICS` by name, or the user's own when the name holds a colon ("module:function")."""
    if ":" in name:
        return load_user_metric(name)
    if name not in METRICS:
        raise LorafitError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)} or give 'module:function'")
    return METRICS[name]


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
