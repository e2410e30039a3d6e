"""Experiment trackers: TRL's metric names, validation, and TensorBoard events read back."""

from __future__ import annotations

import pytest
from conftest import preference_rows, write_jsonl

from prefcache.training.config import TrainConfig
from prefcache.training.trackers import parse_report_to, trl_metrics


def test_report_to_is_validated():
    assert parse_report_to("none") == () and parse_report_to(None) == ()
    assert parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")
    with pytest.raises(ValueError, match="unknown tracker mlflow"):
        parse_report_to("mlflow")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")
    assert TrainConfig(data="d", out="o", cache="c", report_to="tensorboard").report_to == ("tensorboard",)


def test_metric_names_are_trls():
    row = {"step": 3, "split": "train", "epoch": 0.5, "loss": 0.6, "rewards_chosen": 0.1, "rewards_rejected": -0.1,
           "rewards_margins": 0.2, "rewards_accuracies": 1.0, "logps_chosen": -5.0, "logps_rejected": -6.0,
           "lr": 1e-3, "grad_norm": 2.0, "time_s": 1.0, "n": 4, "tokens_per_s": None}
    assert trl_metrics(row, "train") == {
        "loss": 0.6, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2,
        "rewards/accuracies": 1.0, "logps/chosen": -5.0, "logps/rejected": -6.0, "learning_rate": 1e-3,
        "grad_norm": 2.0, "epoch": 0.5}
    assert trl_metrics({"loss": 0.7, "rewards_margins": 0.0}, "eval") == {"eval_loss": 0.7, "eval_rewards/margins": 0.0}


def test_tensorboard_events_hold_the_parquet_metrics(tmp_path, tiny_model, one_thread):
    import polars as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(12))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               progress=False)
    out = tmp_path / "run"
    train(data=str(data), cache=str(tmp_path / "cache"), model=str(tiny_model), out=str(out), max_steps=2,
          batch_size=4, lr=1e-3, warmup_steps=0, eval_fraction=0.25, progress=False, report_to="tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "learning_rate", "grad_norm"):
        assert f"train/{name}" in tags, name
    assert {"eval/loss", "eval/rewards/margins", "eval/logps/chosen"} <= tags
    steps = pl.read_parquet(f"{out}/logs/steps-*.parquet")
    for split, tag, col in (("train", "train/loss", "loss"), ("train", "train/learning_rate", "lr"),
                            ("eval", "eval/rewards/margins", "rewards_margins")):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        parquet = dict(steps.filter(pl.col("split") == split).select("step", col).iter_rows())
        assert logged.keys() == parquet.keys(), tag
        for step, value in parquet.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert sorted(logged) == [0, 2]  # eval at step 0 (the baseline) and at the end


def test_a_resumed_run_purges_the_tensorboard_events_logged_after_its_checkpoint(tmp_path, tiny_model, one_thread):
    """Killed after step 4 was logged but before its checkpoint: the resume from step 2 logs steps 3 and 4
    again, and TensorBoard shows each step once, with the resumed values (another lr, so they differ). The
    eval at step 2, logged before the checkpoint and not repeated, stays."""
    import shutil

    import polars as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(12))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               progress=False)
    out = tmp_path / "run"
    common = {"data": str(data), "cache": str(tmp_path / "cache"), "model": str(tiny_model), "out": str(out),
              "max_steps": 4, "save_every": 2, "eval_every": 2, "batch_size": 4, "warmup_steps": 0,
              "eval_fraction": 0.25, "progress": False, "report_to": "tensorboard"}
    train(**common, lr=1e-3)
    first = EventAccumulator(str(out / "tensorboard"))
    first.Reload()
    before = {e.step: e.value for e in first.Scalars("train/loss")}
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed after step 4 was logged
    train(**common, lr=5e-2, resume=True)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = pl.read_parquet(f"{out}/logs/steps-*.parquet")
    for split, tag in (("train", "train/loss"), ("eval", "eval/loss")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        parquet = steps.filter(pl.col("split") == split).sort("step").select("step", "loss").rows()
        assert [s for s, _ in logged] == [s for s, _ in parquet], tag  # each step once
        for (step, value), (_, expected) in zip(logged, parquet, strict=True):
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-7), (tag, step)
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]
    after = {e.step: e.value for e in events.Scalars("train/loss")}
    assert after[1] == before[1] and after[2] == before[2] and after[4] != before[4]  # step 4 is the resumed one


def test_a_resume_keeps_the_runs_trackers_unless_told_otherwise(tmp_path, tiny_model, one_thread):
    import yaml
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefcache.cli import main
    from prefcache.reference.shards import precompute

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(12))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               progress=False)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--cache", str(tmp_path / "cache"), "--model", str(tiny_model), "--out",
            str(out), "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress"]

    def train_steps(*extra) -> list[int]:
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        return sorted(e.step for e in events.Scalars("train/loss"))

    assert train_steps("--max-steps", "1", "--report-to", "tensorboard") == [1]
    assert train_steps("--max-steps", "2", "--resume") == [1, 2]  # no --report-to: the run's trackers
    assert yaml.safe_load((out / "config.yaml").read_text())["report_to"] == ["tensorboard"]
    assert train_steps("--max-steps", "3", "--resume", "--report-to", "none") == [1, 2]  # said otherwise: off
    assert yaml.safe_load((out / "config.yaml").read_text())["report_to"] == []
