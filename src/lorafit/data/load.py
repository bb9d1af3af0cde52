"""Records from disk: JSONL, JSON, Parquet and CSV files, or a folder of them, each tagged with where it came from.

JSON and JSONL go through the stdlib `json` module line by line, so every error names the file and line. Parquet and
CSV go through `datasets` (imported only when such a file is read: the GPU image does not ship it).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.example import DataReport
from lorafit.errors import DataError

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv")
MAX_SKIP_REASONS = 5  # reasons kept in DataReport.skipped_sources; the count is always exact


@dataclass
class Record:
    source: str  # "file:line" (JSONL, JSON, CSV) or "file:row N" (Parquet, 0-based as in pandas)
    data: dict


class _Sink:
    """Where a bad record goes: raised as DataError, or counted in the report when skipping."""

    def __init__(self, skip_bad: bool, report: DataReport | None):
        self.skip_bad, self.report = skip_bad, report
        self.skipped = 0

    def bad(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.skipped += 1
        if self.report is not None:
            self.report.skipped_bad += 1
            if len(self.report.skipped_sources) < MAX_SKIP_REASONS:
                self.report.skipped_sources.append(message)


def load_records(path: str | Path, skip_bad: bool = False, report: DataReport | None = None) -> list[Record]:
    """Every record of a file, or of each supported file of a folder (sorted by name); raises DataError."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUPPORTED and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: folder has no data files (supported: {', '.join(SUPPORTED)})")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: file not found")
    sink = _Sink(skip_bad, report)
    records: list[Record] = []
    for file in files:
        records += _load_file(file, sink)
    return records


def _load_file(path: Path, sink: _Sink) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (supported: {', '.join(SUPPORTED)})")
    skipped_before = sink.skipped
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}[suffix]
    records = reader(path, sink)
    if not records:
        skipped = sink.skipped - skipped_before
        raise DataError(f"{path}: no records" + (f" ({skipped} bad records skipped)" if skipped else ""))
    return records


def _check_object(value, source: str, sink: _Sink) -> Record | None:
    if isinstance(value, dict):
        return Record(source, value)
    sink.bad(f"{source}: record is {_kind(value)}, expected an object with fields such as \"messages\"")
    return None


def _kind(value) -> str:
    names = {list: "a list", str: "a string", bool: "true/false", type(None): "null", int: "a number",
             float: "a number"}
    return names.get(type(value), type(value).__name__)


def _read_jsonl(path: Path, sink: _Sink) -> list[Record]:
    records = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM that some editors write; not part of the data
            raw = raw[3:]
        source = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            sink.bad(f"{source}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            sink.bad(f"{source}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        except (ValueError, RecursionError) as e:  # e.g. an integer over Python's 4300-digit limit, or deep nesting
            sink.bad(f"{source}: not valid JSON ({_reason(e)})")
            continue
        if (record := _check_object(value, source, sink)) is not None:
            records.append(record)
    return records


def _reason(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def _read_json(path: Path, sink: _Sink) -> list[Record]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({_reason(e)})") from None
    items, offsets = _records_of(value, text, path)
    records = []
    for i, item in enumerate(items):
        line = text.count("\n", 0, offsets[i]) + 1 if offsets else None
        source = f"{path}:{line}" if line else f"{path}:item {i}"
        if (record := _check_object(item, source, sink)) is not None:
            records.append(record)
    return records


def _records_of(value, text: str, path: Path) -> tuple[list, list[int] | None]:
    """The list of records a .json file holds, and where each starts in the text (None if that cannot be found)."""
    if isinstance(value, list):
        return value, _item_offsets(text, text.index("["))
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        # {"messages": [...]} is one conversation, not a list of records whose fields are role and content
        if "messages" in value or len(lists) != 1:
            return [value], [len(text) - len(text.lstrip())]
        return value[lists[0]], _item_offsets(text, _value_start(text, lists[0]))
    raise DataError(f"{path}: expected a list of records (or an object holding one list), got {_kind(value)}")


def _item_offsets(text: str, start: int | None) -> list[int] | None:
    """Start offset of each element of the JSON array at text[start] (already known to be valid JSON)."""
    if start is None:
        return None
    decoder, offsets = json.JSONDecoder(), []
    i = _skip_ws(text, start + 1)
    while text[i] != "]":
        offsets.append(i)
        _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return offsets


def _value_start(text: str, key: str) -> int | None:
    """Offset of the value of a top-level key of the JSON object in text."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, _skip_ws(text, 0) + 1)
    while text[i] == '"':
        name, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the colon
        if name == key:
            return i
        _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return None


def _skip_ws(text: str, i: int) -> int:
    while text[i] in " \t\r\n":
        i += 1
    return i


def _read_parquet(path: Path, sink: _Sink) -> list[Record]:
    rows = _load_with_datasets("parquet", path)
    return [r for i, row in enumerate(rows) if (r := _check_object(row, f"{path}:row {i}", sink)) is not None]


def _read_csv(path: Path, sink: _Sink) -> list[Record]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x})") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: not a valid CSV header ({e})") from None
    if not header:
        return []
    if len(set(header)) != len(header) or not all(header):
        raise DataError(f"{path}:1: CSV header needs distinct, non-empty column names, got {header}")
    # every column as text: otherwise a column of numbers arrives as ints and an empty cell as NaN
    rows = _load_with_datasets("csv", path, header=header, keep_default_na=False)
    # the header is line 1 and rows start at line 2 (assumes no line breaks inside quoted cells)
    return [r for i, row in enumerate(rows) if (r := _check_object(row, f"{path}:{i + 2}", sink)) is not None]


def _load_with_datasets(kind: str, path: Path, header: list[str] | None = None, **kwargs) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading .{kind} files needs the `datasets` package: "
                        "pip install 'lorafit[data]', or convert the file to .jsonl") from None
    if header is not None:
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # lorafit prints its own data report; a bar per small file is noise
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs).to_list()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        cause = e.__cause__ or e  # DatasetGenerationError only says "an error occurred"; pandas/pyarrow say what
        raise DataError(f"{path}: cannot read as {kind} ({type(cause).__name__}: {str(cause)[:300]})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
