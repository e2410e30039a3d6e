"""KTO and unpaired APO-zero: hand-worked losses, TRL's formulas, the step-0 invariant, a training run."""

from __future__ import annotations

import json
import math
import shutil

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import (
    ENV,
    adapter,
    examples,
    free_port,
    poison_gradient,
    poison_value,
    preference_rows,
    refuse_before_torch,
    run_files,
    steps,
    train_run,
    write_jsonl,
)
from torch.testing import assert_close

from prefcache.cache.store import CacheError, shard_paths
from prefcache.cli import main
from prefcache.losses.unpaired import apo_zero_unpaired, kl_estimate, kto
from prefcache.training.config import TrainConfig
from prefcache.training.guards import NonFiniteError
from prefcache.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


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


# ---- training runs on an unpaired cache -----------------------------------------------------------------

@pytest.fixture(scope="module")
def unpaired(tmp_path_factory, tiny_model):
    """8 pairs unpaired into 16 examples, and their fp32 unpaired cache (KL groups of 4) from the tiny model."""
    root = tmp_path_factory.mktemp("kto")
    data = write_jsonl(root / "d.jsonl", preference_rows(8))
    result = CliRunner().invoke(main, ["precompute", "--data", str(data), "--out", str(root / "cache"), "--model",
                                       str(tiny_model), "--max-length", "48", "--quantize", "fp32", "--unpaired",
                                       "--kl-group-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "16 examples scored" in result.output
    return {"root": root, "data": data, "cache": root / "cache", "model": tiny_model}


def run(unpaired, out, **kw) -> dict:
    return train_run(unpaired, out, **{"loss": "kto", "max_steps": 2, "batch_size": 4, "lr": 1e-2, **kw})


def test_kto_training_run_from_paired_data(unpaired, tmp_path):
    """train --loss kto on the unpaired cache: step 1 (the step-0 policy, LoRA = reference) has kl 0, loss 0.5
    and every example's reward 0, to float rounding."""
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--data", str(unpaired["data"]), "--cache", str(unpaired["cache"]),
                                  "--model", str(unpaired["model"]), "--out", str(tmp_path / "run"), "--loss", "kto",
                                  "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0",
                                  "--eval-fraction", "0.25", "--undesirable-weight", "1.0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "kl" in result.output and "(4 examples)" in result.output
    s, e = steps(tmp_path / "run"), examples(tmp_path / "run")
    first = s.filter((pl.col("split") == "train") & (pl.col("step") == 1)).row(0, named=True)
    base = s.filter((pl.col("split") == "eval") & (pl.col("step") == 0)).row(0, named=True)
    for row, split, step in ((first, "train", 1), (base, "eval", 0)):
        assert row["loss"] == pytest.approx(0.5, abs=1e-6)
        assert row["kl"] == pytest.approx(0.0, abs=1e-6)
        rows = e.filter((pl.col("split") == split) & (pl.col("step") == step))
        desirable = rows["reward_chosen"].is_not_null()
        assert (desirable != rows["reward_rejected"].is_not_null()).all()  # each example on exactly one side
        # a side's mean is null exactly when no example of that label is in the batch, else 0 (no `or 0`)
        for side, present in (("rewards_chosen", desirable.any()), ("rewards_rejected", (~desirable).any())):
            assert (row[side] is not None) == present, side
            if present:
                assert abs(row[side]) < 1e-6, side
        rewards = pl.concat([rows["reward_chosen"].drop_nulls(), rows["reward_rejected"].drop_nulls()])
        assert rewards.len() == rows.height and rewards.abs().max() < 1e-6
    last = s.filter((pl.col("split") == "train") & (pl.col("step") == 2)).row(0, named=True)
    assert last["loss"] != pytest.approx(0.5, abs=1e-6)  # it learned something
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["result"]["steps"] == 2 and info["train_examples"] == 12 and info["eval_examples"] == 4
    assert info["prefix_sharing"] is True  # as the cache was made (unpaired caches are packed by default)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "adapter_model.safetensors").exists()


def test_score_says_unpaired_runs_are_not_supported_yet_before_torch(unpaired, tmp_path):
    run(unpaired, tmp_path / "run")
    argv = ["score", str(tmp_path / "run"), "--cache", str(unpaired["cache"]), "--data", str(unpaired["data"])]
    result = CliRunner().invoke(main, argv)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "unpaired (KTO) cache: scoring unpaired runs and examples is not supported yet" in lines[0]
    assert "need a cache of pairs" not in lines[0]
    out = refuse_before_torch(*argv)
    assert "not supported yet" in out and "torch loaded: False" in out, out


@pytest.mark.parametrize("label", [True, False])
def test_kto_on_one_side_only_warns_that_the_other_is_empty(tmp_path, tiny_model, label):
    rows = [{"prompt": f"Question {i}:", "completion": f" answer number {i}", "label": label} for i in range(4)]
    data = write_jsonl(tmp_path / "u.jsonl", rows)
    common = ["--data", str(data), "--model", str(tiny_model), "--max-length", "48", "--no-progress"]
    runner = CliRunner()
    assert runner.invoke(main, ["precompute", *common, "--out", str(tmp_path / "cache"), "--unpaired",
                                "--quantize", "fp32"]).exit_code == 0
    result = runner.invoke(main, ["train", *common[:4], "--no-progress", "--cache", str(tmp_path / "cache"),
                                  "--out", str(tmp_path / "run"), "--loss", "kto", "--max-steps", "1",
                                  "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    has, lacks, empty = ("desirable", "undesirable", "rejected") if label else ("undesirable", "desirable", "chosen")
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert f"all {has} (no {lacks} ones)" in warnings[0] and f"rewards_{empty} and rewards_margins" in warnings[0]
    assert steps(tmp_path / "run")[f"rewards_{empty}"].is_null().all()  # what the warning is about


def test_kto_refuses_a_micro_batch_of_one(tmp_path):
    with pytest.raises(ValueError, match="batch-size must be at least 2"):
        train(data="d.jsonl", cache=str(tmp_path), out=str(tmp_path / "run"), loss="kto", batch_size=1)


@pytest.mark.parametrize("column", ["logps", "kl_logps"])
def test_a_nan_reference_value_in_an_unpaired_cache_is_refused(unpaired, tmp_path, column):
    """The loop of before trained NaN weights and exited 0 on this cache."""
    cache = shutil.copytree(unpaired["cache"], tmp_path / "cache")
    bad_id = poison_value(cache, column)
    with pytest.raises(CacheError, match=f"non-finite reference values for the training examples.*{bad_id}.*{column}"):
        run(unpaired, tmp_path / "run", cache=str(cache))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_copied_shard_of_an_unpaired_cache_is_refused(unpaired, tmp_path):
    cache = shutil.copytree(unpaired["cache"], tmp_path / "cache")
    first = shard_paths(cache)[0]
    shutil.copy(first, first.with_name("part-r000-000099.parquet"))
    with pytest.raises(CacheError, match="duplicate rows"):
        run(unpaired, tmp_path / "run", cache=str(cache))


def test_kto_resolves_the_model_at_its_revision(unpaired, tmp_path, monkeypatch):
    import prefcache.training.loop as loop

    asked = []

    def resolve(model, revision=None):
        asked.append((model, revision))
        raise RuntimeError("resolved")

    monkeypatch.setattr(loop, "resolve_model", resolve)
    with pytest.raises(RuntimeError, match="resolved"):
        run(unpaired, tmp_path / "run", model="org/policy", revision="v2")
    assert asked == [("org/policy", "v2")]


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # building the CUDA context on a CPU machine says so
def test_autocast_is_bf16_on_cuda_only_when_asked():
    from contextlib import nullcontext

    from prefcache.training.task import autocast_for

    cuda = autocast_for("cuda:0", True)
    assert isinstance(cuda, torch.autocast) and cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16
    assert isinstance(autocast_for("cuda", False), nullcontext)
    assert isinstance(autocast_for("cpu", True), nullcontext)  # CPU runs fp32


def test_kto_steps_are_length_grouped_reseeded_per_rank_and_autocast(unpaired, tmp_path, tokenizer, monkeypatch):
    """The one loop's order, seed and autocast for unpaired examples (the loop of before had none of them)."""
    import prefcache.training.loop as loop
    import prefcache.training.task as task
    from prefcache.data.unpaired import load_unpaired
    from prefcache.training.checkpoint import load_trainer_state
    from prefcache.training.state import epoch_order

    seeds, casts = [], []
    real_cast = task.autocast_for
    monkeypatch.setattr(loop, "seed_rank", lambda seed, rank: seeds.append((seed, rank)) or torch.manual_seed(seed + rank))
    monkeypatch.setattr(task, "autocast_for", lambda device, bf16: casts.append((device, bf16)) or real_cast(device, bf16))
    result = run(unpaired, tmp_path / "run", batch_size=2, max_steps=2, seed=5)
    assert seeds == [(5, 0)] and casts == [("cpu", True)] * 2  # one forward per step, under the autocast choice
    items, _, _ = load_unpaired(unpaired["data"], tokenizer, 48, unpair=True)
    lengths = [len(i.prompt_ids) + len(i.completion_ids) for i in items]
    grouped, plain = epoch_order(16, 5, 0, 0, 1, lengths, 2), epoch_order(16, 5, 0, 0, 1)
    logged = examples(tmp_path / "run").filter(pl.col("split") == "train").sort("step")
    for step in (1, 2):
        want = {items[i].id for i in grouped[2 * (step - 1) : 2 * step]}
        assert set(logged.filter(pl.col("step") == step)["id"]) == want
    # the check can tell the orders apart: random batches would have shown other examples at these steps
    assert any(set(plain[2 * k : 2 * k + 2]) != set(grouped[2 * k : 2 * k + 2]) for k in (0, 1))
    assert load_trainer_state(result["final_checkpoint"])["group_by_length"] is True


def test_kto_stops_at_a_non_finite_gradient(unpaired, tmp_path, monkeypatch):

    poison_gradient(monkeypatch, at_backward=2)
    with pytest.raises(NonFiniteError, match="step 2: non-finite gradient .* from examples"):
        run(unpaired, tmp_path / "run", max_steps=3, save_every=1)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000001"]
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path / "run" / "checkpoints" / "step-000001").values())


def test_kto_resume_reaches_the_same_weights(unpaired, tmp_path):
    common = {"save_every": 2, "lora_dropout": 0.1,
              "scheduler": "constant"}  # a shorter first run must not change the schedule of its steps
    run(unpaired, tmp_path / "straight", max_steps=4, **common)
    run(unpaired, tmp_path / "resumed", max_steps=2, **common)
    result = run(unpaired, tmp_path / "resumed", max_steps=4, resume=True, **common)
    assert result["resumed_from"].endswith("step-000002") and result["steps"] == 4
    a = adapter(tmp_path / "straight" / "checkpoints" / "step-000004")
    b = adapter(tmp_path / "resumed" / "checkpoints" / "step-000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = [steps(tmp_path / r) for r in ("straight", "resumed")]
    assert s[0]["step"].to_list() == s[1]["step"].to_list() == [1, 2, 3, 4]  # no step logged twice
    assert_close(t(s[0]["loss"].to_list()), t(s[1]["loss"].to_list()))


def test_an_unpaired_checkpoint_of_the_loop_of_before_resumes_with_its_random_batches(unpaired, tmp_path):
    """State version 1 (the separate KTO loop) recorded group_by_length False: it resumes, not refused."""
    from prefcache.training.checkpoint import checkpoint_dir, load_trainer_state

    out = tmp_path / "run"
    run(unpaired, out, max_steps=1)
    path = checkpoint_dir(out, 1) / "trainer_state.pt"
    state = load_trainer_state(path.parent)
    torch.save({**state, "version": 1, "group_by_length": False}, path)
    result = run(unpaired, out, max_steps=2, resume=True)
    assert result["steps"] == 2 and json.loads((out / "run.json").read_text())["group_by_length"] is False
    assert load_trainer_state(result["final_checkpoint"])["group_by_length"] is False
    run(unpaired, tmp_path / "new", max_steps=1)
    with pytest.raises(ValueError, match="group_by_length: checkpoint has True, now False"):  # new states: pairs' rule
        run(unpaired, tmp_path / "new", max_steps=2, resume=True, group_by_length=False)


def test_kto_resume_refuses_another_loss_or_other_examples(unpaired, tmp_path):
    out = tmp_path / "run"
    run(unpaired, out, max_steps=1)
    before = run_files(out)
    with pytest.raises(ValueError, match=r"cannot resume with another loss.*\n  loss: checkpoint has \['kto'\], now "
                                         r"\['apo_zero_unpaired'\]"):
        run(unpaired, out, max_steps=2, resume=True, loss="apo_zero_unpaired")
    data2 = write_jsonl(tmp_path / "d2.jsonl", preference_rows(8, seed=1))  # as many examples, other ones
    made = CliRunner().invoke(main, ["precompute", "--data", str(data2), "--out", str(tmp_path / "cache2"), "--model",
                                     str(unpaired["model"]), "--max-length", "48", "--quantize", "fp32", "--unpaired",
                                     "--kl-group-size", "4", "--no-progress"])
    assert made.exit_code == 0, made.output
    with pytest.raises(ValueError, match=r"cannot resume with other settings:\n  data \(the training examples"):
        run(unpaired, out, max_steps=2, resume=True, data=str(data2), cache=str(tmp_path / "cache2"))
    assert run_files(out) == before
    assert run(unpaired, out, max_steps=2, resume=True)["steps"] == 2  # the run's own loss and examples


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_process_kto_equals_one_process(unpaired, tmp_path, sharding):
    """torchrun: each rank takes every other example; KL means are averaged over ranks before the clamp, so two
    ranks of 2 examples per step reach the weights of one process of 4, data-parallel or sharded (--fsdp: the KL
    and held-out passes go through the sharded module too)."""
    import subprocess
    import sys

    args = ["--data", str(unpaired["data"]), "--cache", str(unpaired["cache"]), "--model", str(unpaired["model"]),
            "--loss", "kto", "--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "0", "--eval-fraction", "0.25",
            "--no-progress", *sharding]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "prefcache", "train", *args, "--out", str(tmp_path / "ddp"),
                          "--batch-size", "2",
                          "--eval-batch-size", "4"],  # rank 0 evaluates in the batches of the single process
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    run(unpaired, tmp_path / "single", max_steps=3, eval_fraction=0.25, batch_size=4)
    a = adapter(tmp_path / "ddp" / "checkpoints" / "step-000003")
    b = adapter(tmp_path / "single" / "checkpoints" / "step-000003")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    d, s = steps(tmp_path / "ddp"), steps(tmp_path / "single")
    assert d["step"].to_list() == s["step"].to_list()
    torch.testing.assert_close(d["loss"].to_torch(), s["loss"].to_torch(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d["kl"].to_torch(), s["kl"].to_torch(), rtol=1e-5, atol=1e-6)
    assert (d.filter(pl.col("split") == "train")["kl"] > 0).any()  # a KL that is not clamped to 0 was compared


# ---- prefix sharing: [prompt | completion | KL completion] ----------------------------------------------

def _shared_and_unshared(model, items, kl_seqs, pad_id):
    """unpaired_logps both ways with gradients on; returns (results, gradients of Σ completion + Σ KL)."""
    from prefcache.model.pairs import unpaired_logps

    results, grads = [], []
    for sharing in (True, False):
        model.zero_grad()
        pol = unpaired_logps(model, items, kl_seqs, pad_id=pad_id, prefix_sharing=sharing)
        assert pol.completion.requires_grad and not pol.kl.requires_grad  # TRL: no gradient through the KL term
        # were the KL values attached, the packed path would add their gradient here
        (pol.completion.sum() + pol.kl.sum()).backward()
        results.append(pol)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return results, grads


@pytest.mark.parametrize("truncation, max_length", [("keep_start", 48), ("keep_end", 20)])
def test_shared_and_unshared_unpaired_logps_agree(unpaired, tokenizer, truncation, max_length):
    """<= 1e-4 nats per summed sequence, with the same gradients; under keep_end a KL prompt cut otherwise
    than the example's gets a row of its own."""
    from transformers import AutoModelForCausalLM

    from prefcache.data.unpaired import kl_partners, kl_sequence, load_unpaired

    model = AutoModelForCausalLM.from_pretrained(unpaired["model"], dtype=torch.float32, attn_implementation="sdpa")
    items, _, _ = load_unpaired(unpaired["data"], tokenizer, max_length, truncation, "skip", unpair=True)
    by_id, partners = {i.id: i for i in items}, kl_partners([i.id for i in items], 4)
    kl_seqs = [kl_sequence(i, by_id[partners[i.id]], max_length, truncation) for i in items]
    apart = sum(list(p) != list(i.prompt_ids) for (p, _), i in zip(kl_seqs, items, strict=True))
    assert (apart > 0) == (truncation == "keep_end")  # the fallback is exercised where it exists
    (shared, two), (g_shared, g_two) = _shared_and_unshared(model, items, kl_seqs, tokenizer.pad_token_id)
    assert shared.n_positions < two.n_positions  # the packed path really ran
    assert_close(shared.completion, two.completion, atol=1e-4, rtol=0)
    assert_close(shared.kl, two.kl, atol=1e-4, rtol=0)
    assert g_shared.keys() == g_two.keys()
    for name in g_two:
        scale = g_two[name].abs().max().item()
        assert_close(g_shared[name], g_two[name], atol=1e-4 * max(scale, 1e-6), rtol=0, msg=name)


def test_kto_with_prefix_sharing_starts_at_its_invariant(unpaired, tmp_path, caplog):
    """Forced off on a packed cache: warned, and step 0 (eval at 0, train step 1) still has loss 0.5 and kl 0, to
    the ~1e-5 nats the two paths differ by, times beta."""
    import logging

    with caplog.at_level(logging.WARNING, logger="prefcache"):
        run(unpaired, tmp_path / "run", prefix_sharing=False, max_steps=1, eval_fraction=0.25)
    assert any("cache was made with prefix sharing, training runs without it" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["prefix_sharing"] is False
    at_start = steps(tmp_path / "run").filter(pl.col("step") == (pl.col("split") == "train").cast(pl.Int64))
    assert at_start.select("split", "step").rows() == [("eval", 0), ("train", 1)]
    for row in at_start.iter_rows(named=True):
        assert row["loss"] == pytest.approx(0.5, abs=1e-5) and row["kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_kto_trains_with_finite_numbers(unpaired, tmp_path):
    """The autocast path itself (bf16 on CUDA), packed and not: finite losses, KL and weights."""
    for sharing in (False, True):
        out = tmp_path / f"run-{sharing}"
        result = run(unpaired, out, device="cuda", bf16=True, max_steps=3, prefix_sharing=sharing)
        s = steps(out).filter(pl.col("split") == "train")
        assert s.height == 3 and all(math.isfinite(v) for v in s["loss"]) and all(math.isfinite(v) for v in s["kl"])
        assert all(torch.isfinite(v).all() for v in adapter(result["final_checkpoint"]).values())
