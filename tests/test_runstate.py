"""runstate: what a training loop carries from step to step, saved into checkpoints and restored from them."""

from __future__ import annotations

import pytest
import torch
from conftest import Saves

from prefcache.training.checkpoint import check_resumable, latest_checkpoint, load_trainer_state, save
from prefcache.training.config import TrainConfig
from prefcache.training.log import RunLog
from prefcache.training.state import RunState, held_out_ids, make_optimization
from prefcache.training.trackers import Trackers


def _run(tmp_path, cfg, state=None, group_by_length=False) -> RunState:
    """A run built whole: its policy, optimizer, schedule and trackers are constructor arguments."""
    optimizer, scheduler, _ = make_optimization(cfg, list(torch.nn.Linear(3, 2).parameters()), total_steps=10,
                                                state=state)
    return RunState(cfg=cfg, out=tmp_path, rank=0, world=1, device="cpu", steps_per_epoch=4, total_steps=10,
                    n_train=16, max_length=64, truncation="keep_start", group_by_length=group_by_length,
                    log=RunLog(tmp_path), policy=Saves(), policy_info={"model_name": "m"}, tokenizer=Saves(),
                    optimizer=optimizer, scheduler=scheduler, trackers=Trackers((), tmp_path))


def test_due_every_n_steps_and_at_the_last(tmp_path):
    run = _run(tmp_path, TrainConfig(data="d", out=str(tmp_path), cache="c"))
    due = {every: [s for s in range(1, 11) if (setattr(run, "step", s) or run.due(every))] for every in (None, 3, 1)}
    assert due == {None: [10], 3: [3, 6, 9, 10], 1: list(range(1, 11))}


def test_held_out_ids_do_not_depend_on_row_order():
    ids = [f"id{i}" for i in range(40)]
    held = held_out_ids(ids, 0.25)
    assert len(held) == 10 and held == held_out_ids(list(reversed(ids)), 0.25)
    assert len(held_out_ids(ids[:3], 0.01)) == 1  # at least one


def test_a_resume_with_another_data_order_is_refused():
    cfg = TrainConfig(data="d", out="o", cache="c", batch_size=4, seed=1)
    state = {"world_size": 1, "n_train": 16, "batch_size": 2, "grad_accum": 1, "seed": 1}  # before length grouping
    with pytest.raises(ValueError, match=r"batch_size: checkpoint has 2, now 4\n  group_by_length: checkpoint has "
                                         r"False, now True"):
        check_resumable(state, world=1, n_train=16, cfg=cfg)
    check_resumable({**state, "batch_size": 4, "group_by_length": True}, world=1, n_train=16, cfg=cfg)


def test_a_resume_with_other_data_or_another_cache_is_refused_and_an_older_checkpoint_is_not():
    cfg = TrainConfig(data="d", out="o", cache="c")
    had = {"data": "aaaa", "eval_data": None, "cache": "cccc", "eval_cache": None}
    state = {"world_size": 1, "n_train": 16, "batch_size": 4, "grad_accum": 1, "seed": 42, "group_by_length": True,
             "fingerprints": had}
    now = {**had, "data": "bbbb", "cache": "dddd"}
    with pytest.raises(ValueError, match=r"other settings:\n  data \(the training examples, in order\): checkpoint has "
                                         r"'aaaa', now 'bbbb'\n  cache \(.*\): checkpoint has 'cccc', now 'dddd'$"):
        check_resumable(state, world=1, n_train=16, cfg=cfg, fingerprints=now)
    check_resumable(state, world=1, n_train=16, cfg=cfg, fingerprints=had)
    older = {k: v for k, v in state.items() if k != "fingerprints"}  # nothing recorded: nothing to compare
    check_resumable(older, world=1, n_train=16, cfg=cfg, fingerprints=now)


def test_save_then_restore_continues_the_run(tmp_path):
    cfg = TrainConfig(data="d", out=str(tmp_path), cache="c", loss="bco_pair", warmup_steps=0, lr=1e-3)
    run = _run(tmp_path, cfg, group_by_length=True)
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    run.optimizer.step()
    run.scheduler.step()
    run.step, run.last_eval_step = 3, 2
    run.bco.update(1.5, 6)
    save(run, 3)
    after_save = torch.rand(4)
    state = load_trainer_state(latest_checkpoint(tmp_path))
    assert (state["step"], state["bco"], state["group_by_length"], state["last_eval_step"]) == (3, (1.5, 6), True, 2)
    again = _run(tmp_path, cfg, state=state)
    again.restore(state)
    assert (again.step, again.last_saved, again.last_eval_step, again.bco.value) == (3, 3, 2, 0.25)
    assert again.elapsed_before == state["elapsed_s"] and torch.equal(torch.rand(4), after_save)  # RNGs restored
    assert again.scheduler.last_epoch == 3 and again.optimizer.state_dict()["state"]  # Adam's moments came back


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_weight_decay_shrinks_matrices_only(optimizer):
    """With zero gradients an AdamW step is its decoupled weight decay alone, w <- w (1 - lr wd): the
    matrices shrink by exactly that and the biases and norm weights (1-D) do not move."""
    cfg = TrainConfig(data="d", out="o", cache="c", lr=0.5, weight_decay=0.1, optimizer=optimizer)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.LayerNorm(80), torch.nn.Linear(80, 64, bias=False))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, _, _ = make_optimization(cfg, list(model.parameters()), total_steps=10, state=None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.5 * 0.1) if p.ndim >= 2 else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)
    assert {name for name, p in model.named_parameters() if p.ndim < 2} == {"0.bias", "1.weight", "1.bias"}
