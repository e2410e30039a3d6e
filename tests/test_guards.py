"""NaN guards, option validation, the auto policy, the recomputed schedule and run-directory refusals."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import ENV, pairs_run_setup, poison_gradient, poison_value, steps, train_run
from safetensors.torch import load_file

from prefcache.cache.store import CacheError, shard_paths
from prefcache.training.config import TrainConfig
from prefcache.training.guards import NonFiniteError, resolve_finetune
from prefcache.training.schedule import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    return pairs_run_setup(tmp_path_factory.mktemp("guards"), tiny_model, 16, shard_size=8)


def run(setup, out, **kw):
    return train_run(setup, out, **{"max_steps": 2, "batch_size": 4, **kw})


def copy_cache(setup, dst: Path) -> Path:
    shutil.copytree(setup["cache"], dst)
    return dst


# -- options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("beta", math.nan), ("beta", math.inf), ("lr", math.nan), ("lr", math.inf), ("lr", -1e-3),
    ("label_smoothing", 2.0), ("label_smoothing", math.nan), ("warmup_steps", -3), ("weight_decay", -1.0),
    ("weight_decay", math.nan), ("simpo_gamma", math.nan), ("max_grad_norm", math.nan), ("discopop_tau", math.inf),
    ("lora_alpha", math.nan), ("warmup_ratio", math.nan), ("loss_weights", (math.nan,)), ("device", "tpu9"),
])
def test_every_float_option_is_finite_and_in_range(option, value):
    with pytest.raises(ValueError, match=option.rstrip("s").replace("loss_weight", "loss weight")):
        TrainConfig(data="d", out="o", cache="c", **{option: value})


def test_bad_option_writes_nothing_and_refusals_need_no_torch(setup, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "prefcache", "train", "--data", str(setup["data"]), "--cache", str(setup["cache"]),
            "--out", str(out)]
    r = subprocess.run(base + ["--lr", "nan"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0 and "lr must be positive and finite" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = subprocess.run(base + ["--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0 and "--resume" in r.stderr and "does not exist" in r.stderr
    assert not out.exists()


def test_resume_of_an_empty_directory_is_refused(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no run"):
        run(setup, tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="does not exist"):
        run(setup, tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists() and list((tmp_path / "empty").iterdir()) == []


# -- the cache's values -------------------------------------------------------------------------------

def test_a_nan_reference_value_is_refused_naming_the_pair(setup, tmp_path):
    cache = copy_cache(setup, tmp_path / "cache")
    bad_id = poison_value(cache, "chosen_logps")
    with pytest.raises(CacheError, match=f"non-finite reference values.*{bad_id}"):
        run(setup, tmp_path / "run", cache=str(cache))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_copied_shard_duplicate_ids_is_refused(setup, tmp_path):
    cache = copy_cache(setup, tmp_path / "cache")
    first = shard_paths(cache)[0]
    shutil.copy(first, first.with_name("part-r000-000099.parquet"))
    with pytest.raises(CacheError, match="duplicate rows"):
        run(setup, tmp_path / "run", cache=str(cache))


def test_a_non_finite_loss_stops_at_its_step_keeping_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    from prefcache.losses.combine import Objective

    real = Objective.__call__
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the first micro-batch of step 3
            result.losses[0] = math.nan
            return result._replace(loss=result.losses.mean())
        return result

    monkeypatch.setattr(Objective, "__call__", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss on pair"):
        run(setup, out, max_steps=4, save_every=1)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-000001", "step-000002"]
    for name in saved:
        assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / name / "adapter_model.safetensors").values())


def test_a_non_finite_gradient_stops_the_run(setup, tmp_path, monkeypatch):
    seen = poison_gradient(monkeypatch, at_backward=3)  # step 3 (one micro-batch a step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 3: non-finite gradient"):
        run(setup, out, max_steps=4, save_every=1)
    assert seen["n"] == 3
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-000001", "step-000002"]
    for name in saved:
        assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / name / "adapter_model.safetensors").values())


# -- the policy that made the cache -------------------------------------------------------------------

def test_auto_finetune_is_the_policy_that_made_the_cache():
    assert resolve_finetune("auto", {"quantization": "4bit"}) == ("qlora", None)
    assert resolve_finetune("auto", {"quantization": "fp32"}, "cpu") == ("lora", None)
    assert resolve_finetune("lora", {"quantization": "fp32"}, "cpu") == ("lora", None)
    assert resolve_finetune("full", {"quantization": "fp32"}, "cpu") == ("full", None)
    finetune, warning = resolve_finetune("lora", {"quantization": "4bit"}, "cpu")
    assert finetune == "lora" and "fp32" in warning and "4bit" in warning and "qlora" in warning
    assert resolve_finetune("auto", None) == ("lora", None)


def test_run_records_the_resolved_policy_and_the_step0_margin(setup, tmp_path, capsys):
    result = run(setup, tmp_path / "run", max_steps=1)
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["finetune"] == "lora" and abs(result["step0_margin"]) < 1e-5
    assert "step 0 margin" in capsys.readouterr().err


# -- the schedule ---------------------------------------------------------------------------------------

def test_warmup_starts_above_zero_and_the_last_step_learns():
    assert lr_factor(0, 10, 3, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 3, "cosine") == 1.0
    assert lr_factor(0, 1, 1, "cosine") == 1.0  # --max-steps 1 with the default warm-up ratio
    assert 0 < lr_factor(9, 10, 0, "cosine") < 0.1
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(5, 10, 2, "constant") == 1.0
    # without warm-up, transformers' values
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, 0, 7)
    assert [hf.lr_lambdas[0](d) for d in range(7)] == pytest.approx([lr_factor(d, 7, 0, "cosine") for d in range(7)])


def test_one_step_with_the_default_warmup_learns(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, max_steps=1, warmup_steps=None)
    assert steps(out).filter(pl.col("split") == "train")["lr"].to_list() == [pytest.approx(1e-3)]
    weights = load_file(out / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    assert any(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_B" in k)


def test_extending_a_finished_run_recomputes_the_schedule(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, max_steps=4)
    run(setup, out, max_steps=5, resume=True)
    lr = steps(out).filter(pl.col("split") == "train")["lr"].to_list()
    assert len(lr) == 5 and lr[4] > 0
    a = load_file(out / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    b = load_file(out / "checkpoints" / "step-000005" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
