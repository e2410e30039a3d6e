"""One clear line for each kind of bad input, and refusals that need no model made before torch loads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import CACHE_META, cache_rows, preference_rows, refuse_before_torch, write_jsonl

from prefcache.cache.store import CacheWriter, shard_paths
from prefcache.cli import main
from prefcache.data.pairs import BadDataError, DataFormatError, load_dataset_pairs


def one_line_error(result, *fragments):
    """A refusal click reports cleanly (a non-zero exit, no exception escaping, no traceback) as one line,
    ``Error: ...``, holding every fragment."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], result.output


# -- refusals before torch ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["existing run", "missing data", "missing cache", "bad device", "resume nothing"])
def test_refusals_that_need_no_model_come_before_torch(tmp_path, case):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(2))
    CacheWriter(tmp_path / "cache", CACHE_META).write(cache_rows(["a"]))
    (tmp_path / "run" / "logs").mkdir(parents=True)
    pq.write_table(pq.read_table(shard_paths(tmp_path / "cache")[0]), tmp_path / "run" / "logs" / "steps-000000.parquet")
    args = {"data": str(data), "cache": str(tmp_path / "cache"), "out": str(tmp_path / "new")}
    expect = {"existing run": ({"out": str(tmp_path / "run")}, [], "already holds a run"),
              "missing data": ({"data": str(tmp_path / "nope.jsonl")}, [], "no such file"),
              "missing cache": ({"cache": str(tmp_path / "nocache")}, [], "no such file"),
              "bad device": ({}, ["--device", "tpu9"], "device must be"),
              "resume nothing": ({}, ["--resume"], "does not exist")}[case]
    args.update(expect[0])
    argv = ["train", *(x for k, v in args.items() for x in (f"--{k}", v)), *expect[1]]
    out = refuse_before_torch(*argv)
    assert expect[2] in out and "torch loaded: False" in out, out
    out = refuse_before_torch("precompute", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c2"))
    assert "no such file" in out and "torch loaded: False" in out, out


def test_a_resume_that_changes_the_loss_is_refused_before_torch(tmp_path):
    """The checkpoint's prefcache.json says what it trained with: compared with no model and no torch."""
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(2))
    CacheWriter(tmp_path / "cache", CACHE_META).write(cache_rows(["a"]))
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (ckpt / "prefcache.json").write_text(json.dumps({"step": 1, "loss": ["sigmoid"], "beta": 0.1}))  # an older one
    argv = ["train", "--data", str(data), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--resume", "--loss", "ipo", "--beta", "0.5"]
    out = refuse_before_torch(*argv)
    assert "cannot resume with another loss" in out and "torch loaded: False" in out, out
    assert "loss: checkpoint has ['sigmoid'], now ['ipo']" in out and "beta: checkpoint has 0.1, now 0.5" in out, out


# -- data files -----------------------------------------------------------------------------------------

def test_deeply_nested_json_is_one_line(tmp_path, tokenizer):
    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + deep + "\n")
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: JSON nested too deeply"):
        load_dataset_pairs(tmp_path / "d.jsonl", tokenizer, 64)
    (tmp_path / "d.json").write_text(deep)
    with pytest.raises(DataFormatError, match=r"d\.json: JSON nested too deeply"):
        load_dataset_pairs(tmp_path / "d.json", tokenizer, 64)


def test_undecodable_bytes_name_the_file_and_line(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: not UTF-8 text \(byte 0xff"):
        load_dataset_pairs(tmp_path / "d.jsonl", tokenizer, 64)
    (tmp_path / "d.csv").write_bytes(b"prompt,chosen,rejected\np,a,\xfe\n")
    with pytest.raises(DataFormatError, match=r"d\.csv: not UTF-8 text \(byte 0xfe"):
        load_dataset_pairs(tmp_path / "d.csv", tokenizer, 64)


def test_a_file_mixing_standard_and_conversational_rows_is_refused(tmp_path, tokenizer):
    conv = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "d.jsonl", preference_rows(2) + [conv])
    with pytest.raises(BadDataError, match=r"line 3 .*a conversational row in a file of standard rows \(row 1"):
        load_dataset_pairs(path, tokenizer, 64)
    pairs, bad, _ = load_dataset_pairs(path, tokenizer, 64, on_bad_row="skip")
    assert len(pairs) == 2 and [b.line for b in bad] == [3]


def test_bad_rows_are_numbered_by_line_in_jsonl_and_csv_and_from_1_elsewhere(tmp_path, tokenizer):
    rows = preference_rows(2) + [{"prompt": "p", "chosen": "", "rejected": "r"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")  # a blank line
    with pytest.raises(BadDataError, match="line 4 .*: empty completion 'chosen'"):
        load_dataset_pairs(path, tokenizer, 64)
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\np,a,b\np,,b\n")
    with pytest.raises(BadDataError, match="line 3 .*: empty completion 'chosen'"):
        load_dataset_pairs(tmp_path / "d.csv", tokenizer, 64)
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(BadDataError, match="row 3 .*: empty completion 'chosen'"):
        load_dataset_pairs(tmp_path / "d.parquet", tokenizer, 64)


def test_an_empty_data_file_says_so(tmp_path, tiny_model):
    from prefcache.reference.shards import precompute

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="empty.jsonl holds no preference rows"):
        precompute(data=str(tmp_path / "empty.jsonl"), out=str(tmp_path / "c"), model=str(tiny_model), progress=False)
    assert not (tmp_path / "c").exists()


# -- damaged caches -------------------------------------------------------------------------------------

def damaged_cache(tmp_path: Path, which: int) -> tuple[Path, Path]:
    w = CacheWriter(tmp_path / "cache", CACHE_META)
    w.write(cache_rows(["a"]))
    w.write(cache_rows(["b"]))
    shard = shard_paths(tmp_path / "cache")[which]
    shard.write_bytes(shard.read_bytes()[:40])
    return tmp_path / "cache", shard


@pytest.mark.parametrize("which", [0, 1])
def test_inspect_and_verify_name_a_damaged_shard(tmp_path, which):
    cache, shard = damaged_cache(tmp_path, which)
    r = CliRunner().invoke(main, ["inspect", str(cache)])
    one_line_error(r, shard.name, "damaged shard")
    r = CliRunner().invoke(main, ["verify", str(cache)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    # verify's report: the verdict, then its problems, each on one line
    lines = r.output.splitlines()
    assert lines[:2] == [f"{cache}: NOT OK", "Error: 1 problem(s):"] and len(lines) == 3, r.output
    assert lines[2].startswith(f"  {shard.name}: unreadable") and "damaged shard" in lines[2], r.output


def test_score_refuses_a_missing_cache_or_data_before_torch(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(2))
    CacheWriter(tmp_path / "cache", CACHE_META).write(cache_rows(["a"]))
    for args, message in ((["--cache", str(tmp_path / "nocache"), "--data", str(data)], "no such file"),
                          (["--cache", str(tmp_path / "cache"), "--data", str(tmp_path / "no.jsonl")], "no such file"),
                          (["--cache", str(tmp_path), "--data", str(data)], "not a prefcache cache")):
        out = refuse_before_torch("score", "base", *args)
        assert message in out and "torch loaded: False" in out, out
