"""The trainer: the policy-is-the-reference invariant, learning, logs, refusals, resume, accumulation, DDP."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import (
    ENV,
    LOSS_REORDER_TOL,
    adam_reorder_atol,
    adapter,
    examples,
    free_port,
    make_tiny_model,
    pairs_run_setup,
    preference_rows,
    run_files,
    steps,
    train_run,
    write_jsonl,
)

from prefcache.cache.store import CacheError
from prefcache.cli import main
from prefcache.reference.shards import precompute
from prefcache.training.checkpoint import list_checkpoints, load_trainer_state
from prefcache.training.config import TrainConfig
from prefcache.training.log import EXAMPLE_SCHEMA, STEP_SCHEMA
from prefcache.training.loop import train

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """24 pairs and their fp32 reference cache from the tiny model (which is also the policy)."""
    return pairs_run_setup(tmp_path_factory.mktemp("train"), tiny_model, 24)


def run(setup, out, **kw):
    return train_run(setup, out, **{"max_steps": 3, "batch_size": 4, **kw})


def test_policy_equal_to_reference_starts_at_zero_rewards_and_ln2(setup, tmp_path):
    out = tmp_path / "run"
    result = run(setup, out, eval_fraction=0.25, max_steps=2)
    s, e = steps(out), examples(out)
    first = s.filter((pl.col("split") == "train") & (pl.col("step") == 1)).row(0, named=True)
    base = s.filter((pl.col("split") == "eval") & (pl.col("step") == 0)).row(0, named=True)
    for row in (first, base):  # step 1's metrics are measured on the step-0 policy, before its update
        assert row["loss"] == pytest.approx(LN2, abs=1e-6)
        for col in ("rewards_chosen", "rewards_rejected", "rewards_margins"):
            assert abs(row[col]) < 1e-5, col
    at_start = e.filter(pl.col("step") <= 1)
    assert at_start.height == 4 + 6  # the 4 pairs of step 1, the 6 held-out pairs at step 0
    for col in ("reward_chosen", "reward_rejected", "margin"):
        assert at_start[col].abs().max() < 1e-5, col
    assert (at_start["policy_chosen_logps"] - at_start["ref_chosen_logps"]).abs().max() < 1e-4
    assert result["final_checkpoint"].endswith("step-000002") and Path(result["final_checkpoint"]).is_dir()


def test_logs_have_the_contract_schemas(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, eval_fraction=0.25, max_steps=2)
    for name, schema in (("steps", STEP_SCHEMA), ("examples", EXAMPLE_SCHEMA)):
        for part in sorted((out / "logs").glob(f"{name}-*.parquet")):
            got = pq.read_schema(part)
            assert [(f.name, str(f.type)) for f in got] == [(f.name, str(f.type)) for f in schema], part
    assert [f.name for f in STEP_SCHEMA] == [
        "step", "epoch", "split", "loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies",
        "logps_chosen", "logps_rejected", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb", "time_s", "padding_share", "aux_loss",
        "kl"]
    s = steps(out)
    assert set(s["split"]) == {"train", "eval"} and s.filter(pl.col("split") == "train")["step"].to_list() == [1, 2]
    train_rows = s.filter(pl.col("split") == "train")
    assert (train_rows["lr"] > 0).all() and (train_rows["tokens_per_s"] > 0).all() and (train_rows["peak_mem_mb"] > 0).all()
    assert ((train_rows["padding_share"] >= 0) & (train_rows["padding_share"] < 1)).all()
    assert s.filter(pl.col("split") == "eval")["padding_share"].null_count() == 2
    e = examples(out)
    assert e["checkpoint"].null_count() == e.height and set(e["split"]) == {"train", "eval"}
    pairs = pl.read_parquet(out / "pairs.parquet")
    assert pairs.columns == ["id", "prompt", "chosen", "rejected"] and pairs.height == 24
    assert set(e["id"]) <= set(pairs["id"])
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["beta"] == 0.1 and info["cache"]["max_length"] == 64 and info["eval_pairs"] == 6
    assert info["result"]["steps"] == 2 and info["max_length"] == 64 and info["truncation"] == "keep_start"
    assert info["prefix_sharing"] is True and info["config"]["gradient_checkpointing"] is True  # the defaults


def test_loss_decreases_when_overfitting_eight_pairs(setup, tmp_path):
    data = write_jsonl(tmp_path / "d8.jsonl", preference_rows(24)[:8])
    run(setup, tmp_path / "run", data=str(data), max_steps=15, batch_size=8, lr=2e-2, scheduler="constant")
    s = steps(tmp_path / "run")
    assert s["loss"][0] == pytest.approx(LN2, abs=1e-6)
    assert s["loss"][-3:].mean() < 0.55
    assert s["rewards_accuracies"][-3:].min() == 1.0 and s["rewards_margins"][-1] > 0.3


def test_eval_numbers_are_what_score_pairs_gives_for_the_final_checkpoint(setup, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefcache.cache.lookup import ReferenceTable
    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.training.scoring import score_pairs

    result = run(setup, tmp_path / "run", eval_data=str(setup["data"]), max_steps=2, eval_batch_size=5)
    logged = examples(tmp_path / "run").filter((pl.col("split") == "eval") & (pl.col("step") == 2)).sort("id")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), result["final_checkpoint"])
    pairs, _, _ = load_dataset_pairs(str(setup["data"]), tokenizer, 64, "keep_start")
    cols, agg = score_pairs(model, pairs, ReferenceTable.from_cache(setup["cache"]), beta=0.1, batch_size=5,
                            pad_id=tokenizer.pad_token_id)
    scored = pl.DataFrame(cols).sort("id")
    for col in ("policy_chosen_logps", "policy_rejected_logps", "margin"):
        torch.testing.assert_close(logged[col].to_torch(), scored[col].to_torch(), rtol=0, atol=1e-9)
    assert result["eval"]["rewards_margins"] == pytest.approx(agg["rewards_margins"], abs=1e-12)


def test_a_cache_made_with_other_tokenisation_is_refused(setup, tmp_path, tokenizer):
    with pytest.raises(CacheError, match=r"max_length: cache has 64, asked for 32"):
        run(setup, tmp_path / "a", max_length=32)
    with pytest.raises(CacheError, match=r"truncation: cache has 'keep_start', asked for 'keep_end'"):
        run(setup, tmp_path / "b", truncation="keep_end")
    other = make_tiny_model(tmp_path / "other", tokenizer)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CacheError, match="chat_template_hash: cache has"):
        run(setup, tmp_path / "c", model=str(other))
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_ids_missing_from_the_cache_are_refused_with_count_and_examples(setup, tmp_path):
    data = write_jsonl(tmp_path / "more.jsonl", preference_rows(30))
    with pytest.raises(CacheError, match=r"6 of 30 example ids are not in the cache .*, e\.g\. [0-9a-f]{32}"):
        run(setup, tmp_path / "run", data=str(data))


def test_changed_content_under_a_cached_id_is_refused(setup, tmp_path):
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(preference_rows(6))]
    data = write_jsonl(tmp_path / "ids.jsonl", rows)
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(setup["model"]), max_length=64,
               quantize="fp32", progress=False)
    rows[2]["chosen"] += " and a much longer answer than before"
    write_jsonl(data, rows)
    with pytest.raises(CacheError, match=r"1 of the training pairs have other token counts .* e\.g\. r2"):
        run(setup, tmp_path / "run", data=str(data), cache=str(tmp_path / "cache"))


def test_reference_free_simpo_trains_without_a_cache(setup, tmp_path):
    result = run(setup, tmp_path / "run", cache=None, loss="simpo", beta=2.0, eval_fraction=0.25)
    e = examples(tmp_path / "run")
    assert e["ref_chosen_logps"].null_count() == e.height
    # SimPO's rewards (TRL's): beta * mean per-token policy log-prob
    row = e.filter(pl.col("step") == 1).row(0, named=True)
    assert row["reward_chosen"] == pytest.approx(2.0 * row["policy_chosen_logps"] / row["chosen_tokens"], rel=1e-6)
    assert math.isfinite(result["train"]["loss"]) and math.isfinite(result["eval"]["loss"])
    with pytest.raises(ValueError, match="sigmoid needs the reference cache"):
        TrainConfig(data="d", out="o", loss="sigmoid,sft")


def test_gradient_accumulation_equals_the_larger_batch(setup, tmp_path):
    one = run(setup, tmp_path / "b4", batch_size=4, grad_accum=1, max_steps=3)
    two = run(setup, tmp_path / "b2x2", batch_size=2, grad_accum=2, max_steps=3)
    a, b = adapter(one["final_checkpoint"]), adapter(two["final_checkpoint"])
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=adam_reorder_atol(1e-3, 3))
    torch.testing.assert_close(steps(tmp_path / "b4")["loss"].to_torch(), steps(tmp_path / "b2x2")["loss"].to_torch(),
                               **LOSS_REORDER_TOL)


def test_activation_checkpointing_changes_nothing_but_memory(setup, tmp_path):
    """The same steps with decoder-layer checkpointing on (the default) and off reach the same weights:
    backward recomputes each layer's forward with the same operations in the same order (one thread), so
    the weights are bit-equal."""
    on = run(setup, tmp_path / "on", max_steps=2, gradient_checkpointing=True, lora_dropout=0.1)
    off = run(setup, tmp_path / "off", max_steps=2, gradient_checkpointing=False, lora_dropout=0.1)
    assert json.loads((tmp_path / "off" / "run.json").read_text())["config"]["gradient_checkpointing"] is False
    a, b = adapter(on["final_checkpoint"]), adapter(off["final_checkpoint"])
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bco_pair_running_mean_is_kept_in_checkpoints(setup, tmp_path):
    result = run(setup, tmp_path / "run", loss="bco_pair", max_steps=2)
    state = load_trainer_state(result["final_checkpoint"])
    total, count = state["bco"]
    assert count == 2 * 4 * 2 and math.isfinite(total)


def _cli_train(setup, out, *extra):
    return [sys.executable, "-m", "prefcache", "train", "--data", str(setup["data"]), "--cache", str(setup["cache"]),
            "--model", str(setup["model"]), "--out", str(out), "--max-steps", "16", "--batch-size", "2",
            "--lr", "5e-3", "--warmup-steps", "3", "--save-every", "2", "--no-progress", *extra]


KILL_AT = 7  # the child dies after step 7 is logged: its last checkpoint is step 6, one logged step past it
KILLED_RUN = """
import os, sys
import prefcache.training.loop as loop
real = loop.after_step
def after_step(run, evaluate=None):
    real(run, evaluate)  # eval, checkpoint (every 2 steps) and the step's log part (flush_every=1)
    if run.step == int(sys.argv[5]):
        os._exit(137)  # as SIGKILL would: no cleanup, no lock release
loop.after_step = after_step
loop.train(data=sys.argv[1], cache=sys.argv[2], model=sys.argv[3], out=sys.argv[4], max_steps=16, batch_size=2,
           lr=5e-3, warmup_steps=3, save_every=2, progress=False, flush_every=1)
"""


def test_resume_after_kill_reaches_the_uninterrupted_weights(setup, tmp_path):
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(setup["data"]), str(setup["cache"]),
                             str(setup["model"]), str(out), str(KILL_AT)], env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert list_checkpoints(out)[-1][0] == KILL_AT - 1
    assert steps(out).filter(pl.col("split") == "train")["step"].max() == KILL_AT  # logged past the checkpoint
    resumed = subprocess.run(_cli_train(setup, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run(_cli_train(setup, tmp_path / "whole"), env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = adapter(out / "checkpoints" / "step-000016"), adapter(tmp_path / "whole" / "checkpoints" / "step-000016")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)
    s = steps(out).filter(pl.col("split") == "train")
    assert s["step"].to_list() == list(range(1, 17))  # step 7, logged before the kill, is logged once
    assert examples(out).group_by("step").len()["len"].max() == 2
    torch.testing.assert_close(s["loss"].to_torch(), steps(tmp_path / "whole")["loss"].to_torch(), rtol=1e-6, atol=1e-8)
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith(f"step-{KILL_AT - 1:06d}")


def test_resume_drops_rows_logged_after_the_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, max_steps=4, save_every=2, flush_every=1, eval_fraction=0.25)
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed after step 4 was logged, before its checkpoint
    assert steps(out).filter(pl.col("step") > 2).height == 3  # train 3, 4 and eval 4 are on disk
    result = run(setup, out, max_steps=4, save_every=2, flush_every=1, eval_fraction=0.25, resume=True)
    assert result["resumed_from"].endswith("step-000002")
    s = steps(out)
    assert s.select("split", "step").rows() == [("eval", 0), ("eval", 4), ("train", 1), ("train", 2), ("train", 3),
                                                ("train", 4)]
    assert examples(out).group_by("split", "step").len()["len"].sort().to_list() == [4, 4, 4, 4, 6, 6]


def test_an_existing_run_needs_resume(setup, tmp_path):
    run(setup, tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        run(setup, tmp_path / "run", max_steps=1)
    again = run(setup, tmp_path / "run", max_steps=1, resume=True)  # finished: nothing to do, nothing duplicated
    assert again["steps"] == 1 and steps(tmp_path / "run").height == 1
    with pytest.raises(ValueError, match="batch_size: checkpoint has 4, now 2"):
        run(setup, tmp_path / "run", max_steps=2, batch_size=2, resume=True)


def test_full_finetune_saves_hf_weights(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(setup, tmp_path / "run", finetune="full", max_steps=2, lr=1e-4)
    ckpt = Path(result["final_checkpoint"])
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists()
    assert (ckpt / "tokenizer_config.json").exists() and (ckpt / "trainer_state.pt").exists()
    assert steps(tmp_path / "run")["loss"][0] == pytest.approx(LN2, abs=1e-6)
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(setup["model"])
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(moved) > 10  # every kind of weight trains


def test_qlora_on_a_4bit_base(setup, tmp_path):
    result = run(setup, tmp_path / "run", finetune="qlora", max_steps=2)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["policy"]["quantization"] == "4bit"
    assert (Path(result["final_checkpoint"]) / "adapter_config.json").exists()
    # NF4 moves the policy off the fp32 reference a little: rewards near, not at, zero, so the step-0 loss is
    # not ln 2 but exactly (to float64 rounding) the sigmoid loss of the margins the run logged for that step
    first = steps(tmp_path / "run").filter((pl.col("split") == "train") & (pl.col("step") == 1)).row(0, named=True)
    margins = examples(tmp_path / "run").filter(pl.col("step") == 1)["margin"].to_torch().double()
    assert margins.abs().max() > 1e-4 and first["loss"] == pytest.approx(LN2, abs=0.05)
    assert first["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), rel=0, abs=1e-12)


def test_qlora_policy_on_its_own_4bit_cache_starts_at_ln2(setup, tmp_path):
    """Reference and policy both 4-bit NF4 (the demo's set-up): one code path, so step-0 rewards are 0."""
    cache = tmp_path / "cache4"
    precompute(data=str(setup["data"]), out=str(cache), model=str(setup["model"]), max_length=64, quantize="4bit",
               progress=False)
    run(setup, tmp_path / "run", cache=str(cache), finetune="qlora", max_steps=1, eval_fraction=0.25)
    first = steps(tmp_path / "run").filter(pl.col("step") == 0).row(0, named=True)
    assert first["split"] == "eval" and first["loss"] == pytest.approx(LN2, abs=1e-5)
    margins = examples(tmp_path / "run").filter(pl.col("step") == 0)["margin"]
    assert margins.abs().max() < 1e-5


def test_cli_train(setup, tmp_path):
    runner = CliRunner()
    args = ["train", "--data", str(setup["data"]), "--cache", str(setup["cache"]), "--model", str(setup["model"]),
            "--out", str(tmp_path / "run"), "--max-steps", "2", "--loss", "sigmoid,sft", "--loss-weights", "1,0.2",
            "--eval-fraction", "0.25", "--no-progress", "--max-grad-norm", "0"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "2 steps" in res.output and "final checkpoint:" in res.output and "eval: loss" in res.output
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["loss"] == ["sigmoid", "sft"] and config["loss_weights"] == [1.0, 0.2]
    assert config["max_grad_norm"] is None
    res = runner.invoke(main, ["train", "--data", str(setup["data"]), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "needs the reference cache" in res.output and "Traceback" not in res.output
    code = ("import sys; from prefcache.cli import main; main(['train', '--help'], standalone_mode=False); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    assert "--resume" in out and out.strip().endswith("False")


def test_config_validation():
    TrainConfig(data="d", out="o", loss="simpo")
    with pytest.raises(ValueError, match="unknown loss nope"):
        TrainConfig(data="d", out="o", cache="c", loss="sigmoid,nope")
    with pytest.raises(ValueError, match="2 loss name.* but 1 loss weight"):
        TrainConfig(data="d", out="o", cache="c", loss="sigmoid,sft", loss_weights="1")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(data="d", out="o", cache="c", batch_size=0)
    assert TrainConfig(data="d", out="o", cache="c", finetune="full").lr == 5e-6
    assert TrainConfig(data="d", out="o", cache="c", lora_r=8).lora_alpha == 16


def test_two_process_data_parallel_equals_one_process(setup, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "prefcache", "train", "--data", str(setup["data"]), "--cache", str(setup["cache"]),
           "--model", str(setup["model"]), "--out", str(tmp_path / "ddp"), "--max-steps", "4", "--batch-size", "2",
           "--lr", "1e-3", "--warmup-steps", "0", "--eval-fraction", "0.25", "--save-every", "2", "--no-progress",
           "--gradient-checkpointing"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, "\n".join(line for line in res.stderr.splitlines() if "[rank" in line)[-4000:]
    single = run(setup, tmp_path / "single", max_steps=4, batch_size=4, eval_fraction=0.25)
    a, b = adapter(tmp_path / "ddp" / "checkpoints" / "step-000004"), adapter(single["final_checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=adam_reorder_atol(1e-3, 4))
    d, s = steps(tmp_path / "ddp"), steps(tmp_path / "single")
    assert d["step"].to_list() == s["step"].to_list()  # each step logged once, by rank 0
    torch.testing.assert_close(d["loss"].to_torch(), s["loss"].to_torch(), **LOSS_REORDER_TOL)
    assert examples(tmp_path / "ddp").filter(pl.col("split") == "train").group_by("step").len()["len"].to_list() == [4] * 4
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_length_grouped_order_is_seeded_resumable_and_splits_steps_alike():
    from prefcache.training.loop import epoch_order

    lengths = [(i * 37) % 101 + 5 for i in range(200)]
    order = epoch_order(200, 7, 0, 0, 1, lengths, 4)
    assert order == epoch_order(200, 7, 0, 0, 1, lengths, 4) and sorted(order) == list(range(200))
    assert order != epoch_order(200, 7, 1, 0, 1, lengths, 4)  # a fresh order each epoch
    plain = epoch_order(200, 7, 0, 0, 1)

    def padding(o):  # padded positions of batches of 4, as the trainer builds them
        return sum(4 * max(lengths[i] for i in o[s : s + 4]) - sum(lengths[i] for i in o[s : s + 4])
                   for s in range(0, len(o), 4))

    assert padding(order) < 0.5 * padding(plain)
    # Two ranks of 2 pairs per step see, step by step, the pairs one process of 4 pairs per step sees.
    ranks = [epoch_order(200, 7, 0, r, 2, lengths, 2) for r in (0, 1)]
    for step in range(50):
        assert sorted(ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]) == \
            sorted(order[4 * step : 4 * step + 4])


def test_resume_refuses_another_batch_grouping(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, max_steps=2)
    with pytest.raises(ValueError, match="group_by_length: checkpoint has True, now False"):
        run(setup, out, max_steps=4, resume=True, group_by_length=False)


def _train_cli(*args) -> object:
    return CliRunner().invoke(main, ["train", *map(str, args)])


@pytest.mark.parametrize("stores", ["in the run", "in PREFCACHE_HOME"])
def test_resume_refuses_other_data_or_another_cache_and_touches_nothing(setup, tmp_path, tokenizer, monkeypatch,
                                                                         stores):
    """As many pairs is not the same pairs: a resume compares what the data and the cache hold, not their size.
    The data store of the refused data, written under RUN/data on the way (the default), is removed again."""
    if stores == "in the run":
        monkeypatch.delenv("PREFCACHE_HOME")
    out = tmp_path / "rb"
    run(setup, out, max_steps=2)
    data2 = write_jsonl(tmp_path / "pairs2.jsonl", preference_rows(24, seed=1))  # 24 pairs, other ones
    common = {"max_length": 64, "quantize": "fp32", "progress": False}
    precompute(data=str(data2), out=str(tmp_path / "cache2"), model=str(setup["model"]), **common)
    other = make_tiny_model(tmp_path / "other", tokenizer, seed=1)  # same tokenizer: the tokenisation checks pass
    precompute(data=str(setup["data"]), out=str(tmp_path / "cache3"), model=str(other), **common)
    before = run_files(out)
    for data, cache, differs in ((data2, tmp_path / "cache2", "data (the training examples, in order): checkpoint has"),
                                 (setup["data"], tmp_path / "cache3", "cache (what made its values: model, "
                                  "tokenisation, precision): checkpoint has")):
        r = _train_cli("--data", data, "--cache", cache, "--model", setup["model"], "--out", out, "--max-steps", 3,
                       "--resume")
        assert r.exit_code == 1 and "cannot resume with other settings:" in r.output and differs in r.output, r.output
        assert "Traceback" not in r.output and run_files(out) == before
    # The same content elsewhere resumes: what counts is what the files hold, not where they are.
    shutil.copy(setup["data"], tmp_path / "copy.jsonl")
    shutil.copytree(setup["cache"], tmp_path / "cache-copy")
    r = _train_cli("--data", tmp_path / "copy.jsonl", "--cache", tmp_path / "cache-copy", "--model", setup["model"],
                   "--out", out, "--max-steps", 3, "--resume")
    assert r.exit_code == 0, r.output
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["data"] == str(tmp_path / "copy.jsonl") and info["result"]["steps"] == 3
    assert info["config"]["cache"] == str(tmp_path / "cache-copy")


def test_a_checkpoint_without_fingerprints_still_resumes(setup, tmp_path):
    """Checkpoints written before the data and cache were fingerprinted have nothing to compare: not refused."""
    out = tmp_path / "old"
    run(setup, out, max_steps=1)
    path = list_checkpoints(out)[-1][1]
    state = load_trainer_state(path)
    torch.save({k: v for k, v in state.items() if k != "fingerprints"}, path / "trainer_state.pt")
    info = json.loads((path / "prefcache.json").read_text())
    (path / "prefcache.json").write_text(json.dumps({k: v for k, v in info.items() if k != "loss_settings"}))
    data2 = write_jsonl(tmp_path / "pairs2.jsonl", preference_rows(24)[::-1])  # another order: not checked
    assert run(setup, out, max_steps=2, resume=True, data=str(data2))["steps"] == 2


def test_resume_continues_the_runs_loss_and_refuses_another(setup, tmp_path):
    out = tmp_path / "rb"
    r = _train_cli("--data", setup["data"], "--cache", setup["cache"], "--model", setup["model"], "--out", out,
                   "--max-steps", 2, "--beta", 0.5, "--batch-size", 4, "--lr", 1e-3, "--warmup-steps", 0,
                   "--no-progress")
    assert r.exit_code == 0, r.output
    before = run_files(out)
    r = _train_cli("--out", out, "--resume", "--max-steps", 3, "--loss", "hinge", "--beta", 0.1,
                   "--label-smoothing", 0.1)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert ("cannot resume with another loss" in r.output and "loss: checkpoint has ['sigmoid'], now ['hinge']"
            in r.output and "beta: checkpoint has 0.5, now 0.1" in r.output
            and "label_smoothing: checkpoint has 0.0, now 0.1" in r.output), r.output
    assert run_files(out) == before  # refused before anything was read or written
    # Options not given on the command line are the run's own: its data, cache, model, loss and beta.
    r = _train_cli("--out", out, "--resume", "--max-steps", 3)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["beta"] == 0.5 and saved["loss"] == ["sigmoid"] and saved["max_steps"] == 3
    assert saved["data"] == str(setup["data"]) and saved["batch_size"] == 4 and saved["lr"] == 1e-3
    assert json.loads((out / "checkpoints" / "step-000003" / "prefcache.json").read_text())["beta"] == 0.5
    # The Python API takes the same rule: the keyword arguments given are the changes.
    assert train(out=str(out), resume=True, max_steps=4)["steps"] == 4
    with pytest.raises(ValueError, match=r"beta: checkpoint has 0.5, now 0.2"):
        train(out=str(out), resume=True, max_steps=5, beta=0.2)


def test_training_on_an_unshared_cache_follows_it_and_a_forced_path_warns(setup, tmp_path, caplog):
    import logging

    plain = tmp_path / "plain-cache"
    precompute(data=str(setup["data"]), out=str(plain), model=str(setup["model"]), max_length=64, quantize="fp32",
               progress=False, prefix_sharing=False)
    run(setup, tmp_path / "follow", cache=str(plain), max_steps=1)
    assert json.loads((tmp_path / "follow" / "run.json").read_text())["prefix_sharing"] is False
    with caplog.at_level(logging.WARNING, logger="prefcache"):
        run(setup, tmp_path / "forced", cache=str(plain), max_steps=1, prefix_sharing=True)
    assert any("cache was made without prefix sharing, training runs with it" in r.message for r in caplog.records)
    first = steps(tmp_path / "forced").row(0, named=True)
    assert first["loss"] == pytest.approx(LN2, abs=1e-5) and abs(first["rewards_margins"]) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("quantize, finetune, tolerance", [("fp32", "lora", 1e-5), ("4bit", "qlora", 1e-3)])
def test_cuda_policy_on_its_own_cuda_cache_starts_at_ln2(setup, tmp_path, quantize, finetune, tolerance):
    """A 4-bit cache on a GPU computes in bf16 (and so does its QLoRA policy): equal to bf16 rounding."""
    cache = tmp_path / "cache"
    precompute(data=str(setup["data"]), out=str(cache), model=str(setup["model"]), max_length=64, quantize=quantize,
               device="cuda", progress=False)
    out = tmp_path / "run"
    result = run(setup, out, cache=str(cache), device="cuda", bf16=quantize != "fp32", max_steps=2)
    first = steps(out).filter((pl.col("split") == "train") & (pl.col("step") == 1)).row(0, named=True)
    assert first["loss"] == pytest.approx(LN2, abs=tolerance)
    assert abs(first["rewards_margins"]) < tolerance
    assert json.loads((out / "run.json").read_text())["config"]["finetune"] == finetune
    assert result["steps"] == 2


@pytest.mark.gpu
def test_cuda_bf16_autocast_trains_with_finite_numbers(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, device="cuda", bf16=True, max_steps=3)
    s = steps(out).filter(pl.col("split") == "train")
    assert s.height == 3 and all(math.isfinite(v) for v in s["loss"]) and s["peak_mem_mb"].min() > 0


# ----------------------------------------------------------------------------- the README's training options


def _files(out: Path) -> dict[str, bytes]:
    """Every file under a run directory, by relative path, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, difference", [
    ({"grad_accum": 2}, "grad_accum: checkpoint has 1, now 2"),
    ({"seed": 7}, "seed: checkpoint has 42, now 7"),
    ({"data": 20}, "n_train: checkpoint has 24, now 20\n  data (the training examples, in order): checkpoint has"),
    ({"world_size": 2}, "world_size: checkpoint has 1, now 2"),
])
def test_resume_with_another_data_order_is_refused_naming_it_and_writes_nothing(setup, tmp_path, monkeypatch,
                                                                                change, difference):
    """A resume with another world size, pair count, grad_accum or seed would not continue the same data order:
    refused, naming only what differs (checkpoint's value, then this run's), and the run directory is untouched."""
    import prefcache.training.loop as loop

    out = tmp_path / "run"
    run(setup, out, max_steps=2, save_every=1)
    before = _files(out)
    kw = dict(change)
    if "data" in kw:  # the first 20 of the 24 pairs: all in the cache
        kw["data"] = str(write_jsonl(tmp_path / "fewer.jsonl", preference_rows(24)[:20]))
    if kw.pop("world_size", None):  # as torchrun with two processes would say (refused before any collective)
        monkeypatch.setattr(loop, "setup", lambda device: (0, 2, "cpu"))
    with pytest.raises(ValueError) as refused:
        run(setup, out, max_steps=4, resume=True, **kw)
    assert str(refused.value).startswith(f"cannot resume with other settings:\n  {difference}")
    assert str(refused.value).count("\n") == difference.count("\n") + 1  # only what differs
    assert _files(out) == before


def test_seconds_add_up_over_resumed_sessions(setup, tmp_path):
    """The first session's training time, as its checkpoint recorded it (set to 1000 s here), is where the
    resumed session's clock starts: the summary, run.json, the resumed steps' time_s and the next checkpoint
    all count both sessions."""
    out = tmp_path / "run"
    run(setup, out, max_steps=2, save_every=1)
    first_rows = steps(out)
    state_file = out / "checkpoints" / "step-000002" / "trainer_state.pt"
    state = load_trainer_state(state_file.parent)
    assert 0 < state["elapsed_s"] < 1000
    torch.save({**state, "elapsed_s": 1000.0}, state_file)
    result = run(setup, out, max_steps=4, save_every=1, resume=True)
    assert result["seconds"] > 1000
    assert json.loads((out / "run.json").read_text())["result"]["seconds"] == result["seconds"]
    s = steps(out)
    assert s.filter(pl.col("step") <= 2).equals(first_rows)  # the first session's rows as they were
    assert s.filter(pl.col("step") > 2)["time_s"].min() > 1000
    assert 1000 < load_trainer_state(out / "checkpoints" / "step-000004")["elapsed_s"] <= result["seconds"]


def test_max_grad_norm_0_turns_clipping_off(setup, tmp_path):
    """`--max-grad-norm 0` trains exactly as a bound no gradient reaches (1e9), and a bound that does bind
    (1e-4, far under this run's gradient norms) changes the weights: so 0 is "no clipping", not "clip to 0"."""
    args = ["train", "--data", str(setup["data"]), "--cache", str(setup["cache"]), "--model", str(setup["model"]),
            "--out", str(tmp_path / "off"), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3",
            "--warmup-steps", "0", "--no-progress", "--max-grad-norm", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    huge = run(setup, tmp_path / "huge", max_steps=2, max_grad_norm=1e9)
    tight = run(setup, tmp_path / "tight", max_steps=2, max_grad_norm=1e-4)
    assert steps(tmp_path / "off")["grad_norm"].min() > 1e-2  # the tight bound binds
    off = tmp_path / "off" / "checkpoints" / "step-000002"
    a, b, c = adapter(off), adapter(huge["final_checkpoint"]), adapter(tight["final_checkpoint"])
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k)  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.allclose(a[k], c[k], rtol=1e-3, atol=1e-6) for k in a if "lora_B" in k)


def test_eval_every_evaluates_at_0_every_n_steps_and_at_the_end(setup, tmp_path):
    run(setup, tmp_path / "every2", max_steps=5, eval_every=2, eval_fraction=0.25)
    run(setup, tmp_path / "default", max_steps=5, eval_fraction=0.25)
    for name, expected in (("every2", [0, 2, 4, 5]), ("default", [0, 5])):
        assert steps(tmp_path / name).filter(pl.col("split") == "eval")["step"].to_list() == expected, name
    held = examples(tmp_path / "every2").filter(pl.col("split") == "eval")
    assert held.group_by("step").len()["len"].to_list() == [6] * 4  # every eval scores all 6 held-out pairs


def test_epochs_pass_over_every_pair_once_each_and_max_steps_wins(setup, tmp_path):
    """24 pairs, 4 a step: an epoch is 6 steps. `--epochs 2` is 12 steps in which each pair trains once per
    epoch; with `--max-steps 3` as well, 3 steps."""
    result = run(setup, tmp_path / "two", max_steps=None, epochs=2)
    assert result["steps"] == 12
    train_rows = examples(tmp_path / "two").filter(pl.col("split") == "train")
    for epoch, (lo, hi) in enumerate(((1, 6), (7, 12))):
        ids = train_rows.filter(pl.col("step").is_between(lo, hi))["id"]
        assert ids.len() == 24 and ids.n_unique() == 24, epoch
    assert steps(tmp_path / "two")["epoch"].to_list() == [s / 6 for s in range(1, 13)]
    assert run(setup, tmp_path / "capped", max_steps=3, epochs=2)["steps"] == 3


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_train_keep_8bit_state_and_resume(setup, tmp_path, optimizer):
    """bitsandbytes' 8-bit AdamW (paged: the same on CPU) trains on CPU: its moments are uint8 (LoRA r=64
    makes 64x64 A matrices, the size bitsandbytes starts quantising at), and a resume from its checkpoint
    reaches the weights of the run that never stopped."""
    out = tmp_path / "run"
    whole = run(setup, out, max_steps=2, save_every=1, lora_r=64, optimizer=optimizer)
    final = adapter(whole["final_checkpoint"])
    assert any(v.abs().max() > 1e-4 for k, v in final.items() if "lora_B" in k)
    saved = load_trainer_state(whole["final_checkpoint"])["optimizer"]["state"].values()
    moments = [s.get("__bnb_optimizer_quant_state__", s).get("state1") for s in saved]  # bitsandbytes' layout
    assert any(m is not None and m.dtype == torch.uint8 for m in moments)
    import shutil

    shutil.rmtree(whole["final_checkpoint"])
    resumed = run(setup, out, max_steps=2, save_every=1, lora_r=64, optimizer=optimizer, resume=True)
    again = adapter(resumed["final_checkpoint"])
    for k in final:
        assert torch.equal(final[k], again[k]), k
