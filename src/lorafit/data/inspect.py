"""What a data file holds, as training will see it: lengths against max_length, what gets cut or dropped,
duplicates, label and role balance (`data_stats`), and examples with their loss tokens marked (`preview_examples`).

Both go through the trainer's own path (`load_records` -> `records_to_examples` -> `tokenize_conversation`), so the
counts and the marked tokens are the ones training uses, not a re-implementation that could drift from it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.config import DataConfig
from lorafit.data.build import records_to_examples
from lorafit.data.example import IGNORE_INDEX, DataReport, Example
from lorafit.data.formats import to_conversation
from lorafit.data.load import load_records
from lorafit.data.tokenize import ensure_chat_template
from lorafit.errors import ModelError

NEAR_DUPLICATE_METHOD = ("MinHash over word 3-gram shingles of the lower-cased user and assistant text (system "
                         "messages ignored), candidates confirmed by exact Jaccard similarity >= {threshold}")
MINHASH_BANDS, MINHASH_ROWS = 16, 8  # 128 hashes; a pair at Jaccard 0.9 becomes a candidate with p = 0.9999
MAX_LABELS = 50  # more distinct answers than this is not classification-like data
MAX_GROUPS_SHOWN = 5


def load_tokenizer_for(model: str = "bundled"):
    """The tokenizer of a model folder, .gguf file or 'bundled', without loading any weights."""
    from lorafit.model.load import load_tokenizer, resolve_model_path

    folder = resolve_model_path(model)
    try:
        return load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot load its tokenizer ({e})") from None


def _data_config(path, max_length: int, format: str, overlong: str, loss_on: str, system_prompt: str | None,
                 skip_bad: bool) -> DataConfig:
    from lorafit.config import load_config

    data = {"train": str(path), "max_length": max_length, "format": format, "overlong": overlong,
            "loss_on": loss_on, "system_prompt": system_prompt, "skip_bad_examples": skip_bad}
    return load_config(overrides={"data": data}).data  # the config's own checks and messages


@dataclass
class DataStats:
    path: str
    format: str
    max_length: int
    overlong: str
    records: int = 0
    examples: int = 0  # what training keeps (truncated ones included)
    truncated: int = 0
    dropped_overlong: int = 0
    no_target_tokens: int = 0
    skipped_bad: int = 0
    skipped_sources: list[str] = field(default_factory=list)
    lengths: dict = field(default_factory=dict)  # min/median/p90/p99/max/mean/total over full (uncut) token lengths
    histogram: list[dict] = field(default_factory=list)  # {lo, hi (exclusive, None: open), count, over_max_length}
    target_tokens: int = 0  # loss-carrying tokens training keeps
    tokens_cut: int = 0  # tokens past max_length in truncated examples
    targets_cut: int = 0  # loss-carrying tokens among them
    exact_duplicates: dict = field(default_factory=dict)  # {extra_copies, groups: [[source, ...], ...]}
    near_duplicates: dict = field(default_factory=dict)  # {method, threshold, extra_copies, groups}
    conflicting_answers: dict = field(default_factory=dict)  # same prompt, different final answers
    roles: dict = field(default_factory=dict)  # {messages: {role: n}, assistant_turns: {turns: examples}}
    labels: dict | None = None  # final assistant answer -> count, when the data looks like classification

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_stats(path: str | Path, model: str = "bundled", max_length: int = 2048, format: str = "auto",
               overlong: str = "truncate", loss_on: str = "assistant", system_prompt: str | None = None,
               skip_bad: bool = False, near_threshold: float = 0.9, bins: int = 12, tokenizer=None) -> DataStats:
    """Statistics of a data file as `lorafit train` with these data settings would see it; raises DataError.

    The counts (examples, truncated, dropped, no target tokens, bad) are the trainer's own DataReport; lengths,
    duplicates and balance are over every record that converted and tokenized, before the max_length rule."""
    cfg = _data_config(path, max_length, format, overlong, loss_on, system_prompt, skip_bad)
    report = DataReport()
    records = load_records(path, skip_bad=skip_bad, report=report)  # bad data fails before a tokenizer is loaded
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer_for(model)
    report.records = len(records) + report.skipped_bad
    if cfg.format != "text":
        ensure_chat_template(tokenizer)
    full: list[Example] = []  # every tokenized record before the length rule
    kept = records_to_examples(records, cfg, tokenizer, report, uncut=full)
    stats = DataStats(str(path), report.format, max_length, overlong, records=report.records,
                      examples=report.examples, truncated=report.truncated, dropped_overlong=report.dropped_overlong,
                      no_target_tokens=report.no_target_tokens, skipped_bad=report.skipped_bad,
                      skipped_sources=list(report.skipped_sources))
    stats.target_tokens = sum(ex.num_targets for ex in kept)
    for ex in full:
        if len(ex) > max_length and overlong == "truncate":
            stats.tokens_cut += len(ex) - max_length
            stats.targets_cut += sum(label != IGNORE_INDEX for label in ex.labels[max_length:])
    lengths = [len(ex) for ex in full]
    stats.lengths = _summary(lengths)
    stats.histogram = length_histogram(lengths, max_length, bins)
    by_source = {r.source: r for r in records}
    conversations = [(ex.source, to_conversation(by_source[ex.source], report.format, system_prompt)) for ex in full]
    stats.exact_duplicates, stats.near_duplicates = find_duplicates(conversations, near_threshold)
    if report.format != "text":
        stats.conflicting_answers = _conflicts(conversations)
        stats.roles, stats.labels = _balance(conversations)
    return stats


def _summary(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "median": statistics.median(ordered), "p90": at(0.9), "p99": at(0.99),
            "max": ordered[-1], "mean": round(statistics.fmean(ordered), 1), "total": sum(ordered)}


def length_histogram(lengths: list[int], max_length: int, bins: int = 12) -> list[dict]:
    """About `bins` equal bins from the shortest record to the longest, with max_length on a bin edge when it lies
    between them. Far outliers (past 2x the 95th percentile and past max_length) share one open-ended last bin (hi
    None), so one huge record does not squeeze everything else into the first bin."""
    if not lengths:
        return []
    ordered = sorted(lengths)
    lo, hi = ordered[0], ordered[-1] + 1
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    end = max(2 * (p95 + 1), max_length + 1) if hi > 2 * (p95 + 1) and hi > max_length + 1 else hi
    width = max(1, -(-(end - lo) // bins))
    start = max_length - -(-(max_length - lo) // width) * width if lo < max_length < end else lo
    n = -(-(end - start) // width)
    edges: list[tuple[int, int | None]] = [(start + i * width, start + (i + 1) * width) for i in range(n)]
    if end < hi:
        edges.append((start + n * width, None))
    counts = Counter(min((length - start) // width, len(edges) - 1) for length in lengths)
    return [{"lo": a, "hi": b, "count": counts[i], "over_max_length": a >= max_length}
            for i, (a, b) in enumerate(edges)]


# --- duplicates --------------------------------------------------------------------------------------------------


def _content_text(conversation) -> str:
    if isinstance(conversation, str):
        return conversation
    return "\n".join(m["content"] for m in conversation if m["role"] != "system")


def _shingles(text: str) -> set[str]:
    words = re.sub(r"[\W_]+", " ", text.casefold()).split()
    if len(words) < 3:
        return {" ".join(words)}
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def _minhash_candidates(shingle_sets: list[set[str]]) -> set[tuple[int, int]]:
    import numpy as np

    prime = (1 << 31) - 1  # a, h < 2**31, so a * h + b fits in int64
    rng = np.random.default_rng(0)
    hashes = MINHASH_BANDS * MINHASH_ROWS
    a = rng.integers(1, prime, hashes, dtype=np.int64)[:, None]
    b = rng.integers(0, prime, hashes, dtype=np.int64)[:, None]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, shingles in enumerate(shingle_sets):
        h = np.array([zlib.crc32(s.encode()) % prime for s in shingles], dtype=np.int64)[None, :]
        signature = ((a * h + b) % prime).min(axis=1)
        for band in range(MINHASH_BANDS):
            buckets[band, signature[band * MINHASH_ROWS:(band + 1) * MINHASH_ROWS].tobytes()].append(i)
    pairs = set()
    for members in buckets.values():
        pairs.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
    return pairs


def _groups(pairs, n: int) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    members = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def _group_report(groups: list[list[int]], sources: list[str], **extra) -> dict:
    return {**extra, "extra_copies": sum(len(g) - 1 for g in groups), "groups": len(groups),
            "examples": [[sources[i] for i in g[:4]] for g in groups[:MAX_GROUPS_SHOWN]]}


def find_duplicates(conversations: list[tuple[str, object]], threshold: float = 0.9) -> tuple[dict, dict]:
    """(exact, near): exact = identical records after format conversion; near = the rest of the pairs whose
    user/assistant text has shingle Jaccard >= threshold, one representative per exact group taking part."""
    sources = [s for s, _ in conversations]
    first_of: dict[str, int] = {}
    exact_pairs = []
    for i, (_, conv) in enumerate(conversations):
        key = json.dumps(conv, sort_keys=True)
        exact_pairs.append((i, first_of.setdefault(key, i)))
    exact = _groups([(i, j) for i, j in exact_pairs if i != j], len(conversations))
    reps = sorted(set(first_of.values()))
    shingle_sets = [_shingles(_content_text(conversations[i][1])) for i in reps]
    near_pairs = []
    for x, y in _minhash_candidates(shingle_sets):
        sx, sy = shingle_sets[x], shingle_sets[y]
        if len(sx & sy) >= threshold * len(sx | sy):
            near_pairs.append((reps[x], reps[y]))
    near = _groups(near_pairs, len(conversations))
    return (_group_report(exact, sources),
            _group_report(near, sources, method=NEAR_DUPLICATE_METHOD.format(threshold=threshold),
                          threshold=threshold))


def _conflicts(conversations: list[tuple[str, list[dict]]]) -> dict:
    answers: dict[str, dict[str, str]] = defaultdict(dict)
    for source, conv in conversations:
        answers[json.dumps(conv[:-1], sort_keys=True)].setdefault(conv[-1]["content"], source)
    groups = [list(by_answer.values()) for by_answer in answers.values() if len(by_answer) > 1]
    return {"prompts": len(groups), "examples": [g[:4] for g in groups[:MAX_GROUPS_SHOWN]]}


def _balance(conversations: list[tuple[str, list[dict]]]) -> tuple[dict, dict | None]:
    roles = Counter(m["role"] for _, conv in conversations for m in conv)
    turns = Counter(sum(m["role"] == "assistant" for m in conv) for _, conv in conversations)
    answers = Counter(conv[-1]["content"].strip() for _, conv in conversations)
    looks_like_labels = len(conversations) >= 4 and len(answers) <= min(MAX_LABELS, len(conversations) // 2)
    return ({"messages": dict(roles), "assistant_turns": dict(sorted(turns.items()))},
            dict(answers.most_common()) if looks_like_labels else None)


# --- preview -----------------------------------------------------------------------------------------------------


@dataclass
class PreviewExample:
    source: str
    input_ids: list[int]
    labels: list[int]  # exactly as the trainer builds them (records_to_examples)
    segments: list[tuple[int, int, str, bool]]  # token range [start, end), its text, whether it carries loss
    truncated: bool = False

    @property
    def loss_positions(self) -> set[int]:
        return {t for a, b, _, loss in self.segments if loss for t in range(a, b)}


def preview_examples(path: str | Path, n: int = 3, model: str = "bundled", max_length: int = 2048,
                     format: str = "auto", overlong: str = "truncate", loss_on: str = "assistant",
                     system_prompt: str | None = None, tokenizer=None) -> list[PreviewExample]:
    """The first n training examples of a file, tokenized by the trainer, split into loss and no-loss spans."""
    cfg = _data_config(path, max_length, format, overlong, loss_on, system_prompt, skip_bad=False)
    records = load_records(path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer_for(model)
    if cfg.format != "text":
        ensure_chat_template(tokenizer)
    examples: list[Example] = []
    full: list[Example] = []
    for start in range(0, len(records), max(n, 1)):  # tokenize only as far as needed
        report = DataReport()
        examples += records_to_examples(records[start:start + max(n, 1)], cfg, tokenizer, report, uncut=full)
        cfg = dataclasses.replace(cfg, format=report.format)  # detected on the file's first record, as training does
        if len(examples) >= n:
            break
    cut = {ex.source for ex in full if len(ex) > cfg.max_length}
    return [PreviewExample(ex.source, ex.input_ids, ex.labels, _segments(tokenizer, ex), ex.source in cut)
            for ex in examples[:n]]


def _segments(tokenizer, ex: Example) -> list[tuple[int, int, str, bool]]:
    """Runs of tokens with the same loss flag, each with its text: decode(prefix up to end) minus decode(prefix up to
    start), which keeps sentencepiece's leading spaces that decoding a run on its own would drop."""
    flags = [label != IGNORE_INDEX for label in ex.labels]
    decode = lambda k: tokenizer.decode(ex.input_ids[:k], skip_special_tokens=False,  # noqa: E731
                                        clean_up_tokenization_spaces=False)
    out, start, text_before = [], 0, ""
    for t in range(1, len(flags) + 1):
        if t == len(flags) or flags[t] != flags[start]:
            text = decode(t)
            out.append((start, t, text[len(text_before):], flags[start]))
            start, text_before = t, text
    return out


def plain_preview(example: PreviewExample) -> str:
    """The example's text with loss-carrying spans inside ⟦ ⟧ (for logs and pipes, where colours are lost)."""
    return "".join(f"⟦{text}⟧" if loss else text for _, _, text, loss in example.segments)
