"""Read preference data files into plain row dicts: JSONL, JSON, Parquet, CSV, a ``datasets.save_to_disk``
folder, a local dataset repository folder, or a Hugging Face Hub dataset id (through ``datasets.load_dataset``).
Validation and tokenisation live in :mod:`prefcache.data.pairs`.

:func:`iter_row_blocks` reads the same sources in blocks of rows, so a million-pair file is never held as
Python objects at once: Arrow-backed sources (Parquet, datasets) are memory-mapped or read batch by batch.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from prefcache.core.hub import cache_dir, looks_like_id, offline, split_revision

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


def load_rows(path: str | os.PathLike, split: str | None = None, config: str | None = None) -> list[dict]:
    """Rows of a preference data file, each a dict of its columns, in file order.

    Formats, by suffix: ``.jsonl``/``.ndjson`` (one JSON object per line; blank lines are skipped),
    ``.json`` (a list of objects, or ``{"data": [...]}``), ``.parquet``, ``.csv`` (every cell a
    string, as written), or a folder written by ``datasets.save_to_disk``. A ``DatasetDict`` folder
    with one split is read whole; with several, ``split`` names one (or point at ``DIR/SPLIT``).
    A Hub dataset id (``org/name``) or a local dataset repository folder is read by
    ``datasets.load_dataset(path, config, split=split)``.
    """
    if (dataset := open_dataset(path, split, config)) is not None:
        return dataset.to_list()
    path = Path(path).expanduser()
    if path.is_dir():
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


def open_dataset(path: str | os.PathLike, split: str | None = None, config: str | None = None):
    """A ``datasets.Dataset`` (Arrow, memory-mapped) for Hub ids, dataset repository folders and
    ``save_to_disk`` folders; None for a data file. Raises one-line errors for the rest."""
    name = str(path)
    path = Path(path).expanduser()
    if path.is_file():
        return None
    if path.is_dir():
        if any((path / m).exists() for m in DATASETS_MARKERS):
            return _datasets_dir(path, split)
        if not any(p.suffix.lower() in SUFFIXES for p in path.rglob("*") if p.is_file()):
            raise DataFormatError(f"{path} is a folder but not one written by datasets.save_to_disk (it has none "
                                  f"of {', '.join(DATASETS_MARKERS)}), nor a dataset repository with data files")
        return _load_dataset(str(path), split, config)
    if not looks_like_id(name):
        raise FileNotFoundError(f"data not found: {path}")
    return _load_dataset(name, split, config)


def _load_dataset(name: str, split: str | None, config: str | None):
    """``datasets.load_dataset``, with its errors as one line. Offline, a dataset in the Hub cache
    (``datasets--org--name/snapshots/...``, as ``hf download --repo-type dataset`` leaves it) is read from there."""
    from datasets import DatasetDict, load_dataset

    repo, revision = split_revision(name) if not Path(name).exists() else (name, None)  # org/name@revision
    try:
        try:
            data = load_dataset(repo, config, split=split, revision=revision)
        except (ConnectionError, FileNotFoundError) as e:
            folder = _cached_dataset_repo(name) if not Path(name).exists() else None
            if folder is None:
                raise e
            data = load_dataset(str(folder), config, split=split)
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        if first.startswith("Unknown split"):
            raise DataFormatError(f"{name}: unknown split {split!r}; {first.partition('. ')[2] or first}") from e
        if config is not None and ("BuilderConfig" in first or "config" in first.lower()):
            raise DataFormatError(f"{name}: unknown --data-config {config!r}: {first}") from e
        raise DataFormatError(f"{name}: {first}") from e
    except (ConnectionError, FileNotFoundError) as e:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hub could not be reached"
        raise DataFormatError(f"data not found: {name} is not a local file or folder, and not a dataset in the "
                              f"Hugging Face caches ({why}). Download it once online, or give a local file") from e
    if isinstance(data, DatasetDict):
        if len(data) != 1:
            raise DataFormatError(f"{name} has splits {', '.join(data)}: name one with --split")
        data = next(iter(data.values()))
    return data


def _cached_dataset_repo(name: str):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, revision = split_revision(name)
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache_dir(),
                                      local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def iter_row_blocks(path: str | os.PathLike, split: str | None = None, config: str | None = None,
                    block_rows: int = 8192):
    """(first row index, rows) blocks of at most ``block_rows`` rows, in file order, for any source
    :func:`load_rows` reads. Parquet, JSONL, CSV and datasets sources are never read whole into Python
    objects (a ``.json`` list is: JSON has to be parsed whole)."""
    dataset = open_dataset(path, split, config)
    if dataset is not None:
        # Arrow rows, as ``load_rows``' ``to_list`` gives them: an ``Image`` feature stays its stored
        # ``{"bytes", "path"}`` (decoding every image of a block to PIL is wasted on text, and loses the encoded bytes
        # an image's content hash is made of); every other feature reads the same either way.
        table = dataset.with_format("arrow")
        for start in range(0, len(dataset), block_rows):
            yield start, table[start : start + block_rows].to_pylist()
        return
    path = Path(path).expanduser()
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=block_rows)
            start = 0
            for batch in batches:
                rows = batch.to_pylist()
                yield start, rows
                start += len(rows)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataFormatError(f"{path}: cannot read as Parquet ({e})") from e
        return
    if kind in ("jsonl", "csv"):  # line-based: each block is Rows, with the lines bad rows are reported by
        records = _jsonl_records(path) if kind == "jsonl" else _csv_records(path)
        start, rows, lines = 0, [], []
        try:
            for line_no, row in records:
                rows.append(row)
                lines.append(line_no)
                if len(rows) == block_rows:
                    yield start, Rows(rows, lines)
                    start, rows, lines = start + len(rows), [], []
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded); "
                                  "save it as UTF-8") from None
        if rows:
            yield start, Rows(rows, lines)
        return
    rows = load_rows(path, split, config)
    for start in range(0, len(rows), block_rows):
        yield start, rows[start : start + block_rows]


def _jsonl_records(path: Path):
    """(1-based line, row) of each non-blank line of a JSONL file."""
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
                yield line_no, _loads(line, f"{path}, line {line_no}")
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from e


def _read_jsonl(path: Path) -> list[dict]:
    records = list(_jsonl_records(path))
    return Rows([r for _, r in records], [n for n, _ in records])


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


def _csv_records(path: Path):
    """(line, row) of each record of a CSV file; the line is the record's last (its only one unless a cell
    holds newlines). The csv module, not a type-inferring reader: a prompt column of digits must stay text."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        # A short line leaves its missing cells None (reported as null fields); extra cells are dropped.
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _read_csv(path: Path) -> list[dict]:
    records = list(_csv_records(path))
    return Rows([r for _, r in records], [n for n, _ in records])


def _read_datasets_dir(path: Path, split: str | None) -> list[dict]:
    return _datasets_dir(path, split).to_list()


def _datasets_dir(path: Path, split: str | None):
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
    return data
