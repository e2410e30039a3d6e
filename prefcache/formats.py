"""Read preference data files into plain row dicts: JSONL, JSON, Parquet, CSV, or a
``datasets.save_to_disk`` folder. Validation and tokenisation live in :mod:`prefcache.data`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv"}
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataFormatError(ValueError):
    """A data file that cannot be read as preference rows; the message says why and where."""


class Rows(list):
    """Rows of a line-based file (JSONL, CSV), with ``lines[i]``: the 1-based line number of row i."""

    def __init__(self, rows, lines: list[int]):
        super().__init__(rows)
        self.lines = lines


def load_rows(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of a preference data file, each a dict of its columns, in file order.

    Formats, by suffix: ``.jsonl``/``.ndjson`` (one JSON object per line; blank lines are skipped),
    ``.json`` (a list of objects, or ``{"data": [...]}``), ``.parquet``, ``.csv`` (every cell a
    string, as written), or a folder written by ``datasets.save_to_disk``. A ``DatasetDict`` folder
    with one split is read whole; with several, ``split`` names one (or point at ``DIR/SPLIT``).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_dir():
        if not any((path / m).exists() for m in DATASETS_MARKERS):
            raise DataFormatError(f"{path} is a folder but not one written by datasets.save_to_disk "
                                  f"(it has none of {', '.join(DATASETS_MARKERS)})")
        return _read_datasets_dir(path, split)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataFormatError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use one of "
                              f"{', '.join(sorted(SUFFIXES))} or a datasets.save_to_disk folder")
    try:
        return {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](path)
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded); "
                              "save it as UTF-8") from None


def _loads(text: str, where: str):
    """json.loads, with a value nested too deep for Python's recursion limit reported as bad data."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply to read") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows, lines = [], []
    with open(path, "rb") as f:  # decoded line by line, so an encoding error can name its line
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}, line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                      f"column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append(_loads(line, f"{path}, line {line_no}"))
                lines.append(line_no)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from e
    return Rows(rows, lines)


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = _loads(text, str(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level objects: a JSONL file named .json
            return _read_jsonl(path)
        raise DataFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of row objects or {{\"data\": [...]}}, "
                              f"got a {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataFormatError(f"{path}: cannot read as Parquet ({e})") from e


def _read_csv(path: Path) -> list[dict]:
    # The csv module, not a type-inferring reader: a prompt column of digits must stay text.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        # A short line leaves its missing cells None (reported as null fields); extra cells are dropped.
        rows, lines = [], []
        for row in reader:
            rows.append({k: v for k, v in row.items() if k is not None})
            lines.append(reader.line_num)  # the record's last line: its only one unless a cell holds newlines
        return Rows(rows, lines)


def _read_datasets_dir(path: Path, split: str | None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            wanted = f"split {split!r} is not in it" if split else "name one"
            raise DataFormatError(f"{path} holds splits {', '.join(splits)}: {wanted} "
                                  f"(pass split=..., or point at {path}/SPLIT)")
        data = data[split]
    elif split is not None:
        raise DataFormatError(f"{path} is a single dataset with no splits; split={split!r} does not apply")
    return data.to_list()
