"""checkpoint: whole checkpoints only, found by step, RNG states that restore the same draws."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import Saves

from prefcache.training.checkpoint import (
    checkpoint_dir,
    clean_temporaries,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_save_and_find_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    for step in (10, 2, 100):
        save_checkpoint(tmp_path, step, Saves("model.safetensors"), Saves("tokenizer.json"), {"step": step},
                        {"step": step, "loss": ["sigmoid"]})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10, 100]  # by step, not by name
    latest = latest_checkpoint(tmp_path)
    assert latest == checkpoint_dir(tmp_path, 100) == tmp_path / "checkpoints" / "step-000100"
    assert load_trainer_state(latest) == {"step": 100}
    assert json.loads((latest / "prefcache.json").read_text()) == {"step": 100, "loss": ["sigmoid"]}
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "tokenizer.json", "prefcache.json",
                                                 "trainer_state.pt"}


def test_a_failed_save_leaves_no_checkpoint_and_a_rerun_replaces(tmp_path):
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 5, Saves("model.safetensors", fail=True), Saves("t"), {}, {})
    assert list_checkpoints(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []
    save_checkpoint(tmp_path, 5, Saves("a"), Saves("t"), {"v": 1}, {})
    save_checkpoint(tmp_path, 5, Saves("b"), Saves("t"), {"v": 2}, {})
    assert load_trainer_state(checkpoint_dir(tmp_path, 5)) == {"v": 2}
    assert not (checkpoint_dir(tmp_path, 5) / "a").exists()


def test_folders_without_a_trainer_state_are_not_checkpoints_and_temporaries_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000007").mkdir(parents=True)  # a folder of a killed copy: no trainer_state.pt
    (root / ".tmp-step-000008-x").mkdir()
    (root / ".old-step-000006").mkdir()
    (root / "notes").mkdir()
    assert list_checkpoints(tmp_path) == []
    clean_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000007"]


def test_rng_state_restores_python_numpy_and_torch_draws():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2])
