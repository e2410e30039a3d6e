"""prefcache.losses: numbers worked out by hand, invariants, TRL's formulas, the registry."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from prefcache.losses import LOSSES, LossInputs, combined_loss, ld_logps

BETA = 0.1
# Three pairs of summed log-probs (nats): the policy ahead of the reference (h = 1.5), behind (h = -3)
# and ahead again (h = 2.25), with unequal token counts so the per-token losses differ from the rest.
PC = [-10.0, -22.5, -7.25]
PR = [-12.0, -20.0, -9.5]
RC = [-11.0, -21.0, -8.0]
RR = [-11.5, -21.5, -8.0]
NC = [5.0, 12.0, 3.0]
NR = [8.0, 9.0, 4.0]

ALL_NAMES = [
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "orpo", "simpo",
]  # fmt: skip


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# exo_pair has no valid ε = 0 (log 0; TRL 1.16 refuses it): these tests use the EXO paper's 1e-3 unless told.
DEFAULT_OPTIONS = {"exo_pair": {"label_smoothing": 1e-3}}


def call(name, pc=PC, pr=PR, rc=RC, rr=RR, nc=NC, nr=NR, **options):
    """Call LOSSES[name] directly, with the token counts it declares."""
    spec = LOSSES[name]
    options = {**DEFAULT_OPTIONS.get(name, {}), **options}
    tokens = {"chosen_tokens": t(nc), "rejected_tokens": t(nr)}
    extra = {field: tokens[field] for field in spec.inputs}
    as_t = [x if isinstance(x, torch.Tensor) or x is None else t(x) for x in (pc, pr, rc, rr)]
    return spec.fn(*as_t, beta=options.pop("beta", BETA), **extra, **options)


# ---- plain-float versions of every formula, written from the papers / TRL, one example at a time ----
def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def soft_bce(x: float, eps: float) -> float:
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


class Row(NamedTuple):
    pc: float
    pr: float
    rc: float
    rr: float
    nc: float
    nr: float

    @property
    def c(self):  # chosen log-ratio
        return self.pc - self.rc

    @property
    def r(self):  # rejected log-ratio
        return self.pr - self.rr

    @property
    def h(self):
        return self.c - self.r


def rows(pc=PC, pr=PR, rc=RC, rr=RR, nc=NC, nr=NR) -> list[Row]:
    return [Row(*x) for x in zip(pc, pr, rc, rr, nc, nr, strict=True)]


def log1mexp(a: float) -> float:
    return math.log(1 - math.exp(a))


def hand(name: str, b: float = BETA, eps=0.0, tau=0.05, delta=0.0, gamma=0.5, **data) -> list[float]:
    rs = rows(**data)
    per_row = {
        "sigmoid": lambda x: soft_bce(b * x.h, eps),
        "hinge": lambda x: max(0.0, 1 - b * x.h),
        "ipo": lambda x: (x.c / x.nc - x.r / x.nr - 1 / (2 * b)) ** 2,
        "robust": lambda x: ((1 - eps) * -logsig(b * x.h) - eps * -logsig(-b * x.h)) / (1 - 2 * eps),
        "exo_pair": lambda x: (
            sig(b * x.h) * (logsig(b * x.h) - math.log(1 - (eps or 1e-3)))
            + sig(-b * x.h) * (logsig(-b * x.h) - math.log(eps or 1e-3))
        ),
        "nca_pair": lambda x: -logsig(b * x.c) - 0.5 * logsig(-b * x.c) - 0.5 * logsig(-b * x.r),
        "bco_pair": lambda x: -logsig(b * x.c - delta) - logsig(-(b * x.r - delta)),
        "sppo_hard": lambda x: (x.c - 1 / (2 * b)) ** 2 + (x.r + 1 / (2 * b)) ** 2,
        "apo_zero": lambda x: (1 - sig(b * x.c)) + sig(b * x.r),
        "apo_down": lambda x: sig(b * x.c) + (1 - sig(b * x.h)),
        "discopop": lambda x: (
            -logsig(b * x.h) * (1 - sig(b * x.h / tau)) + math.exp(-b * x.h) * sig(b * x.h / tau)
        ),
        "sigmoid_norm": lambda x: -logsig(b * (x.c / x.nc - x.r / x.nr)),
        "orpo": lambda x: (
            -b * logsig((x.pc / x.nc - log1mexp(x.pc / x.nc)) - (x.pr / x.nr - log1mexp(x.pr / x.nr)))
        ),
        "simpo": lambda x: soft_bce(b * x.pc / x.nc - b * x.pr / x.nr - gamma, eps),
    }
    if name in per_row:
        return [per_row[name](x) for x in rs]
    if name == "aot":  # sorted policy margins against sorted reference margins
        d = [
            p - q
            for p, q in zip(sorted(x.pc - x.pr for x in rs), sorted(x.rc - x.rr for x in rs), strict=True)
        ]
        return [soft_bce(b * v, eps) for v in d]
    if name == "aot_unpaired":  # sorted chosen log-ratios against sorted rejected log-ratios
        d = [p - q for p, q in zip(sorted(x.c for x in rs), sorted(x.r for x in rs), strict=True)]
        return [soft_bce(b * v, eps) for v in d]
    if name == "sft":  # TRL: token-mean NLL over the batch; example i's share of it
        total_tokens = sum(x.nc for x in rs)
        return [-x.pc * len(rs) / total_tokens for x in rs]
    raise KeyError(name)


CASES = [
    ("sigmoid", {}, {}),
    ("sigmoid", {"label_smoothing": 0.2}, {"eps": 0.2}),
    ("hinge", {}, {}),
    ("ipo", {}, {}),
    ("robust", {}, {}),
    ("robust", {"label_smoothing": 0.1}, {"eps": 0.1}),
    ("exo_pair", {}, {}),
    ("exo_pair", {"label_smoothing": 0.01}, {"eps": 0.01}),
    ("nca_pair", {}, {}),
    ("bco_pair", {}, {}),
    ("bco_pair", {"bco_delta": 0.05}, {"delta": 0.05}),
    ("sppo_hard", {}, {}),
    ("aot", {}, {}),
    ("aot", {"label_smoothing": 0.1}, {"eps": 0.1}),
    ("aot_unpaired", {}, {}),
    ("aot_unpaired", {"label_smoothing": 0.1}, {"eps": 0.1}),
    ("apo_zero", {}, {}),
    ("apo_down", {}, {}),
    ("discopop", {}, {}),
    ("discopop", {"discopop_tau": 0.5}, {"tau": 0.5}),
    ("sigmoid_norm", {}, {}),
    ("sft", {}, {}),
    ("orpo", {}, {}),
    ("orpo", {"beta": 0.25}, {"b": 0.25}),
    ("simpo", {}, {}),
    (
        "simpo",
        {"beta": 2.0, "simpo_gamma": 0.3, "label_smoothing": 0.1},
        {"b": 2.0, "gamma": 0.3, "eps": 0.1},
    ),
]


def test_cases_cover_every_loss():
    assert sorted({name for name, _, _ in CASES}) == sorted(LOSSES) == sorted(ALL_NAMES)


@pytest.mark.parametrize("name,options,hand_options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_hand_worked_values(name, options, hand_options):
    out = call(name, **options)
    assert_close(out.losses, t(hand(name, **hand_options)))


def test_a_few_values_worked_fully_by_hand():
    # example 0: Δc = 1, Δr = -0.5, h = 1.5, β h = 0.15
    assert_close(call("sigmoid").losses[0].item(), 0.6209570477895321)  # log(1 + e^-0.15)
    assert_close(call("hinge").losses[0].item(), 0.85)  # 1 - 0.15
    assert_close(call("ipo").losses[0].item(), 22.44390625)  # (1/5 + 0.5/8 - 5)^2 = (0.2625 - 5)^2
    assert_close(call("sppo_hard").losses[0].item(), 36.25)  # (1 - 5)^2 + (-0.5 + 5)^2
    assert_close(call("sft").losses.mean().item(), (10 + 22.5 + 7.25) / 20)  # summed NLL / chosen tokens


# ---- rewards ----
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if LOSSES[n].needs_ref])
def test_rewards_are_beta_times_logratios_detached(name):
    pc = t(PC).requires_grad_()
    out = call(name, pc=pc)
    assert_close(out.chosen_rewards, BETA * (t(PC) - t(RC)))
    assert_close(out.rejected_rewards, BETA * (t(PR) - t(RR)))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.shape == (3,) and out.losses.requires_grad


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_rewards_follow_trl_per_token_policy_logps(name):
    out = call(name, rc=None, rr=None)
    assert_close(out.chosen_rewards, BETA * t(PC) / t(NC))
    assert_close(out.rejected_rewards, BETA * t(PR) / t(NR))


# ---- zero margin: policy == reference (ref-free losses: equal per-token log-probs) ----
Z = [-4.0, -9.0, -1.5]
ZN = [2.0, 3.0, 1.0]
LN2 = math.log(2)
ZERO = {
    "sigmoid": LN2,
    "hinge": 1.0,
    "ipo": (1 / (2 * BETA)) ** 2,
    "robust": LN2,  # for any flip rate: ((1-ε) - ε) ln 2 / (1 - 2ε)
    "exo_pair": -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3)),
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / BETA) ** 2,
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": (LN2 + 1) / 2,
    "sigmoid_norm": LN2,
    "orpo": BETA * LN2,
    "simpo": math.log1p(math.exp(0.5)),  # -log σ(-γ)
}  # sft has no margin; its value is checked in test_hand_worked_values


@pytest.mark.parametrize("name", sorted(ZERO))
def test_zero_margin_value(name):
    options = {"label_smoothing": 0.1} if name == "robust" else {}
    out = call(name, pc=Z, pr=Z, rc=Z, rr=Z, nc=ZN, nr=ZN, **options)
    assert_close(out.losses, torch.full((3,), ZERO[name], dtype=torch.float64))


# ---- gradient direction: d loss / d policy_chosen <= 0 and d loss / d policy_rejected >= 0 ----
def grads(name, pc, pr, rc, rr, nc=(4.0, 6.0, 10.0), nr=(5.0, 7.0, 3.0), **options):
    pc, pr = t(pc).requires_grad_(), t(pr).requires_grad_()
    call(name, pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr, **options).losses.sum().backward()
    zero = torch.zeros(len(pc), dtype=torch.float64)
    return (zero if pc.grad is None else pc.grad), (zero if pr.grad is None else pr.grad)


# policy == reference; and the policy behind the reference (β h in [-1.2, -0.6]).
AT_ZERO = dict(
    pc=[-10.0, -20.0, -5.0], pr=[-12.0, -18.0, -6.0], rc=[-10.0, -20.0, -5.0], rr=[-12.0, -18.0, -6.0]
)
BEHIND = dict(
    pc=[-15.0, -23.0, -13.0], pr=[-10.0, -15.0, -2.0], rc=[-10.0, -20.0, -5.0], rr=[-12.0, -18.0, -6.0]
)
# Where the sign does not hold everywhere (so only these two regions are tested):
# - ipo, sppo_hard, exo_pair regress to a target margin, nca_pair raises the chosen reward only until
#   β Δc = ln 2, and label smoothing (cDPO, aot) has a finite optimum: past it the gradient reverses.
# - apo_down lowers the chosen likelihood by design (eq. 8): its chosen gradient has no fixed sign.
# - discopop is non-monotone near zero margin (see test_discopop_gradient_positive_at_zero_margin).
CHOSEN_SIGN_EXEMPT = {"apo_down"}


GRAD_CASES = [(n, r) for n in ALL_NAMES for r in ("at_zero", "behind") if (n, r) != ("discopop", "at_zero")]


@pytest.mark.parametrize("name,region", GRAD_CASES)
def test_gradient_pushes_chosen_up_and_rejected_down(name, region):
    g_chosen, g_rejected = grads(name, **(AT_ZERO if region == "at_zero" else BEHIND))
    if name not in CHOSEN_SIGN_EXEMPT:
        assert (g_chosen <= 0).all(), g_chosen
    assert (g_rejected >= 0).all(), g_rejected
    if name not in CHOSEN_SIGN_EXEMPT | {"sft"}:
        assert (g_chosen - g_rejected < 0).all()  # the margin is pushed up strictly


def test_sft_gradient_is_per_token_nll():
    g_chosen, g_rejected = grads("sft", **AT_ZERO)
    # d(Σ_i losses_i) / d π_c,i = -B / Σ chosen tokens = -3 / 20 (for the mean: -1 / 20 = TRL's)
    assert_close(g_chosen, torch.full((3,), -3 / 20, dtype=torch.float64))
    assert_close(g_rejected, torch.zeros(3, dtype=torch.float64))


def test_discopop_gradient_positive_at_zero_margin():
    # d/dx at x = β h = 0 with τ = 0.05: -σ(0)(1 - m) - e^0 m + m' (e^0 + log σ(0)), m = ½, m' = ¼ / τ
    d_dx = -0.5 * 0.5 - 0.5 + (0.25 / 0.05) * (1 - LN2)
    g_chosen, g_rejected = grads("discopop", **AT_ZERO)
    assert d_dx > 0
    assert_close(g_chosen, torch.full((3,), BETA * d_dx, dtype=torch.float64))
    assert_close(g_rejected, -g_chosen)


@pytest.mark.parametrize("name", ["ipo", "sppo_hard", "exo_pair"])
def test_target_losses_pull_back_past_their_target(name):
    # Δc = 40, Δr = -40: β h = 8, past IPO's 1/(2β) per token, SPPO's ±5 and EXO's ln((1-ε)/ε) ≈ 6.9
    g_chosen, _ = grads(name, pc=[30.0], pr=[-50.0], rc=[-10.0], rr=[-10.0], nc=[1.0], nr=[1.0])
    assert (g_chosen > 0).all()


# ---- label smoothing ----
def test_sigmoid_label_smoothing_is_expected_loss_over_flipped_labels():
    eps = 0.2
    flipped = call("sigmoid", pc=PR, pr=PC, rc=RR, rr=RC).losses
    expected = (1 - eps) * call("sigmoid").losses + eps * flipped
    assert_close(call("sigmoid", label_smoothing=eps).losses, expected)


def test_cdpo_optimum_margin():
    eps = 0.1
    h_star = math.log((1 - eps) / eps) / BETA  # d/dh [-(1-ε) log σ(βh) - ε log σ(-βh)] = 0
    g = [
        grads("sigmoid", pc=[h], pr=[0.0], rc=[0.0], rr=[0.0], label_smoothing=eps)[0].item()
        for h in (h_star - 1, h_star, h_star + 1)
    ]
    assert g[0] < 0 < g[2] and abs(g[1]) < 1e-12  # cDPO stops pushing at h*, and pulls back beyond it


def test_robust_is_unbiased_under_label_noise():
    eps = 0.1
    loss = call("robust", label_smoothing=eps).losses
    loss_flipped = call("robust", pc=PR, pr=PC, rc=RR, rr=RC, label_smoothing=eps).losses
    assert_close((1 - eps) * loss + eps * loss_flipped, call("sigmoid").losses)


def test_robust_without_noise_is_dpo_and_rejects_half():
    assert_close(call("robust").losses, call("sigmoid").losses)
    with pytest.raises(ValueError, match="0.5"):
        call("robust", label_smoothing=0.5)


def test_exo_refuses_zero_smoothing_and_kl_vanishes_at_target():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        call("exo_pair", label_smoothing=0.0)  # TRL 1.16 refuses it too: the loss would be +inf
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        combined_loss(["exo_pair"], None, inputs())
    eps = 0.05
    h = math.log((1 - eps) / eps) / BETA  # σ(βh) = 1 - ε: the model matches the label distribution
    out = call("exo_pair", pc=[h], pr=[0.0], rc=[0.0], rr=[0.0], nc=[1.0], nr=[1.0], label_smoothing=eps)
    assert_close(out.losses, t([0.0]))


def test_aot_sorts_over_the_batch():
    # one example: nothing to sort, aot is DPO; aot_unpaired likewise
    one = dict(pc=PC[:1], pr=PR[:1], rc=RC[:1], rr=RR[:1], nc=NC[:1], nr=NR[:1])
    assert_close(call("aot", **one).losses, call("sigmoid", **one).losses)
    assert_close(call("aot_unpaired", **one).losses, call("sigmoid", **one).losses)
    # permuting the batch permutes nothing: losses are per quantile
    perm = [2, 0, 1]
    shuffled = {k: [v[i] for i in perm] for k, v in dict(pc=PC, pr=PR, rc=RC, rr=RR).items()}
    assert_close(call("aot", **shuffled).losses, call("aot").losses)


# ---- TRL's formulas, written the way TRL's code writes them ----
def test_against_trl_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr = -40 * torch.rand(2, 16, generator=g, dtype=torch.float64)
    rc, rr = torch.stack([pc, pr]) + 3 * torch.randn(2, 16, generator=g, dtype=torch.float64)
    nc, nr = torch.randint(1, 30, (2, 16), generator=g).double()
    beta, eps = 0.1, 0.1
    delta = (pc - rc) - (pr - rr)

    def ours(name, **kw):
        extra = {"chosen_tokens": nc, "rejected_tokens": nr}
        extra = {k: extra[k] for k in LOSSES[name].inputs}
        return LOSSES[name].fn(pc, pr, rc, rr, beta=beta, **extra, **kw).losses

    # robust (trl 1.x): clean / flipped terms
    clean = -(1 - eps) * F.logsigmoid(beta * delta)
    flipped = -eps * F.logsigmoid(-beta * delta)
    assert_close(ours("robust", label_smoothing=eps), (clean - flipped) / (1 - 2 * eps))
    # exo_pair (trl 1.x)
    e = torch.tensor(eps, dtype=torch.float64)
    qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
    ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
    assert_close(
        ours("exo_pair", label_smoothing=eps), qw * (log_qw - torch.log1p(-e)) + ql * (log_ql - torch.log(e))
    )
    # ipo (trl 1.x): per-token log-ratios
    ipo_delta = (pc - rc) / nc.clamp(min=1.0) - (pr - rr) / nr.clamp(min=1.0)
    assert_close(ours("ipo"), (ipo_delta - 1 / (2 * beta)) ** 2)
    # discopop (trl 1.x)
    logits = delta * beta
    mod = torch.sigmoid(logits / 0.05)
    assert_close(ours("discopop"), -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod)
    # orpo (ORPOTrainer.odds_ratio_loss on average log-probs; TRL returns β log σ, subtracted from the NLL)
    ac, ar = pc / nc, pr / nr
    log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
    assert_close(ours("orpo"), -(beta * F.logsigmoid(log_odds)))
    # simpo (CPOTrainer on average log-probs)
    s_logits = (ac - ar) - 0.5 / beta
    assert_close(
        ours("simpo", label_smoothing=eps),
        -F.logsigmoid(beta * s_logits) * (1 - eps) - F.logsigmoid(-beta * s_logits) * eps,
    )


def test_sft_mean_equals_trl_cross_entropy_over_chosen_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]]).bool()
    token_logps = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    pc = token_logps.sum(1)
    out = LOSSES["sft"].fn(pc, pc, None, None, beta=BETA, chosen_tokens=mask.sum(1).double())
    assert_close(out.losses.mean(), F.cross_entropy(logits[mask], labels[mask]))


def test_ld_logps_matches_trl_shared_and_tail_masks():
    g = torch.Generator().manual_seed(2)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1 (TRL's [chosen; rejected] batch)
    per_token = -torch.rand(4, 9, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 9)
    for row, (start, n) in enumerate([(2, 5), (1, 3), (2, 7), (1, 1)]):
        mask[row, start : start + n] = 1
    per_token = per_token * mask
    alpha = 0.3
    # TRL: position within the completion; shared = first min(chosen_len, rejected_len) tokens
    comp_pos = mask.cumsum(1)
    lens = mask.sum(1).long()
    shared = torch.minimum(*lens.chunk(2)).repeat(2)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared.unsqueeze(1))
    tail_mask = comp_pos > shared.unsqueeze(1)
    trl = (per_token * shared_mask).sum(1) + alpha * (per_token * tail_mask).sum(1)
    assert_close(ld_logps(per_token.sum(1), (per_token * shared_mask).sum(1), alpha), trl)
    assert_close(ld_logps(per_token.sum(1), (per_token * shared_mask).sum(1), 1.0), per_token.sum(1))
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_logps(per_token.sum(1), per_token.sum(1), 1.5)


# ---- numerical edge cases ----
def test_discopop_and_orpo_stay_finite_at_extremes():
    out = LOSSES["discopop"].fn(
        torch.tensor([-1000.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1
    )
    assert_close(out.losses, torch.tensor([100.0]))  # -log σ(-100) = 100; the exp term underflows to 0
    pc, pr = torch.tensor([-1e-4, -300.0], requires_grad=True), torch.tensor([-60.0, -1e-5])
    one = torch.ones(2)
    out = LOSSES["orpo"].fn(pc, pr, beta=0.1, chosen_tokens=one, rejected_tokens=one)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()


# ---- combined_loss and the registry ----
def inputs(**overrides) -> LossInputs:
    base = dict(
        policy_chosen_logps=t(PC), policy_rejected_logps=t(PR), ref_chosen_logps=t(RC), ref_rejected_logps=t(RR),
        chosen_tokens=t(NC), rejected_tokens=t(NR),
    )  # fmt: skip
    base.update(overrides)
    return LossInputs(**base)


def test_combined_weights_add_up():
    names, weights = ["sigmoid", "sft", "ipo"], [1.0, 0.5, 2.0]
    res = combined_loss(names, weights, inputs(), label_smoothing=0.1)
    parts = {
        "sigmoid": call("sigmoid", label_smoothing=0.1).losses,
        "sft": call("sft").losses,
        "ipo": call("ipo").losses,
    }
    assert_close(res.losses, sum(w * parts[n] for n, w in zip(names, weights, strict=True)))
    assert_close(res.loss, sum(w * res.components[n] for n, w in zip(names, weights, strict=True)))
    assert_close(res.loss, res.losses.mean())
    for n in names:
        assert_close(res.components[n], parts[n].mean())
    assert_close(res.chosen_rewards, BETA * (t(PC) - t(RC)))
    loss, per_example, chosen_rewards, rejected_rewards, components = res  # plain tuple unpacking works
    assert set(components) == set(names)


def test_combined_defaults_and_single_name():
    assert_close(combined_loss("hinge", None, inputs()).loss, call("hinge").losses.mean())
    both = combined_loss(["hinge", "sigmoid"], None, inputs(), beta=0.3)
    assert_close(both.losses, call("hinge", beta=0.3).losses + call("sigmoid", beta=0.3).losses)


def test_combined_routes_options_only_to_losses_that_take_them():
    res = combined_loss(["hinge", "discopop", "bco_pair"], None, inputs(), discopop_tau=0.5, bco_delta=0.05)
    assert_close(res.components["discopop"], call("discopop", discopop_tau=0.5).losses.mean())
    assert_close(res.components["bco_pair"], call("bco_pair", bco_delta=0.05).losses.mean())


def test_combined_reference_free_orpo_recipe():
    res = combined_loss(["sft", "orpo"], [1.0, 1.0], inputs(ref_chosen_logps=None, ref_rejected_logps=None))
    assert_close(
        res.loss, call("sft", rc=None, rr=None).losses.mean() + call("orpo", rc=None, rr=None).losses.mean()
    )
    assert_close(res.chosen_rewards, BETA * t(PC) / t(NC))  # first loss other than sft: orpo's rewards


@pytest.mark.parametrize("name", ["sft", "orpo", "simpo"])
def test_reference_free_losses_ignore_the_reference(name):
    assert_close(call(name, rc=None, rr=None).losses, call(name).losses)


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if LOSSES[n].needs_ref])
def test_reference_based_losses_refuse_missing_reference(name):
    with pytest.raises(ValueError, match="reference"):
        call(name, rc=None, rr=None)
    with pytest.raises(ValueError, match="reference"):
        combined_loss([name], None, inputs(ref_chosen_logps=None, ref_rejected_logps=None), label_smoothing=1e-3)


def test_combined_ld_alpha():
    prefixes = dict(
        policy_chosen_logps_prefix=t(PC) * 0.5, policy_rejected_logps_prefix=t(PR) * 0.7,
        ref_chosen_logps_prefix=t(RC) * 0.5, ref_rejected_logps_prefix=t(RR) * 0.7,
    )  # fmt: skip
    x = inputs(**prefixes)
    assert_close(
        combined_loss(["sigmoid"], None, x, ld_alpha=1.0).loss, combined_loss(["sigmoid"], None, x).loss
    )
    a = 0.25
    ld = [ld_logps(t(v), p, a) for v, p in zip((PC, PR, RC, RR), prefixes.values(), strict=True)]
    res = combined_loss(["sigmoid", "sft"], None, x, ld_alpha=a)
    assert_close(res.components["sigmoid"], call("sigmoid", *ld).losses.mean())
    assert_close(res.components["sft"], call("sft").losses.mean())  # the NLL of the text itself
    with pytest.raises(ValueError, match="prefix"):
        combined_loss(["sigmoid"], None, inputs(), ld_alpha=a)


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names") as err:
        combined_loss(["sigmoid", "dpo"], None, inputs())
    assert all(name in str(err.value) for name in ALL_NAMES)
    with pytest.raises(ValueError, match="valid names"):
        combined_loss([], None, inputs())
    with pytest.raises(ValueError, match="repeat"):
        combined_loss(["sigmoid", "sigmoid"], None, inputs())
    with pytest.raises(ValueError, match="weights"):
        combined_loss(["sigmoid", "ipo"], [1.0], inputs())
    with pytest.raises(ValueError, match="label_smoothing"):  # a typo lists the valid options
        combined_loss(["sigmoid"], None, inputs(), label_smothing=0.1)
    with pytest.raises(ValueError, match="chosen_tokens"):
        combined_loss(["ipo"], None, inputs(chosen_tokens=None))


def test_functions_take_the_documented_keyword_names():
    out = LOSSES["sigmoid"].fn(
        policy_chosen_logps=t(PC),
        policy_rejected_logps=t(PR),
        ref_chosen_logps=t(RC),
        ref_rejected_logps=t(RR),
    )
    assert_close(out.losses, call("sigmoid").losses)


def test_registry_flags():
    assert {n for n, s in LOSSES.items() if not s.needs_ref} == {"sft", "orpo", "simpo"}
    needs_tokens = {n for n, s in LOSSES.items() if s.inputs}
    assert needs_tokens == {"ipo", "sigmoid_norm", "sft", "orpo", "simpo"}


# ---- f-DPO: f'(π/π_ref) in place of the log-ratio (TRL 1.16, on the summed log-ratios) ----
def fscore(u: float, kind: str, alpha: float = 0.5) -> float:
    return {"reverse_kl": u, "forward_kl": 1 - math.exp(-u), "js_divergence": LN2 + logsig(u),
            "alpha_divergence": (math.exp((alpha - 1) * u) - 1) / (alpha - 1)}[kind]


F_LOSSES = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", F_LOSSES)
def test_f_divergence_is_the_loss_on_f_scores(name, kind):
    # The hand formulas above, fed with log-ratios replaced by their f-scores (ref = 0, policy = score).
    rs = rows()
    sc, sr = [fscore(x.c, kind) for x in rs], [fscore(x.r, kind) for x in rs]
    eps = {"robust": 0.1, "exo_pair": 0.01}.get(name, 0.0)
    options = {"label_smoothing": eps} if eps else {}
    expected = hand(name, eps=eps, pc=sc, pr=sr, rc=[0.0] * 3, rr=[0.0] * 3)
    out = call(name, f_divergence=kind, **options)
    assert_close(out.losses, t(expected))
    assert_close(out.chosen_rewards, BETA * (t(PC) - t(RC)))  # rewards stay β × log-ratios, as TRL logs them


def test_f_divergence_values_worked_by_hand():
    # example 0: Δc = 1, Δr = -0.5
    # forward KL: 1 - e^-1 = 0.632121, 1 - e^0.5 = -0.648721, h = 1.280842 -> log(1 + e^-0.128084)
    assert_close(call("sigmoid", f_divergence="forward_kl").losses[0].item(), 0.6311543835721054)
    # JS: ln2 + log σ(1) = 0.379885, ln2 + log σ(-0.5) = -0.280930, h = 0.660815
    assert_close(call("sigmoid", f_divergence="js_divergence").losses[0].item(), 0.6606521625101546)
    # α = 0.5: (e^-0.5 - 1) / -0.5 = 0.786939, (e^0.25 - 1) / -0.5 = -0.568051, h = 1.354990; hinge 1 - 0.135499
    assert_close(call("hinge", f_divergence="alpha_divergence").losses[0].item(), 0.8645010486049785)


def test_f_divergence_limits_and_zero_margin():
    assert_close(call("sigmoid", f_divergence="alpha_divergence", f_alpha=1.0).losses, call("sigmoid").losses)
    assert_close(call("sigmoid", f_divergence="reverse_kl").losses, call("sigmoid").losses)
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):  # equal scores: DPO's ln 2 at policy = ref
        assert_close(call("sigmoid", pc=Z, pr=Z, rc=Z, rr=Z, f_divergence=kind).losses, torch.full((3,), LN2, dtype=torch.float64))
    # α-divergence's exponent is clamped as TRL clamps it: a huge log-ratio gives a finite loss
    big = call("sigmoid", pc=[5000.0], pr=[0.0], rc=[0.0], rr=[0.0], nc=[1.0], nr=[1.0],
               f_divergence="alpha_divergence", f_alpha=2.0)
    assert torch.isfinite(big.losses).all()
    with pytest.raises(ValueError, match="f_divergence must be one of"):
        call("sigmoid", f_divergence="kl")


def test_f_divergence_refused_where_trl_refuses_it():
    for name in ("nca_pair", "bco_pair", "sppo_hard", "aot", "apo_zero", "orpo", "simpo"):
        with pytest.raises(ValueError, match="f_divergence 'forward_kl' is defined for the losses"):
            combined_loss([name], None, inputs(), f_divergence="forward_kl")
    res = combined_loss(["sigmoid", "sft"], None, inputs(), f_divergence="js_divergence")  # sft: unaffected
    assert_close(res.components["sigmoid"], call("sigmoid", f_divergence="js_divergence").losses.mean())
    assert_close(res.components["sft"], call("sft").losses.mean())


# ---- WPO: per-pair weights from the policy's own per-token values ----
ALIGNED_C, ALIGNED_R = [-0.2, -1.0, -0.05], [-0.7, -0.3, -2.0]


def test_wpo_weights_multiply_each_pair_worked_by_hand():
    x = inputs(policy_chosen_wpo=t(ALIGNED_C), policy_rejected_wpo=t(ALIGNED_R))
    res = combined_loss(["sigmoid"], None, x, use_weighting=True)
    # example 0: w = e^-0.2 · e^-0.7 = e^-0.9 = 0.406570; loss = log(1 + e^-0.15) · w
    assert_close(res.losses[0].item(), 0.252462295633317)
    w = torch.exp(t(ALIGNED_C) + t(ALIGNED_R))
    assert_close(res.losses, call("sigmoid").losses * w)
    # sft is one batch mean in TRL, weighted as a whole: times the mean weight
    both = combined_loss(["ipo", "sft"], None, x, use_weighting=True)
    assert_close(both.components["ipo"], (call("ipo").losses * w).mean())
    assert_close(both.components["sft"], call("sft").losses.mean() * w.mean())
    assert_close(res.chosen_rewards, BETA * (t(PC) - t(RC)))  # rewards are not weighted


def test_wpo_weights_carry_no_gradient_and_are_refused_for_sorting_losses():
    ac, pc = t(ALIGNED_C).requires_grad_(), t(PC).requires_grad_()
    res = combined_loss(["sigmoid"], None, inputs(policy_chosen_logps=pc, policy_chosen_wpo=ac,
                                                  policy_rejected_wpo=t(ALIGNED_R)), use_weighting=True)
    res.loss.backward()
    assert ac.grad is None and pc.grad is not None
    with pytest.raises(ValueError, match="use_weighting needs"):
        combined_loss(["sigmoid"], None, inputs(), use_weighting=True)
    for name in ("aot", "aot_unpaired"):
        with pytest.raises(ValueError, match="sort the batch"):
            combined_loss([name], None, inputs(policy_chosen_wpo=ac, policy_rejected_wpo=ac), use_weighting=True)


# ---- logged rewards under ld_alpha: β × the LD-weighted log-ratios, whatever the loss ----
def test_rewards_under_ld_alpha_are_beta_times_ld_logratios_even_for_sft_alone():
    prefixes = dict(
        policy_chosen_logps_prefix=t(PC) * 0.5, policy_rejected_logps_prefix=t(PR) * 0.7,
        ref_chosen_logps_prefix=t(RC) * 0.5, ref_rejected_logps_prefix=t(RR) * 0.7,
    )  # fmt: skip
    a = 0.25
    pc, pr, rc, rr = (ld_logps(t(v), p, a) for v, p in zip((PC, PR, RC, RR), prefixes.values(), strict=True))
    for names in (["sigmoid"], ["sft"], ["sft", "ipo"]):
        res = combined_loss(names, None, inputs(**prefixes), ld_alpha=a)
        assert_close(res.chosen_rewards, BETA * (pc - rc))
        assert_close(res.rejected_rewards, BETA * (pr - rr))
    # example 0 by hand: ld(π_c) = -5 + 0.25 · (-5) = -6.25, ld(ref_c) = -5.5 + 0.25 · (-5.5) = -6.875
    assert_close(res.chosen_rewards[0].item(), BETA * 0.625)
