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
    return {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](path)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from e
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
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
        return [{k: v for k, v in row.items() if k is not None} for row in reader]


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
