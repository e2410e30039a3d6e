"""KTO and unpaired APO-zero: hand-worked losses, TRL's formulas, the step-0 invariant, a training run."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import preference_rows, write_jsonl
from torch.testing import assert_close

from prefcache.cli import main
from prefcache.losses.unpaired import apo_zero_unpaired, kl_estimate, kto
from prefcache.training.config import TrainConfig


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Δ = π - ref per example; labels: desirable, undesirable, desirable.
DELTA, LABELS, BETA = t([2.0, -1.0, 0.5]), torch.tensor([True, False, True]), 0.1


def test_kto_worked_by_hand():
    out = kto(DELTA, t([0.0, 0.0, 0.0]), LABELS, 0.5, beta=BETA)
    # desirable: 1 - σ(0.1 (2 - 0.5)) = 1 - σ(0.15); undesirable: 1 - σ(0.1 (0.5 + 1)) = 1 - σ(0.15);
    # desirable at Δ = z: 1 - σ(0) = 0.5
    assert_close(out.losses, t([0.4625701546562504, 0.4625701546562504, 0.5]))
    assert_close(out.rewards, BETA * DELTA)
    weighted = kto(DELTA, t([0.0] * 3), LABELS, 0.5, beta=BETA, desirable_weight=2.0, undesirable_weight=0.5)
    assert_close(weighted.losses, t([2 * 0.4625701546562504, 0.5 * 0.4625701546562504, 1.0]))


def test_apo_zero_unpaired_worked_by_hand():
    out = apo_zero_unpaired(DELTA, t([0.0] * 3), LABELS, beta=BETA)
    # desirable 1 - σ(0.2), undesirable σ(-0.1), desirable 1 - σ(0.05); no KL term
    assert_close(out.losses, t([0.45016600268752205, 0.47502081252106, 0.48750260351578967]))


def test_kl_estimate_is_the_clamped_batch_mean_without_gradient():
    policy = t([-10.0, -12.0, -9.0]).requires_grad_()
    assert_close(kl_estimate(policy, t([-11.0, -11.0, -11.0])), t(2 / 3))  # mean(1, -1, 2)
    assert not kl_estimate(policy, t([-11.0] * 3)).requires_grad
    assert kl_estimate(t([-12.0, -12.0]), t([-11.0, -11.0])).item() == 0.0  # a negative estimate is clamped


def test_step_zero_invariant_policy_equals_reference():
    ref = t([-7.0, -3.0, -12.5, -1.0])
    labels = torch.tensor([True, False, False, True])
    kl = kl_estimate(t([-20.0, -4.0, -8.0, -6.0]), t([-20.0, -4.0, -8.0, -6.0]))
    assert kl.item() == 0.0
    out = kto(ref.clone(), ref, labels, kl, beta=0.3)
    assert_close(out.losses, t([0.5] * 4))
    assert_close(out.rewards, t([0.0] * 4))


def test_gradient_raises_desirable_and_lowers_undesirable():
    for fn in (kto, apo_zero_unpaired):
        policy = t([-5.0, -5.0]).requires_grad_()
        fn(policy, t([-5.0, -5.0]), torch.tensor([True, False]), 0.0, beta=BETA).losses.sum().backward()
        assert policy.grad[0] < 0 < policy.grad[1], fn.__name__


def test_against_trl_kto_trainer_code():
    g = torch.Generator().manual_seed(0)
    policy, ref = -30 * torch.rand(2, 10, generator=g, dtype=torch.float64)
    labels = torch.rand(10, generator=g) > 0.4
    kl = torch.tensor(0.7, dtype=torch.float64)
    beta, wd, wu = 0.2, 1.5, 0.8
    # TRL 1.16 KTOTrainer._compute_loss: chosen then rejected losses, concatenated, nanmean
    chosen_idx, rejected_idx = labels.nonzero().view(-1), (~labels).nonzero().view(-1)
    chosen = 1 - F.sigmoid(beta * ((policy - ref)[chosen_idx] - kl))
    rejected = 1 - F.sigmoid(beta * (kl - (policy - ref)[rejected_idx]))
    trl = torch.cat((wd * chosen, wu * rejected), 0).nanmean()
    ours = kto(policy, ref, labels, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert_close(ours.losses.mean(), trl)


def test_config_accepts_unpaired_losses_alone():
    assert TrainConfig(data="d", out="o", cache="c", loss="kto").loss == ("kto",)
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainConfig(data="d", out="o", cache="c", loss="kto,sigmoid")
    with pytest.raises(ValueError, match="needs the reference cache"):
        TrainConfig(data="d", out="o", loss="kto")
    with pytest.raises(ValueError, match="desirable_weight must be positive"):
        TrainConfig(data="d", out="o", cache="c", loss="kto", desirable_weight=0)


def test_kto_training_run_from_paired_data(tmp_path, tiny_model):
    """precompute --unpaired on pairs, then train --loss kto: step 1 (the step-0 policy) has kl 0, loss 0.5."""
    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    runner = CliRunner()
    result = runner.invoke(main, ["precompute", "--data", str(data), "--out", str(tmp_path / "cache"), "--model",
                                  str(tiny_model), "--max-length", "48", "--quantize", "fp32", "--unpaired",
                                  "--kl-group-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "16 examples scored" in result.output
    result = runner.invoke(main, ["train", "--data", str(data), "--cache", str(tmp_path / "cache"), "--model",
                                  str(tiny_model), "--out", str(tmp_path / "run"), "--loss", "kto", "--max-steps", "2",
                                  "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0", "--eval-fraction", "0.25",
                                  "--undesirable-weight", "1.0", "--no-progress"])
    assert result.exit_code == 0, result.output
    steps = pl.read_parquet(f"{tmp_path}/run/logs/steps-*.parquet")
    first = steps.filter((pl.col("split") == "train") & (pl.col("step") == 1)).row(0, named=True)
    base = steps.filter((pl.col("split") == "eval") & (pl.col("step") == 0)).row(0, named=True)
    for row in (first, base):
        assert row["loss"] == pytest.approx(0.5, abs=1e-6)
        assert row["kl"] == pytest.approx(0.0, abs=1e-6)
        assert abs(row["rewards_chosen"] or 0) < 1e-6 and abs(row["rewards_rejected"] or 0) < 1e-6
    last = steps.filter((pl.col("split") == "train") & (pl.col("step") == 2)).row(0, named=True)
    assert last["loss"] != pytest.approx(0.5, abs=1e-6)  # it learned something
    examples = pl.read_parquet(f"{tmp_path}/run/logs/examples-*.parquet")
    train2 = examples.filter((pl.col("split") == "train") & (pl.col("step") == 2))
    # desirable examples fill the chosen columns, undesirable ones the rejected columns
    assert (train2["reward_chosen"].is_null() != train2["reward_rejected"].is_null()).all()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["result"]["steps"] == 2 and info["train_examples"] == 12 and info["eval_examples"] == 4
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "adapter_model.safetensors").exists()


def test_kto_refuses_a_micro_batch_of_one(tmp_path):
    from prefcache.training.loop import train

    with pytest.raises(ValueError, match="batch-size must be at least 2"):
        train(data="d.jsonl", cache=str(tmp_path), out=str(tmp_path / "run"), loss="kto", batch_size=1)


def test_kto_resume_reaches_the_same_weights(tmp_path, tiny_model):
    from safetensors.torch import load_file

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               unpaired=True, kl_group_size=4, progress=False)
    common = {"data": str(data), "cache": str(tmp_path / "cache"), "model": str(tiny_model), "loss": "kto",
              "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "save_every": 2, "lora_dropout": 0.1, "progress": False,
              "scheduler": "constant"}  # a shorter first run must not change the schedule of its steps
    train(out=str(tmp_path / "straight"), max_steps=4, **common)
    train(out=str(tmp_path / "resumed"), max_steps=2, **common)
    result = train(out=str(tmp_path / "resumed"), max_steps=4, resume=True, **common)
    assert result["resumed_from"].endswith("step-000002") and result["steps"] == 4
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [pl.read_parquet(f"{tmp_path}/{r}/logs/steps-*.parquet").sort("step") for r in ("straight", "resumed")]
    assert steps[0]["step"].to_list() == steps[1]["step"].to_list() == [1, 2, 3, 4]  # no step logged twice
    assert_close(t(steps[0]["loss"].to_list()), t(steps[1]["loss"].to_list()))


def test_two_process_kto_equals_one_process(tmp_path, tiny_model):
    """torchrun: each rank takes every other example; KL means are averaged over ranks before the clamp, so two
    ranks of 2 examples per step reach the weights of one process of 4."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    torch.set_num_threads(1)
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=48, quantize="fp32",
               unpaired=True, kl_group_size=4, progress=False)
    args = ["--data", str(data), "--cache", str(tmp_path / "cache"), "--model", str(tiny_model), "--loss", "kto",
            "--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "0", "--eval-fraction", "0.25", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29547", "-m", "prefcache", "train", *args, "--out", str(tmp_path / "ddp"), "--batch-size", "2",
                          "--eval-batch-size", "4"],  # rank 0 evaluates in the batches of the single process
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    train(data=str(data), cache=str(tmp_path / "cache"), model=str(tiny_model), loss="kto", max_steps=3, lr=1e-2,
          warmup_steps=0, eval_fraction=0.25, progress=False, out=str(tmp_path / "single"), batch_size=4)
    a = load_file(tmp_path / "ddp" / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    b = load_file(tmp_path / "single" / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    d, s = (pl.read_parquet(f"{tmp_path}/{r}/logs/steps-*.parquet").sort("split", "step") for r in ("ddp", "single"))
    assert d["step"].to_list() == s["step"].to_list()
    torch.testing.assert_close(d["loss"].to_torch(), s["loss"].to_torch(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d["kl"].to_torch(), s["kl"].to_torch(), rtol=1e-5, atol=1e-6)
    assert (d.filter(pl.col("split") == "train")["kl"] > 0).any()  # a KL that is not clamped to 0 was compared
