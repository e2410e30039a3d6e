"""The trainer with the DPO variants that need more than summed log-probs: WPO, f-DPO, LD-DPO's rewards."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import examples, pairs_run_setup, steps, train_run

from prefcache.cli import main
from prefcache.training.config import TrainConfig

LN2 = math.log(2)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    return pairs_run_setup(tmp_path_factory.mktemp("variants"), tiny_model, 12, max_length=48)


def run(setup, out, **kw):
    """One step on all 12 pairs unless ``kw`` says otherwise; the run's step and example logs."""
    train_run(setup, out, **{"max_steps": 1, "batch_size": 12, **kw})
    return steps(out), examples(out)


def test_wpo_step_zero_loss_is_ln2_times_the_mean_pair_weight(setup, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.model.pairs import pair_logps

    steps, _ = run(setup, tmp_path / "wpo", use_weighting=True)
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    pairs, _, _ = load_dataset_pairs(str(setup["data"]), tokenizer, 48, "keep_start")
    with torch.no_grad():
        pol = pair_logps(model, pairs, pad_id=tokenizer.pad_token_id, wpo=True)
    weights = torch.exp(pol.chosen_wpo.double() + pol.rejected_wpo.double())
    assert (weights - 1).abs().max() > 0.05  # not all 1: the test can tell weighted from unweighted
    first = steps.filter(pl.col("step") == 1).row(0, named=True)  # measured on the step-0 policy = reference
    assert first["loss"] == pytest.approx(LN2 * weights.mean().item(), rel=1e-5)
    assert abs(first["rewards_margins"]) < 1e-5


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_starts_at_ln2(setup, tmp_path, kind):
    steps, _ = run(setup, tmp_path / kind, f_divergence=kind, eval_fraction=0.25, max_steps=2, batch_size=3)
    base = steps.filter((pl.col("split") == "eval") & (pl.col("step") == 0)).row(0, named=True)
    assert base["loss"] == pytest.approx(LN2, abs=1e-6)


def test_logged_rewards_under_ld_alpha_are_ld_weighted(setup, tmp_path):
    from prefcache.losses import LossInputs, combined_loss
    from prefcache.training.pairs import example_cols

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # one pair, chosen 4 tokens, rejected 2: prefixes over the first 2 tokens of each
    x = LossInputs(t([-10.0]), t([-6.0]), t([-12.0]), t([-5.0]), t([4.0]), t([2.0]),
                   t([-4.0]), t([-6.0]), t([-5.0]), t([-5.0]))
    result = combined_loss(["sft"], None, x, ld_alpha=0.5)

    class Pair:
        id, prompt_ids, chosen_ids, rejected_ids = "a", [1], [1, 2, 3, 4], [1, 2]

    cols = example_cols([Pair], x, result, 0.1, ld_alpha=0.5)
    # ld(π_c) = -4 + 0.5 (-6) = -7, ld(ref_c) = -5 + 0.5 (-7) = -8.5: reward 0.1 · 1.5; rejected: no tail, 0.1 · -1
    assert cols["reward_chosen"] == pytest.approx([0.15]) and cols["reward_rejected"] == pytest.approx([-0.1])
    assert cols["margin"] == pytest.approx([0.25])
    assert cols["policy_chosen_logps"] == [-10.0]  # the log-prob columns stay the plain sums
    # and the trainer logs them: sft alone with a cache, rewards differ from β × raw where the lengths differ
    _, examples = run(setup, tmp_path / "ld", loss="sft", ld_alpha=0.5, max_steps=2, batch_size=6, lr=5e-2)
    rows = examples.filter(pl.col("step") == 2)
    raw = 0.1 * (rows["policy_chosen_logps"] - rows["ref_chosen_logps"])
    longer = rows["chosen_tokens"] > rows["rejected_tokens"]
    assert longer.any() and (rows.filter(longer)["reward_chosen"] - raw.filter(longer)).abs().min() > 1e-7


def test_cli_has_every_loss_option():
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--help"])
    for option in ("--discopop-tau", "--use-weighting", "--f-divergence", "--f-alpha", "--report-to"):
        assert option in result.output, option
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        TrainConfig(data="d", out="o", cache="c", loss="exo_pair")
    with pytest.raises(ValueError, match="defined for the losses"):
        TrainConfig(data="d", out="o", cache="c", loss="nca_pair", f_divergence="forward_kl")
    with pytest.raises(ValueError, match="sort the batch"):
        TrainConfig(data="d", out="o", cache="c", loss="aot", use_weighting=True)


def test_wpo_values_are_the_same_with_prefix_sharing(setup, tokenizer):
    from transformers import AutoModelForCausalLM

    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.model.pairs import pair_logps

    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    pairs, _, _ = load_dataset_pairs(str(setup["data"]), tokenizer, 48, "keep_start")
    with torch.no_grad():
        two = pair_logps(model, pairs, pad_id=tokenizer.pad_token_id, wpo=True, prefix_sharing=False)
        packed = pair_logps(model, pairs, pad_id=tokenizer.pad_token_id, wpo=True, prefix_sharing=True)
    assert packed.n_positions < two.n_positions  # the packed path really ran
    torch.testing.assert_close(packed.chosen_wpo, two.chosen_wpo, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.rejected_wpo, two.rejected_wpo, atol=1e-5, rtol=0)
