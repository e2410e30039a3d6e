"""scoring: the policy side of a pair (summed and LD-DPO prefix log-probs), cached values joined by id,
implicit rewards and their means."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from conftest import completion_logps

from prefcache.cache.lookup import ReferenceTable, check_joined
from prefcache.cache.store import CacheError
from prefcache.data.pairs import TokenizedPair
from prefcache.model.pairs import pair_logps, pair_tensors
from prefcache.training.scoring import aggregate, score_pairs


def _pair(i, prompt, chosen, rejected):
    return TokenizedPair(f"p{i}", prompt, chosen, rejected, False, False)


PAIRS = [_pair(0, [5, 6, 7], [8, 9], [10, 11, 12, 13]), _pair(1, [5, 20], [21, 22, 23], [24]),
         _pair(2, [30, 31, 32, 33], [34], [35, 36])]


@pytest.fixture(scope="module")
def lm(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()


def _by_hand(lm, pair):
    """Per-token log-probs of each completion, one sequence at a time (no padding)."""
    return [completion_logps(lm, pair.prompt_ids, completion) for completion in (pair.chosen_ids, pair.rejected_ids)]


def test_aggregate_by_hand():
    cols = {"id": ["a", "b", "c", "d"], "reward_chosen": [1.0, 0.0, -1.0, 2.0], "reward_rejected": [0.0, 0.0, 1.0, 1.0],
            "margin": [1.0, 0.0, -2.0, 1.0], "policy_chosen_logps": [-1.0, -2.0, -3.0, -4.0],
            "policy_rejected_logps": [-4.0, -4.0, -4.0, -4.0]}
    got = aggregate(cols)
    assert got == {"rewards_chosen": 0.5, "rewards_rejected": 0.5, "rewards_margins": 0.0,
                   "rewards_accuracies": 0.5,  # the tie (margin 0) counts as wrong
                   "logps_chosen": -2.5, "logps_rejected": -4.0, "n": 4}
    assert aggregate({"id": []}) == {"n": 0}


def test_pair_tensors_rows_chosen_then_rejected():
    input_ids, attention, completion = pair_tensors(PAIRS[:2], pad_id=0)
    assert input_ids.shape[0] == 4
    assert completion[0].sum() == 2 and completion[2].sum() == 4  # pair 0 chosen, pair 0 rejected
    assert completion[1].sum() == 3 and completion[3].sum() == 1
    assert attention[0].sum() == 5 and attention[3].sum() == 3


@pytest.mark.parametrize("sharing", [False, True])
def test_pair_logps_sums_and_ld_prefixes_by_hand(lm, sharing):
    pol = pair_logps(lm, PAIRS, pad_id=0, prefix_sharing=sharing)
    for i, pair in enumerate(PAIRS):
        chosen, rejected = _by_hand(lm, pair)
        shared = min(len(chosen), len(rejected))  # LD-DPO's public length
        torch.testing.assert_close(pol.chosen[i].double(), chosen.sum(), atol=1e-4, rtol=0)
        torch.testing.assert_close(pol.rejected[i].double(), rejected.sum(), atol=1e-4, rtol=0)
        torch.testing.assert_close(pol.chosen_prefix[i].double(), chosen[:shared].sum(), atol=1e-4, rtol=0)
        torch.testing.assert_close(pol.rejected_prefix[i].double(), rejected[:shared].sum(), atol=1e-4, rtol=0)
        assert pol.chosen_tokens[i] == len(pair.chosen_ids) and pol.rejected_tokens[i] == len(pair.rejected_ids)
    real = sum(len(p.prompt_ids) * (1 if sharing else 2) + len(p.chosen_ids) + len(p.rejected_ids) for p in PAIRS)
    assert pol.n_tokens == real
    assert pol.n_positions >= real


def test_pair_logps_has_gradients_only_when_enabled(lm):
    with torch.no_grad():
        assert not pair_logps(lm, PAIRS[:1], pad_id=0).chosen.requires_grad
    assert pair_logps(lm, PAIRS[:1], pad_id=0).chosen.requires_grad


def _reference(values: dict[str, list], order: list[int]) -> ReferenceTable:
    """A ReferenceTable whose rows are stored in ``order`` (not the pairs' order)."""
    cols = {"id": [f"p{i}" for i in order]} | {c: [v[i] for i in order] for c, v in values.items()}
    return ReferenceTable(pa.table(cols), {"prefix_sharing": False}, "ref-cache")


def _ref_values(pairs, chosen, rejected):
    return {"chosen_logps": chosen, "rejected_logps": rejected, "chosen_logps_prefix": chosen,
            "rejected_logps_prefix": rejected, "prompt_tokens": [len(p.prompt_ids) for p in pairs],
            "chosen_tokens": [len(p.chosen_ids) for p in pairs], "rejected_tokens": [len(p.rejected_ids) for p in pairs]}


def test_reference_lookup_is_by_id_not_row_order():
    ref = _reference(_ref_values(PAIRS, [-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]), order=[2, 0, 1])
    got = ref.lookup(["p1", "p2", "p0"])
    assert got["chosen_logps"].tolist() == [-2.0, -3.0, -1.0]
    assert got["rejected_logps"].dtype == torch.float64
    with pytest.raises(CacheError, match=r"1 of 2 example ids are not in the cache ref-cache, e.g. nope"):
        ref.lookup(["p0", "nope"])


def test_check_joined_refuses_other_token_counts():
    ref = _reference(_ref_values(PAIRS, [-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]), order=[0, 1, 2])
    check_joined(ref, PAIRS, "training")
    changed = [PAIRS[0], _pair(1, [5, 20], [21, 22], [24]), PAIRS[2]]
    with pytest.raises(CacheError, match=r"1 of the training pairs have other token counts .* e.g. p1"):
        check_joined(ref, changed, "training")


def test_score_pairs_rewards_are_beta_times_policy_minus_reference(lm):
    with torch.no_grad():
        pol = pair_logps(lm, PAIRS, pad_id=0)
    ref_c, ref_r = [float(v) - 0.5 for v in pol.chosen], [float(v) + 0.25 for v in pol.rejected]
    ref = _reference(_ref_values(PAIRS, ref_c, ref_r), order=[1, 2, 0])
    cols, means = score_pairs(lm, PAIRS, ref, beta=0.2, batch_size=2, pad_id=0)
    assert cols["id"] == ["p0", "p1", "p2"]
    for i in range(3):
        assert cols["reward_chosen"][i] == pytest.approx(0.2 * 0.5, abs=1e-5)
        assert cols["reward_rejected"][i] == pytest.approx(-0.2 * 0.25, abs=1e-5)
        assert cols["margin"][i] == pytest.approx(0.15, abs=1e-5)
        assert cols["chosen_tokens"][i] == len(PAIRS[i].chosen_ids)
    assert means["rewards_accuracies"] == 1.0 and means["n"] == 3
    assert math.isclose(means["rewards_margins"], 0.15, abs_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("sharing", [False, True])
def test_pair_logps_on_cuda_equal_cpu(lm, sharing):
    cpu = pair_logps(lm, PAIRS, pad_id=0, prefix_sharing=sharing)
    gpu = pair_logps(lm.cuda(), PAIRS, pad_id=0, device="cuda", prefix_sharing=sharing)
    lm.cpu()
    for field in ("chosen", "rejected", "chosen_prefix", "rejected_prefix"):
        torch.testing.assert_close(getattr(gpu, field).detach().cpu(), getattr(cpu, field).detach(), atol=1e-4, rtol=0)
    assert gpu.n_tokens == cpu.n_tokens
