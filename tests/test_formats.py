"""formats: rows of each data format, whole and in blocks, with lines for the line-based ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefcache.data.formats import DataFormatError, Rows, iter_row_blocks, load_rows

ROWS = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(7)]


def _write(tmp_path, kind):
    if kind == "jsonl":  # blank lines are skipped, and counted in the line numbers
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) + ("\n" if i == 2 else "") for i, r in enumerate(ROWS)) + "\n")
    elif kind == "csv":
        path = tmp_path / "d.csv"
        path.write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n"
                                                             for r in ROWS))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "json"])
@pytest.mark.parametrize("block_rows", [1, 3, 100])
def test_blocks_are_the_whole_file_in_order(tmp_path, kind, block_rows):
    path = _write(tmp_path, kind)
    blocks = list(iter_row_blocks(path, block_rows=block_rows))
    assert [start for start, _ in blocks] == list(range(0, len(ROWS), block_rows))
    assert all(len(rows) <= block_rows for _, rows in blocks)
    assert [r for _, rows in blocks for r in rows] == ROWS == list(load_rows(path))


def test_line_numbers_of_line_based_files(tmp_path):
    jsonl = load_rows(_write(tmp_path, "jsonl"))
    assert isinstance(jsonl, Rows)
    assert jsonl.lines == [1, 2, 3, 5, 6, 7, 8]  # line 4 is blank
    csv = load_rows(_write(tmp_path, "csv"))
    assert csv.lines == [2, 3, 4, 5, 6, 7, 8]  # line 1 is the header
    blocks = list(iter_row_blocks(tmp_path / "d.jsonl", block_rows=3))
    assert [rows.lines for _, rows in blocks] == [[1, 2, 3], [5, 6, 7], [8]]


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n007,1.50,true\n")
    assert load_rows(path) == [{"prompt": "007", "chosen": "1.50", "rejected": "true"}]


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"line 2: not UTF-8 text \(byte 0xff"):
        load_rows(path)
    with pytest.raises(DataFormatError, match="line 2: not UTF-8"):
        list(iter_row_blocks(path))


def test_deeply_nested_json_is_bad_data_not_a_crash(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataFormatError, match="line 1: JSON nested too deeply"):
        load_rows(path)


def test_a_damaged_parquet_file_is_named(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataFormatError, match="cannot read as Parquet"):
        load_rows(path)
    with pytest.raises(DataFormatError, match="cannot read as Parquet"):
        list(iter_row_blocks(path))


def test_a_jsonl_file_named_json_and_a_data_wrapper(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_rows(path) == ROWS
    path.write_text(json.dumps({"data": ROWS}))
    assert load_rows(path) == ROWS
