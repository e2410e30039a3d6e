"""config: each command's options, normalised and validated on construction (one clear line)."""

from __future__ import annotations

import dataclasses

import pytest

from prefcache.core.options import check_device
from prefcache.evaluation.config import EvalConfig, ScoreConfig
from prefcache.reference.config import PrecomputeConfig
from prefcache.training.config import TrainConfig


def _train(**kw):
    return TrainConfig(**{"data": "d", "out": "o", "cache": "c", **kw})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _train().beta = 1.0


def test_names_and_weights_are_normalised():
    cfg = _train(loss="sigmoid, sft,", loss_weights="1,0.5")
    assert cfg.loss == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.5)
    assert _train(loss=["ipo"]).loss == ("ipo",)
    assert _train(report_to="none").report_to == ()
    assert EvalConfig(checkpoints="a,b", tasks=["t"]).checkpoints == ("a", "b")


def test_resolved_defaults():
    assert _train(finetune="full").lr == 5e-6 and _train().lr == 5e-5 and _train(lr=1e-4).lr == 1e-4
    assert _train(lora_r=8).lora_alpha == 16.0 and _train(lora_r=8, lora_alpha=4).lora_alpha == 4


def test_columns_are_stored_as_text():
    cfg = PrecomputeConfig(data="d", out="o", columns={"prompt": "question", "chosen": "a"})
    assert cfg.columns == "prompt=question,chosen=a"
    with pytest.raises(ValueError, match="unknown column 'answer'"):
        PrecomputeConfig(data="d", out="o", columns="answer=x")
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        PrecomputeConfig(data="d", out="o", prompt_template="Q: ")


@pytest.mark.parametrize("options, message", [
    ({"beta": float("nan")}, "beta must be positive and finite, got nan"),
    ({"lr": float("inf")}, "lr must be positive and finite"),
    ({"label_smoothing": 0.6}, r"label_smoothing must be a finite number in \[0.0, 0.5\]"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0.0"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be a finite number in \[0, 1\)"),
    ({"eval_fraction": 0.1, "eval_data": "e"}, "eval_data or eval_fraction, not both"),
    ({"eval_cache": "ec"}, "eval_cache needs eval_data"),
    ({"ld_alpha": 2.0}, r"ld_alpha must be a finite number in \[0, 1\]"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be a finite number in \[0, 1\)"),
    ({"max_length": 1}, "max_length must be at least 2"),
    ({"truncation": "middle"}, "truncation must be one of keep_start, keep_end, got 'middle'"),
    ({"on_bad_row": "ignore"}, "on_bad_row must be one of fail, skip"),
    ({"scheduler": "step"}, "scheduler must be one of cosine, linear, constant"),
    ({"loss": "sigmoid,sigmoid"}, "loss must name each loss once"),
    ({"loss": "kto,sigmoid"}, "cannot be combined"),
    ({"loss": "sigmoid", "cache": None}, "loss sigmoid needs the reference cache"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
])
def test_train_refusals(options, message):
    with pytest.raises(ValueError, match=message):
        _train(**options)


def test_reference_free_losses_need_no_cache():
    assert _train(loss="simpo", cache=None).cache is None


def test_precompute_refusals():
    for options, message in [({"quantize": "3bit"}, "quantize must be one of"), ({"shard_size": 0}, "shard_size must be"),
                             ({"kl_group_size": 0}, "kl_group_size must be"), ({"max_length": 1}, "at least 2")]:
        with pytest.raises(ValueError, match=message):
            PrecomputeConfig(data="d", out="o", **options)


def test_eval_and_score_refusals():
    with pytest.raises(ValueError, match="no tasks given"):
        EvalConfig(checkpoints=("a",), tasks="")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalConfig(checkpoints=(), tasks="t", base=False)
    with pytest.raises(ValueError, match="num_fewshot must be >= 0"):
        EvalConfig(checkpoints=("a",), tasks="t", num_fewshot=-1)
    with pytest.raises(ValueError, match="nothing to score"):
        ScoreConfig(checkpoints=(), cache="c", data="d")
    with pytest.raises(ValueError, match="beta must be positive"):
        ScoreConfig(checkpoints=("a",), cache="c", data="d", beta=0.0)


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:3"])
def test_device_names_accepted(device):
    check_device(device)


@pytest.mark.parametrize("device", ["tpu9", "cuda:", "CPU", "cuda:x", None])
def test_device_names_refused(device):
    with pytest.raises(ValueError, match="device must be"):
        check_device(device)
