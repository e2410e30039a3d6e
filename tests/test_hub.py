"""prefcache.core.hub and Hub ids everywhere: models, adapters and datasets resolved from a Hugging Face cache
laid out as the Hub leaves it (``models--org--name/refs/main``, ``snapshots/<commit>/``), offline.

Nothing is mocked: the real snapshot_download, from_pretrained and load_dataset read these folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_tiny_model, preference_rows

COMMIT = "a" * 40
COMMIT2 = "b" * 40


def lay_out(cache: Path, repo: str, files: Path | dict, commit: str = COMMIT, ref: str = "main",
            kind: str = "models") -> Path:
    """Put a snapshot of ``repo`` into a Hub cache: files under snapshots/<commit>/, refs/<ref> -> commit."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    if isinstance(files, Path):
        shutil.copytree(files, snap)
    else:
        for name, table in files.items():
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, snap / name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model, tokenizer):
    """org/tiny at main (COMMIT) and at tag v2 (COMMIT2, other weights), offline."""
    cache = tmp_path / "hub"
    lay_out(cache, "org/tiny", tiny_model)
    other = make_tiny_model(tmp_path / "other", tokenizer, seed=1)
    lay_out(cache, "org/tiny", other, commit=COMMIT2, ref="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_to_its_cached_snapshot_and_commit(hub_cache, tiny_model):
    from prefcache.model.load import load_model, load_tokenizer, model_fingerprint, resolve_model

    source = resolve_model("org/tiny")
    assert source.path == hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    assert (source.name, source.hub_id, source.revision) == ("org/tiny", "org/tiny", COMMIT)
    # The fingerprint is of the files: the same weights as the local folder, another revision differs.
    assert model_fingerprint(source) == model_fingerprint(resolve_model(str(tiny_model)))
    v2 = resolve_model("org/tiny", revision="v2")
    assert v2.revision == COMMIT2 and resolve_model("org/tiny@v2").revision == COMMIT2
    assert model_fingerprint(v2) != model_fingerprint(source)
    model, info = load_model(source, quantize="fp32", device="cpu")
    assert info["model_name"] == "org/tiny" and model.config.hidden_size == 64
    assert load_tokenizer(source).eos_token is not None


def test_precompute_records_the_hub_id_and_commit(hub_cache, tmp_path, prefs_file):
    from prefcache.cache.store import read_metadata
    from prefcache.reference.shards import precompute

    out = tmp_path / "cache"
    precompute(data=str(prefs_file), out=str(out), model="org/tiny", revision="v2", quantize="fp32",
               max_length=64, device="cpu", progress=False)
    meta = read_metadata(out)
    assert (meta["model_id"], meta["model_revision"], meta["model_name"]) == ("org/tiny", COMMIT2, "org/tiny")
    # Another revision is another model: extending the cache with it is refused.
    with pytest.raises(ValueError, match="model_fingerprint"):
        precompute(data=str(prefs_file), out=str(out), model="org/tiny", quantize="fp32", max_length=64,
                   device="cpu", progress=False)


def test_adapter_from_the_hub(hub_cache, tmp_path, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prefcache.core.hub import resolve_adapter
    from prefcache.model.load import load_model, resolve_model

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")
    snap = lay_out(hub_cache, "org/lora", tmp_path / "lora")
    assert resolve_adapter("org/lora") == snap
    model, info = load_model(resolve_model("org/tiny"), quantize="fp32", device="cpu", adapter="org/lora")
    assert info["adapter"] == str(snap) and hasattr(model, "peft_config")


def test_offline_and_not_cached_is_one_clear_line(hub_cache, tmp_path, prefs_file):
    from prefcache.cli import main
    from prefcache.core.hub import HubError
    from prefcache.model.load import ModelError, resolve_model

    with pytest.raises(HubError, match=r"org/absent is not a local path and not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        resolve_model("org/absent")
    with pytest.raises(HubError, match="revision"):
        resolve_model("org/tiny", revision="nope")
    res = CliRunner().invoke(main, ["precompute", "--data", str(prefs_file), "--out", str(tmp_path / "c"),
                                    "--model", "org/absent", "--no-progress"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "org/absent" in lines[0] and "hf download org/absent" in lines[0], res.output
    res = CliRunner().invoke(main, ["precompute", "--data", str(prefs_file), "--out", str(tmp_path / "c"),
                                    "--model", "org/absent@v2", "--no-progress"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "org/absent (revision v2)" in lines[0] and "`hf download org/absent --revision v2`" in lines[0], res.output
    with pytest.raises(ModelError, match="model not found"):
        resolve_model(str(tmp_path / "no" / "such" / "folder"))


# ----------------------------------------------------------------------------- datasets

def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows)


@pytest.fixture
def hub_dataset(hub_cache, tmp_path, monkeypatch):
    """org/prefs with train and test splits, in the Hub cache the way `hf download --repo-type dataset` leaves it."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = preference_rows(10)
    lay_out(hub_cache, "org/prefs", {"data/train-00000-of-00001.parquet": _table(rows[:7]),
                                     "data/test-00000-of-00001.parquet": _table(rows[7:])}, kind="datasets")
    return rows


def test_hub_dataset_is_loaded_by_load_dataset_offline(hub_dataset):
    from prefcache.data.formats import DataFormatError, iter_row_blocks, load_rows

    assert load_rows("org/prefs", split="train") == hub_dataset[:7]
    assert load_rows("org/prefs", split="test") == hub_dataset[7:]
    blocks = list(iter_row_blocks("org/prefs", split="train", block_rows=3))
    assert [s for s, _ in blocks] == [0, 3, 6] and [r for _, b in blocks for r in b] == hub_dataset[:7]
    with pytest.raises(DataFormatError, match=r"org/prefs: unknown split 'dev'; Should be one of \['train', 'test'\]"):
        load_rows("org/prefs", split="dev")
    with pytest.raises(DataFormatError, match=r"org/prefs: unknown --data-config 'nope': BuilderConfig 'nope' not found"):
        load_rows("org/prefs", split="train", config="nope")
    with pytest.raises(DataFormatError, match="has splits train, test: name one with --split"):
        load_rows("org/prefs")
    with pytest.raises(DataFormatError, match="data not found: org/absent is not a local file or folder"):
        load_rows("org/absent", split="train")


def test_local_dataset_repository_folder(tmp_path):
    from prefcache.data.formats import load_rows

    rows = preference_rows(5)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(_table(rows), tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    assert load_rows(tmp_path / "repo", split="train") == rows


def test_precompute_and_train_on_a_hub_model_and_dataset(hub_dataset, tmp_path):
    from prefcache.cache.store import read_metadata
    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    cache = tmp_path / "cache"
    result = precompute(data="org/prefs", split="train", out=str(cache), model="org/tiny", quantize="fp32",
                        max_length=64, device="cpu", progress=False)
    assert result["scored"] == 7 and not result["problems"]
    precompute(data="org/prefs", split="test", out=str(cache), model="org/tiny", quantize="fp32",
               max_length=64, device="cpu", progress=False)
    assert read_metadata(cache)["model_revision"] == COMMIT
    summary = train(data="org/prefs", split="train", eval_data="org/prefs", eval_split="test", cache=str(cache),
                    out=str(tmp_path / "run"), model="org/tiny", max_steps=1, batch_size=4, lora_r=2,
                    device="cpu", progress=False)
    assert summary["eval"]["n"] == 3 and summary["steps"] == 1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_pairs"] == 7 and run["cache"]["model_id"] == "org/tiny"


def test_score_and_eval_take_hub_ids_and_plain_folders_with_out(hub_dataset, tmp_path, tiny_model):
    from prefcache.cli import main
    from prefcache.reference.shards import precompute
    from prefcache.training.rundir import resolve_checkpoints

    cache = tmp_path / "cache"
    precompute(data="org/prefs", split="test", out=str(cache), model="org/tiny", quantize="fp32", max_length=64,
               device="cpu", progress=False)
    out = tmp_path / "scores"
    res = CliRunner().invoke(main, ["score", "org/tiny", str(tiny_model), "--cache", str(cache), "--data", "org/prefs",
                                    "--split", "test", "--out", str(out), "--quantize", "fp32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(list((out / "evals").glob("score-org_tiny-*.parquet"))) == 1
    margins = pq.read_table(next((out / "evals").glob("score-org_tiny-*.parquet"))).to_pylist()
    assert {r["metric"]: r["value"] for r in margins}["rewards_margins"] == pytest.approx(0.0, abs=1e-5)
    run_dir, ckpts = resolve_checkpoints(["org/tiny@v2", str(tiny_model)], None, False, str(tmp_path / "evals"))
    assert run_dir == tmp_path / "evals" and [c.kind for c in ckpts] == ["full", "full"]
    assert ckpts[0].path.name == COMMIT2


def test_csv_and_jsonl_blocks_equal_whole_reads(tmp_path):
    import csv

    from prefcache.data.formats import iter_row_blocks, load_rows

    rows = preference_rows(7)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.csv", "d.jsonl"):
        blocks = list(iter_row_blocks(tmp_path / name, block_rows=3))
        assert [s for s, _ in blocks] == [0, 3, 6]
        assert [r for _, b in blocks for r in b] == load_rows(tmp_path / name) == rows
