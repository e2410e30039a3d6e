"""``--fsdp``: two gloo processes sharding the policy with FSDP2 (LoRA, QLoRA's 4-bit base, full fine-tuning) take
the steps of one unsharded process, and their DCP checkpoints resume on one process or two (the same weights as a
run never stopped) and export as any other. The CUDA test of QLoRA needs two GPUs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import polars as pl
import pytest
import torch
from conftest import ENV, adam_reorder_atol, adapter, examples, free_port, pairs_run_setup, train_run
from torch.distributed.checkpoint import FileSystemReader

from prefcache.training.checkpoint import list_checkpoints, load_trainer_state
from prefcache.training.config import TrainConfig
from prefcache.training.loop import train
from prefcache.training.sharded import SHARDED_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

# A torchrun child that trains as `prefcache train` and dies (as kill -9 would leave it) right after step CRASH_AT.
CRASHER = textwrap.dedent("""
    import os
    import prefcache.training.loop as loop
    real = loop.after_step
    def after_step(run, evaluate=None):
        real(run, evaluate)
        if run.step == int(os.environ["CRASH_AT"]):
            os._exit(137)
    loop.after_step = after_step
    from prefcache.cli import main
    main()
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """24 pairs (18 to train on: whole steps on one process and on two) and their fp32 cache."""
    return pairs_run_setup(tmp_path_factory.mktemp("fsdp"), tiny_model, 24)


def torchrun(setup, out, *args, procs: int = 2, script=None, env=ENV, resume: bool = False, fsdp: bool = True):
    """``prefcache train --fsdp`` (or ``script``; DDP without ``fsdp``) on ``procs`` gloo processes; the finished
    process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
           str(free_port()), *([str(script)] if script else ["-m", "prefcache"]), "train", "--out", str(out)]
    if resume:
        cmd += ["--resume", *map(str, args)]
    else:
        cmd += ["--data", str(setup["data"]), "--cache", str(setup["cache"]), "--model", str(setup["model"]),
                "--lr", "1e-3", "--warmup-steps", "0", "--no-progress", *(["--fsdp"] if fsdp else []), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def ok(res) -> None:
    assert res.returncode == 0, "\n".join(line for line in res.stderr.splitlines() if "[rank" in line or "Error" in line)[-8000:]


def weights(ckpt, full: bool = False) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors") if full else adapter(ckpt)


def assert_same_weights(a: dict, b: dict, steps: int, lr: float = 1e-3) -> float:
    """The same weights to fp32 reorder noise (a step's sum split over ranks and micro-batches otherwise); returns
    the largest relative difference of a tensor, ||a - b|| / ||b||.

    Measured (24 pairs, 3-4 steps at lr 1e-3): every tensor within 1.8e-6 of its norm (LoRA and full); the worst
    single weight 2.4e-7 (LoRA) and 2.4e-6 (full fine-tuning: 2 of 3.2M weights above 1e-6, embedding rows whose
    gradient is near 0, where Adam turns rounding into a visible share of an lr-sized update). Bounds: 1e-5 of a
    tensor's norm (5x the worst measured) and 1e-2 of lr x steps for one weight (12x), both far below what a lost
    or doubled micro-batch moves (an update of about lr per weight per step).
    """
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-2 * lr * steps)
        relative = float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30))
        assert relative <= 1e-5, (k, relative)
        worst = max(worst, relative)
    return worst


@pytest.mark.slow
def test_qlora_on_two_fsdp_processes_equals_ddp_bitwise_and_one_process_and_resumes_on_one(setup, tmp_path):
    """QLoRA under --fsdp: the 4-bit NF4 base is sharded too (its packed bytes stored as fp32 on CPU), only the
    adapter trains. 2 x 2 pairs a step, held-out pairs scored through the sharded 4-bit layers in eval mode (where
    bitsandbytes' CPU repacking would corrupt a sharded weight, see keep_4bit_layers_differentiable). The step-2
    checkpoint (its adapter gathered on rank 0; the base's 4-bit weights and quantization constants in neither
    the adapter nor sharded/) continues on two processes to exactly the weights of two DDP processes (the same
    micro-batches and the same forwards; two ranks' gradients averaged, exact in either collective), and on one
    process to the weights of one unsharded process, to reorder noise: measured 1.3e-6 for the worst weight
    (both ways), adam_reorder_atol's bound is 4e-6 (assert_same_weights' 1e-5 of a tensor's norm is not: a
    lora_B of 4-bit layers differs by 1.03e-5 of its norm, the same with DDP). The checkpoint exports merged as
    a QLoRA checkpoint does. A constant lr: the runs that grow from 2 to 4 steps keep their schedule."""
    qlora = ("--finetune", "qlora", "--batch-size", 2, "--scheduler", "constant", "--eval-fraction", 0.25)
    ok(torchrun(setup, tmp_path / "two", *qlora, "--max-steps", 2))
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one")
    ok(torchrun(setup, tmp_path / "two", "--max-steps", 4, resume=True))
    train(out=str(tmp_path / "two-then-one"), resume=True, max_steps=4, batch_size=4)
    ddp = torchrun(setup, tmp_path / "ddp", *qlora, "--max-steps", 4, fsdp=False)
    train_run(setup, tmp_path / "one", finetune="qlora", max_steps=4, batch_size=4, scheduler="constant",
              eval_fraction=0.25)
    ok(ddp)
    ckpt = lambda run, step=4: weights(tmp_path / run / "checkpoints" / f"step-{step:06d}")  # noqa: E731
    two, one = ckpt("two"), ckpt("one")
    assert ckpt("two", 2).keys() == one.keys() and all(v.dtype == torch.float32 for v in one.values())
    assert two.keys() == ckpt("ddp").keys() and all(torch.equal(two[k], ckpt("ddp")[k]) for k in two)
    for run, step in (("two", 2), ("two-then-one", 4)):  # sharded, and saved whole by one process
        files = FileSystemReader(str(tmp_path / run / "checkpoints" / f"step-{step:06d}" / SHARDED_DIR))
        saved = [k for k in files.read_metadata().state_dict_metadata if k.startswith("model.")]
        assert len(saved) == len(one) and all(".lora_" in k for k in saved), saved
    worst = {}
    for run in ("two", "two-then-one"):
        for k, v in ckpt(run).items():
            torch.testing.assert_close(v, one[k], rtol=0, atol=adam_reorder_atol(1e-3, 4))
        worst[run] = max(float((v - one[k]).abs().max()) for k, v in ckpt(run).items())
    held = [examples(tmp_path / run).filter((pl.col("split") == "eval") & (pl.col("step") == 4)).sort("id")
            for run in ("two", "one")]
    assert held[0]["id"].to_list() == held[1]["id"].to_list() and held[0].height == 6
    drift = max((held[0][c] - held[1][c]).abs().max() for c in ("policy_chosen_logps", "policy_rejected_logps"))
    print(f"worst weight against one unsharded process: {worst}; held-out log-probs {drift:.2e} nats")
    assert drift < 1e-3  # as for LoRA below: weights 1e-6 apart over sums of ~40 tokens

    from transformers import AutoModelForCausalLM

    from prefcache.export import export

    export(tmp_path / "two" / "checkpoints" / "step-000004", tmp_path / "merged", merge=True)
    assert "quantization_config" not in AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.to_dict()


@pytest.mark.gpu
def test_qlora_on_two_cuda_fsdp_processes_with_bf16_trains_as_one_gpu(setup, tmp_path):
    """The CUDA path of the test above: nccl, the 4-bit base stored and gathered in bf16 (MixedPrecisionPolicy),
    gradients reduced in fp32. Two GPUs take 2 x 2 pairs a step, resume on two and on one GPU, and reach about the
    weights of one unsharded GPU (bf16 autocast there).

    NOT RUN YET: no GPU was available when it was written, so its bound is not measured. bf16 rounds to 2^-9
    relative, and Adam's first steps move each weight by about lr whatever its gradient's size, so weights
    whose gradient is near 0 may move differently; the test therefore compares the direction of the update
    (lora_B starts at 0: its value is its update; cosine >= 0.9) and bounds every weight by the lr x steps an
    Adam step can move it. The numbers are printed: a first run should tighten the bound to them."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: --fsdp on one process trains unsharded")
    qlora = ("--finetune", "qlora", "--device", "cuda", "--batch-size", 2, "--scheduler", "constant")
    ok(torchrun(setup, tmp_path / "two", *qlora, "--max-steps", 2))
    shutil.copytree(tmp_path / "two", tmp_path / "two-then-one")
    ok(torchrun(setup, tmp_path / "two", "--max-steps", 3, resume=True))
    train(out=str(tmp_path / "two-then-one"), resume=True, max_steps=3, batch_size=4)
    train_run(setup, tmp_path / "one", finetune="qlora", device="cuda", max_steps=3, batch_size=4,
              scheduler="constant")
    final = weights(tmp_path / "one" / "checkpoints" / "step-000003")
    for run in ("two", "two-then-one"):
        got = weights(tmp_path / run / "checkpoints" / "step-000003")
        assert got.keys() == final.keys() and all(v.dtype == torch.float32 for v in got.values())
        for k in final:
            torch.testing.assert_close(got[k], final[k], rtol=0, atol=1e-3 * 3)  # lr x steps
        b = [k for k in final if "lora_B" in k]
        cosine = float(torch.nn.functional.cosine_similarity(torch.cat([got[k].flatten() for k in b]),
                                                             torch.cat([final[k].flatten() for k in b]), dim=0))
        print(f"{run}: cosine of the lora_B updates to one GPU's {cosine:.4f}")
        assert cosine >= 0.9


@pytest.mark.slow
def test_killed_fsdp_run_resumes_on_two_or_one_process_to_the_unsharded_weights(setup, tmp_path):
    """LoRA, 2 x 2 pairs a step, held-out pairs scored through the sharded module: killed after step 3 (its last
    checkpoint is step 2), resumed on two processes, and on one with 4 pairs a step: both reach the weights of
    one unsharded process that was never stopped; the checkpoint exports as a model transformers loads."""
    crasher = tmp_path / "crasher.py"
    crasher.write_text(CRASHER)
    out, out1 = tmp_path / "fsdp", tmp_path / "fsdp-on-one"
    crashed = torchrun(setup, out, "--max-steps", 4, "--batch-size", 2, "--eval-fraction", 0.25, "--save-every", 2,
                       script=crasher, env={**ENV, "CRASH_AT": "3"})
    assert crashed.returncode != 0
    assert [s for s, _ in list_checkpoints(out)] == [2]
    state = load_trainer_state(out / "checkpoints" / "step-000002")
    assert state["sharded"] and "optimizer" not in state and (out / "checkpoints" / "step-000002" / "sharded").is_dir()
    shutil.copytree(out, out1)

    ok(torchrun(setup, out, resume=True))
    one = train(out=str(out1), resume=True, batch_size=4)  # one process: the note, then unsharded
    whole = train_run(setup, tmp_path / "one", max_steps=4, batch_size=4, eval_fraction=0.25, save_every=2)
    final = weights(tmp_path / "one" / "checkpoints" / "step-000004")
    worst_two = assert_same_weights(weights(out / "checkpoints" / "step-000004"), final, 4)
    worst_one = assert_same_weights(weights(tmp_path / "fsdp-on-one" / "checkpoints" / "step-000004"), final, 4)
    assert one["resumed_from"].endswith("step-000002") and whole["steps"] == 4
    print(f"largest relative difference of a tensor to the unsharded run: two processes {worst_two:.2e}, one {worst_one:.2e}")
    # The held-out pairs, each rank scoring its share through the sharded module, logged as one process logs them.
    held = [examples(run).filter((pl.col("split") == "eval") & (pl.col("step") == 4)).sort("id")
            for run in (out, tmp_path / "one")]
    assert held[0]["id"].to_list() == held[1]["id"].to_list() and held[0].height == 6
    drift = max((held[0][c] - held[1][c]).abs().max() for c in ("policy_chosen_logps", "policy_rejected_logps"))
    print(f"held-out log-probs, two sharded processes against one: {drift:.2e} nats")
    assert drift < 1e-3  # weights 2e-6 apart (above) over sums of ~40 tokens; a lost or doubled pair fails the ids

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefcache.export import export

    # The sharded run's checkpoint, merged: a plain model whose logits are the adapter's on its base.
    ckpt = out / "checkpoints" / "step-000004"
    export(ckpt, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), ckpt).eval()
    ids = torch.tensor([[1, 2040, 314, 253, 1345, 30, 2, 17, 99, 1000]])
    with torch.no_grad():
        a, b = merged(ids).logits, on_base(ids).logits
    gap = float((a - b).abs().max())
    print(f"exported logits against the adapter on its base: {gap:.2e}")
    assert gap <= 1e-4 and float((a - AutoModelForCausalLM.from_pretrained(setup["model"])(ids).logits).abs().max()) > 1e-3


@pytest.mark.slow
def test_full_finetune_on_two_fsdp_processes_equals_one_process_and_resumes_from_one(setup, tmp_path):
    """Every weight trains, sharded, with activation checkpointing: 2 x 2 pairs a step reach one process's 4; a
    one-process --fsdp checkpoint (unsharded, DCP files all the same) continues on two processes. A constant lr:
    the run that grows from 2 to 3 steps keeps its schedule."""
    ok(torchrun(setup, tmp_path / "two", "--finetune", "full", "--max-steps", 3, "--batch-size", 2,
                "--scheduler", "constant"))
    train_run(setup, tmp_path / "one", finetune="full", max_steps=3, batch_size=4, scheduler="constant")
    ckpt = lambda run: tmp_path / run / "checkpoints" / "step-000003"  # noqa: E731
    worst = assert_same_weights(weights(ckpt("two"), full=True), weights(ckpt("one"), full=True), 3)

    train_run(setup, tmp_path / "grow", finetune="full", max_steps=2, batch_size=4, fsdp=True, scheduler="constant")
    ok(torchrun(setup, tmp_path / "grow", "--max-steps", 3, "--batch-size", 2, resume=True))
    worst_grown = assert_same_weights(weights(ckpt("grow"), full=True), weights(ckpt("one"), full=True), 3)
    print(f"largest relative difference of a tensor to the unsharded run: {worst:.2e}; resumed 1 -> 2: {worst_grown:.2e}")


def test_resume_on_other_ranks_needs_the_same_pairs_per_step_and_sharded_state_for_fsdp():
    from prefcache.training.checkpoint import check_resumable

    state = {"world_size": 2, "n_train": 16, "batch_size": 2, "grad_accum": 1, "seed": 42, "group_by_length": True,
             "sharded": True}
    cfg = TrainConfig(data="d", out="o", cache="c", batch_size=4, fsdp=True)
    check_resumable(state, world=1, n_train=16, cfg=cfg)  # 2 x 2 pairs a step = 1 x 4
    check_resumable({**state, "world_size": 1, "batch_size": 4}, world=4, n_train=16,
                    cfg=TrainConfig(data="d", out="o", cache="c", batch_size=1, fsdp=True))
    with pytest.raises(ValueError, match="world_size: checkpoint has 2, now 1\n  batch_size: checkpoint has 1, now 4"):
        check_resumable({**state, "batch_size": 1}, world=1, n_train=16, cfg=cfg)  # 2 pairs a step, now 4
    with pytest.raises(ValueError, match="world_size: checkpoint has 2, now 4"):  # 18 pairs: padded on 4 ranks
        check_resumable({**state, "n_train": 18}, world=4, n_train=18,
                        cfg=TrainConfig(data="d", out="o", cache="c", batch_size=1, fsdp=True))
    with pytest.raises(ValueError, match=r"fsdp: the checkpoint has no sharded state \(saved without --fsdp\)"):
        check_resumable({**state, "sharded": False}, world=2, n_train=16,
                        cfg=TrainConfig(data="d", out="o", cache="c", batch_size=2, fsdp=True))
