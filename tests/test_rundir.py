"""rundir: the files of a run directory, read and written in one place, and checkpoint arguments resolved."""

from __future__ import annotations

import pytest

from prefcache.training.rundir import (
    BASE,
    RunDirError,
    read_checkpoint_info,
    read_run_info,
    resolve_checkpoints,
    run_settings,
    step_of,
    write_checkpoint_info,
    write_run_info,
)


def _checkpoint(run, step, kind="adapter_config.json"):
    path = run / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True)
    (path / kind).write_text("{}")
    (path / "trainer_state.pt").write_text("")
    write_checkpoint_info(path, {"step": step})
    return path


def test_run_and_checkpoint_info_round_trip(tmp_path):
    assert read_run_info(tmp_path) == {} and read_run_info(None) == {}
    write_run_info(tmp_path, {"config": {"model": "m", "beta": 0.5, "finetune": "qlora"}})
    assert read_run_info(tmp_path)["config"]["beta"] == 0.5
    assert run_settings(tmp_path) == {"model": "m", "finetune": "qlora", "beta": 0.5, "quantize": "4bit"}
    assert read_checkpoint_info(tmp_path) is None
    write_checkpoint_info(tmp_path, {"step": 7})
    assert read_checkpoint_info(tmp_path) == {"step": 7} and step_of(tmp_path) == 7


def test_step_of_a_folder_without_info_comes_from_its_name(tmp_path):
    for name, step in (("step-000120", 120), ("checkpoint-40", 40), ("final", None)):
        (tmp_path / name).mkdir()
        assert step_of(tmp_path / name) == step


def test_checkpoint_arguments_resolve_to_the_run_and_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    first, second = _checkpoint(run, 1), _checkpoint(run, 2, "config.json")
    run_dir, found = resolve_checkpoints([str(run)], None, base=True)
    assert run_dir == run.resolve()
    assert [(c.name, c.step, c.kind) for c in found] == [(BASE, None, "base"), ("step-000001", 1, "adapter"),
                                                        ("step-000002", 2, "full")]
    _, found = resolve_checkpoints(["step-000002", str(first)], str(run), base=False)
    assert [c.path for c in found] == [second.resolve(), first.resolve()]
    with pytest.raises(RunDirError, match=r"checkpoint not found: .*step-000009 \(.*has: step-000001, step-000002\)"):
        resolve_checkpoints([str(run / "checkpoints" / "step-000009")], None, base=False)
    with pytest.raises(RunDirError, match="no run folder"):
        resolve_checkpoints([BASE], None, base=False)
