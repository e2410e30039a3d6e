"""A command never writes into another command's folder: a cache, a run and a model folder are refused as each
other's --out, in one line, before anything is written (the folder is byte-identical afterwards)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import preference_rows, write_jsonl

from prefcache.cli import main
from prefcache.core.folders import FolderKindError, folder_kind

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model, one_thread):
    """A real cache, a real run (one checkpoint) and a real exported model, as the commands write them."""
    from prefcache.export import export
    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    root = tmp_path_factory.mktemp("folders")
    data = write_jsonl(root / "d.jsonl", preference_rows(4))
    common = {"data": str(data), "model": str(tiny_model)}
    precompute(**common, out=str(root / "cache"), max_length=48, quantize="fp32", progress=False)
    train(**common, cache=str(root / "cache"), out=str(root / "run"), max_steps=1, batch_size=2, progress=False)
    export(root / "run" / "checkpoints" / "step-000001", root / "model")
    return {"root": root, "data": data, "model": tiny_model, "cache": root / "cache", "run": root / "run",
            "exported": root / "model", "ckpt": root / "run" / "checkpoints" / "step-000001"}


def contents(folder) -> dict:
    """Every file and folder under ``folder``, with the bytes of each file: equal = byte-identical."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_each_folder_is_recognised(folders, tmp_path):
    assert folder_kind(folders["cache"]) == ("cache", "manifest.json")
    assert folder_kind(folders["run"]) == ("run", "run.json")
    assert folder_kind(folders["exported"])[0] == "model" and folder_kind(folders["ckpt"])[0] == "model"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run killed before run.json was rewritten
    assert folder_kind(tmp_path / "run") == ("run", "checkpoints/")
    assert folder_kind(tmp_path) is None and folder_kind(tmp_path / "missing") is None


def _argv(command: str, out: str, f: dict) -> list[str]:
    common = ["--data", str(f["data"]), "--model", str(f["model"]), "--no-progress"]
    return {"train": ["train", *common, "--cache", str(f["cache"]), "--out", out, "--max-steps", "1"],
            "precompute": ["precompute", *common, "--out", out, "--max-length", "48"],
            "export": ["export", str(f["ckpt"]), "--out", out]}[command]


@pytest.mark.parametrize(("command", "target", "says"), [
    ("train", "cache", "is a reference cache (it has manifest.json), not a training run"),
    ("train", "exported", "is a model folder (it has adapter_config.json), not a training run"),
    ("train", "ckpt", "is a model folder"),
    ("precompute", "run", "is a training run (it has run.json), not a reference cache"),
    ("precompute", "exported", "is a model folder (it has adapter_config.json), not a reference cache"),
    ("export", "cache", "is a reference cache (it has manifest.json), not a model folder"),
    ("export", "run", "is a training run (it has run.json), not a model folder"),
])
def test_a_folder_of_another_kind_is_refused_and_left_as_it_was(folders, command, target, says):
    folder = folders[target]
    before = contents(folder)
    result = CliRunner().invoke(main, _argv(command, str(folder), folders))
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "choose a new" in lines[0] and "Traceback" not in result.output, \
        result.output
    assert contents(folder) == before


def test_the_api_refuses_too(folders):
    from prefcache.export import export
    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    before = {k: contents(folders[k]) for k in ("cache", "run")}
    with pytest.raises(FolderKindError, match="reference cache"):
        train(data=str(folders["data"]), cache=str(folders["cache"]), model=str(folders["model"]),
              out=str(folders["cache"]), max_steps=1, progress=False)
    with pytest.raises(FolderKindError, match="training run"):
        precompute(data=str(folders["data"]), model=str(folders["model"]), out=str(folders["run"]), progress=False)
    with pytest.raises(FolderKindError, match="training run"):
        export(folders["ckpt"], folders["run"])
    assert {k: contents(folders[k]) for k in ("cache", "run")} == before


def test_the_cache_config_still_reruns_precompute(folders):
    """What ``train --out CACHE`` used to break: the cache's own config.yaml, read back by precompute."""
    assert CliRunner().invoke(main, _argv("train", str(folders["cache"]), folders)).exit_code == 1
    result = CliRunner().invoke(main, ["precompute", "--config", str(folders["cache"] / "config.yaml"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "0 pairs scored, 4 already cached" in result.output


def test_score_results_never_go_into_a_cache(folders):
    """``score MODEL --out DIR`` writes DIR/evals/ and DIR/logs/: a cache is refused as DIR, untouched."""
    before = contents(folders["cache"])
    result = CliRunner().invoke(main, ["score", str(folders["model"]), "--out", str(folders["cache"]), "--cache",
                                       str(folders["cache"]), "--data", str(folders["data"])])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "is a reference cache (it has manifest.json)" in lines[0] and "choose another --out" in lines[0]
    assert contents(folders["cache"]) == before
