"""Preference losses against values worked out by hand, with the gradient's sign."""

import math

import pytest
import torch

from lft.losses import (
    BradleyTerryLoss,
    CPOLoss,
    DPOLoss,
    HingeDPOLoss,
    IPOLoss,
    ORPOLoss,
    PairLogps,
    RobustDPOLoss,
    SimPOLoss,
    WithChosenNLL,
)
from lft.losses.orpo import log_odds


def pair(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_tokens=1, rejected_tokens=1):
    t = lambda v: None if v is None else torch.tensor([float(v)], dtype=torch.float64, requires_grad=True)  # noqa: E731
    return PairLogps(
        t(chosen),
        t(rejected),
        torch.tensor([chosen_tokens]),
        torch.tensor([rejected_tokens]),
        t(ref_chosen),
        t(ref_rejected),
    )


def grads(logps, loss):
    loss.backward()
    return logps.chosen.grad.item(), logps.rejected.grad.item()


# pi_c = -10, pi_r = -12, ref_c = ref_r = -11: log-ratios +1 and -1, margin h = 2; beta = 0.1: beta*h = 0.2.
DPO_PAIR = dict(chosen=-10, rejected=-12, ref_chosen=-11, ref_rejected=-11)


def test_dpo_sigmoid_by_hand():
    """loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139.
    rewards = beta * log-ratio = +0.1 and -0.1.
    d loss / d pi_c = -beta * sigmoid(-0.2) = -0.1 * 0.450166 = -0.0450166 (raising the chosen
    log-prob lowers the loss); d loss / d pi_r = +0.0450166."""
    logps = pair(**DPO_PAIR)
    out = DPOLoss(beta=0.1)(logps)
    assert out.loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)
    g_c, g_r = grads(logps, out.loss)
    assert g_c == pytest.approx(-0.0450166, abs=1e-6) and g_r == pytest.approx(0.0450166, abs=1e-6)


def test_dpo_label_smoothing_is_conservative_dpo():
    """eps = 0.1: 0.9 * -log sigmoid(0.2) + 0.1 * -log sigmoid(-0.2)
    = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.538325 + 0.079814 = 0.618139
    (-log sigmoid(-x) = -log sigmoid(x) + x, so the second term is 0.598139 + 0.2).
    Gradient on pi_c: beta * (-(0.9) * sigmoid(-0.2) + 0.1 * sigmoid(0.2))
    = 0.1 * (-0.405150 + 0.054983) = -0.0350166: still negative."""
    logps = pair(**DPO_PAIR)
    out = DPOLoss(beta=0.1, label_smoothing=0.1)(logps)
    assert out.loss.item() == pytest.approx(0.618139, abs=1e-6)
    g_c, g_r = grads(logps, out.loss)
    assert g_c == pytest.approx(-0.0350166, abs=1e-6) and g_r > 0


def test_robust_dpo_by_hand():
    """eps = 0.1: (0.9 * 0.598139 - 0.1 * 0.798139) / (1 - 0.2) = (0.538325 - 0.079814) / 0.8
    = 0.458511 / 0.8 = 0.573139 (= 0.598139 - eps * beta h / (1 - 2 eps) = 0.598139 - 0.025).
    Gradient on pi_c: beta * (-0.9 * sigmoid(-0.2) - 0.1 * sigmoid(0.2)) / 0.8
    = 0.1 * (-0.405150 - 0.054983) / 0.8 = -0.0575166."""
    logps = pair(**DPO_PAIR)
    out = RobustDPOLoss(beta=0.1, label_smoothing=0.1)(logps)
    assert out.loss.item() == pytest.approx(0.573139, abs=1e-6)
    g_c, g_r = grads(logps, out.loss)
    assert g_c == pytest.approx(-0.0575166, abs=1e-6) and g_r == pytest.approx(0.0575166, abs=1e-6)


def test_ipo_by_hand():
    """tau = 0.1: target margin 1 / (2 tau) = 5; loss = (2 - 5)^2 = 9.
    d loss / d pi_c = 2 (h - 5) = -6; d loss / d pi_r = +6."""
    logps = pair(**DPO_PAIR)
    out = IPOLoss(beta=0.1)(logps)
    assert out.loss.item() == pytest.approx(9.0)
    assert grads(logps, out.loss) == pytest.approx((-6.0, 6.0))


def test_ipo_averages_the_log_ratios_over_tokens():
    """The same sums over 2 tokens each: log-ratios +1/2 and -1/2, h = 1; (1 - 5)^2 = 16.
    d loss / d pi_c = 2 (1 - 5) / 2 = -4; rewards 0.1 * (+-1/2) = +-0.05."""
    logps = pair(**DPO_PAIR, chosen_tokens=2, rejected_tokens=2)
    out = IPOLoss(beta=0.1)(logps)
    assert out.loss.item() == pytest.approx(16.0)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.05, -0.05))
    assert grads(logps, out.loss) == pytest.approx((-4.0, 4.0))


def test_ipo_stops_pushing_past_its_target():
    """h = 6 > 5: loss (6 - 5)^2 = 1 and the gradient on pi_c is +2: IPO pulls the margin back."""
    logps = pair(chosen=-10, rejected=-16, ref_chosen=-11, ref_rejected=-11)
    out = IPOLoss(beta=0.1)(logps)
    assert out.loss.item() == pytest.approx(1.0)
    assert grads(logps, out.loss) == pytest.approx((2.0, -2.0))


def test_hinge_by_hand():
    """max(0, 1 - 0.1 * 2) = 0.8; gradient on pi_c = -beta = -0.1. With h = 20 the margin is met:
    loss 0 and no gradient."""
    logps = pair(**DPO_PAIR)
    out = HingeDPOLoss(beta=0.1)(logps)
    assert out.loss.item() == pytest.approx(0.8)
    assert grads(logps, out.loss) == pytest.approx((-0.1, 0.1))
    met = pair(chosen=-1, rejected=-20, ref_chosen=-11, ref_rejected=-11)
    out = HingeDPOLoss(beta=0.1)(met)
    assert out.loss.item() == 0.0 and grads(met, out.loss) == (0.0, 0.0)


def test_dpo_with_chosen_nll_is_rpo():
    """DPO pair above, chosen sum -10 over 5 tokens: NLL = 10 / 5 = 2; weight 0.5:
    0.598139 + 0.5 * 2 = 1.598139. d/d pi_c = -0.0450166 - 0.5 / 5 = -0.1450166;
    the rejected gradient is DPO's alone, +0.0450166."""
    logps = pair(**DPO_PAIR, chosen_tokens=5, rejected_tokens=5)
    loss = WithChosenNLL(DPOLoss(beta=0.1), weight=0.5)
    assert loss.needs_reference
    out = loss(logps)
    assert out.loss.item() == pytest.approx(1.598139, abs=1e-6) and out.metrics["nll"].item() == pytest.approx(2.0)
    assert grads(logps, out.loss) == pytest.approx((-0.1450166, 0.0450166), abs=1e-6)


def test_dpo_family_needs_the_reference():
    for cls in (DPOLoss, RobustDPOLoss, IPOLoss, HingeDPOLoss):
        assert cls.needs_reference is True
        with pytest.raises(ValueError, match="needs the reference"):
            cls()(pair(chosen=-1, rejected=-2))
    for loss in (ORPOLoss(), SimPOLoss(), BradleyTerryLoss()):
        assert loss.needs_reference is False


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        RobustDPOLoss(label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0)
    with pytest.raises(ValueError, match="beta"):
        SimPOLoss(beta=-1)


def test_orpo_by_hand():
    """Chosen: 2 tokens summing to 2 log 0.5, so P = exp(mean) = 0.5 and odds = 1, log odds = 0.
    Rejected: 1 token, log 0.2, so odds = 0.2 / 0.8 = 0.25, log odds = log 0.25 = -1.386294.
    Log odds ratio = log 4; odds-ratio term = -log sigmoid(log 4) = -log(4/5) = 0.223144.
    NLL of the chosen tokens = -2 log 0.5 / 2 = 0.693147.
    lambda = 0.1: loss = 0.693147 + 0.1 * 0.223144 = 0.715461."""
    logps = pair(chosen=2 * math.log(0.5), rejected=math.log(0.2), chosen_tokens=2, rejected_tokens=1)
    out = ORPOLoss(weight=0.1)(logps)
    assert out.loss.item() == pytest.approx(0.715461, abs=1e-6)
    assert out.metrics["nll"].item() == pytest.approx(0.693147, abs=1e-6)
    assert out.metrics["odds_ratio_loss"].item() == pytest.approx(0.223144, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.0, abs=1e-5)
    assert out.rejected_rewards.item() == pytest.approx(math.log(0.25), abs=1e-6)
    g_c, g_r = grads(logps, out.loss)
    assert g_c < 0 and g_r > 0


def test_orpo_rejected_gradient_by_hand():
    """Only the odds-ratio term depends on the rejected sum s (1 token, P = e^s = 0.2):
    d log odds / d s = 1 + P / (1 - P) = 1 / (1 - P) = 1.25, and
    d (-log sigmoid(z)) / d z = -sigmoid(-z) = -1/5 at z = log 4, with z = lo_c - lo_r.
    So d loss / d s = 0.1 * (-0.2) * (-1.25) = +0.025."""
    logps = pair(chosen=2 * math.log(0.5), rejected=math.log(0.2), chosen_tokens=2, rejected_tokens=1)
    _, g_r = grads(logps, ORPOLoss(weight=0.1)(logps).loss)
    assert g_r == pytest.approx(0.025, abs=1e-6)


def test_log_odds_is_finite_near_certainty():
    values = log_odds(torch.tensor([-1e-9, -50.0, math.log(0.5)]))
    assert torch.isfinite(values).all() and values[2].item() == pytest.approx(0.0, abs=1e-6)


def test_simpo_by_hand():
    """Chosen sum -10 over 5 tokens (mean -2), rejected -12 over 4 tokens (mean -3).
    beta = 2, gamma = 1: z = 2 * (-2) - 2 * (-3) - 1 = 1; loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    Rewards 2 * mean: -4 and -6.
    d loss / d chosen_sum = -sigmoid(-1) * beta / 5 = -0.268941 * 0.4 = -0.1075766;
    d loss / d rejected_sum = +0.268941 * 2 / 4 = +0.1344707."""
    logps = pair(chosen=-10, rejected=-12, chosen_tokens=5, rejected_tokens=4)
    out = SimPOLoss(beta=2.0, gamma=1.0)(logps)
    assert out.loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-4.0, -6.0))
    assert grads(logps, out.loss) == pytest.approx((-0.1075766, 0.1344707), abs=1e-6)


def test_simpo_is_length_normalised():
    """Doubling a completion's length and its log-prob sum leaves SimPO's loss unchanged."""
    a = SimPOLoss()(pair(chosen=-10, rejected=-12, chosen_tokens=5, rejected_tokens=4)).loss
    b = SimPOLoss()(pair(chosen=-20, rejected=-12, chosen_tokens=10, rejected_tokens=4)).loss
    assert a.item() == pytest.approx(b.item())


def test_cpo_sigmoid_with_its_nll_by_hand():
    """No reference: h = pi_c - pi_r = -10 - (-12) = 2; beta = 0.1: -log sigmoid(0.2) = 0.598139 (as DPO's
    first test, whose log-ratio margin is also 2). NLL of the chosen answer: 10 nats over 2 tokens = 5.
    loss = 0.598139 + 5 = 5.598139. d/d pi_c = -0.1 * sigmoid(-0.2) - 1/2 = -0.0450166 - 0.5 = -0.5450166;
    d/d pi_r = +0.0450166. Rewards beta * pi: -1.0 and -1.2."""
    logps = pair(chosen=-10, rejected=-12, chosen_tokens=2)
    loss = WithChosenNLL(CPOLoss(beta=0.1), 1.0)
    assert not loss.needs_reference
    out = loss(logps)
    assert out.terms["pairs"].item() == pytest.approx(0.598139, abs=1e-6)
    assert out.terms["chosen_tokens"].item() == pytest.approx(5.0)
    assert out.loss.item() == pytest.approx(5.598139, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -1.2))
    assert grads(logps, out.loss) == pytest.approx((-0.5450166, 0.0450166), abs=1e-6)


def test_cpo_hinge_ipo_and_smoothing_by_hand():
    """hinge: max(0, 1 - 0.1 * 2) = 0.8, and with beta = 1, max(0, 1 - 2) = 0.
    ipo on per-token means: chosen -10 / 2 = -5, rejected -12 / 1 = -12, margin 7; beta = 0.1 puts the
    target at 1 / 0.2 = 5: (7 - 5)^2 = 4; rewards 0.1 * (-5) = -0.5 and 0.1 * (-12) = -1.2.
    Smoothing 0.1: 0.9 * 0.598139 + 0.1 * (0.598139 + 0.2) = 0.618139."""
    logps = dict(chosen=-10, rejected=-12, chosen_tokens=2)
    assert CPOLoss(0.1, "hinge")(pair(**logps)).loss.item() == pytest.approx(0.8)
    assert CPOLoss(1.0, "hinge")(pair(**logps)).loss.item() == 0.0
    ipo = CPOLoss(0.1, "ipo")(pair(**logps))
    assert ipo.loss.item() == pytest.approx(4.0)
    assert (ipo.chosen_rewards.item(), ipo.rejected_rewards.item()) == pytest.approx((-0.5, -1.2))
    assert CPOLoss(0.1, label_smoothing=0.1)(pair(**logps)).loss.item() == pytest.approx(0.618139, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid form"):
        CPOLoss(0.1, "hinge", label_smoothing=0.1)


def test_bradley_terry_by_hand():
    """r_c = 1, r_r = -0.5: -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.223130) = 0.201413;
    d/dr_c = -sigmoid(-1.5) = -0.182426, d/dr_r = +0.182426.
    With margin 1: -log sigmoid(0.5) = log(1.606531) = 0.474077.
    Centring 0.01 adds 0.01 * (1 - 0.5)^2 = 0.0025."""
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([-0.5], requires_grad=True)
    loss = BradleyTerryLoss()(chosen, rejected)
    assert loss.item() == pytest.approx(0.201413, abs=1e-6)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.182426, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.182426, abs=1e-6)
    with_margin = BradleyTerryLoss()(chosen, rejected, margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(0.474077, abs=1e-6)
    centred = BradleyTerryLoss(center_coefficient=0.01)(chosen, rejected)
    assert centred.item() == pytest.approx(0.201413 + 0.0025, abs=1e-6)


def test_losses_average_over_the_batch():
    """Two pairs with DPO margins 2 and 0: (0.598139 + log 2) / 2 = (0.598139 + 0.693147) / 2 = 0.645643."""
    logps = PairLogps(
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-12.0, -5.0]),
        torch.tensor([1, 1]),
        torch.tensor([1, 1]),
        torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]),
    )
    assert DPOLoss(beta=0.1)(logps).loss.item() == pytest.approx(0.645643, abs=1e-6)


def test_plugins_build_their_losses_from_options():
    from lft.plugins.dpo import DPO, DPOOptions
    from lft.plugins.orpo import ORPO, ORPOOptions
    from lft.plugins.simpo import SimPO, SimPOOptions

    assert isinstance(DPO().loss(DPOOptions(loss="ipo", beta=0.5)), IPOLoss)
    robust = DPO().loss(DPOOptions(loss="robust", label_smoothing=0.2))
    assert isinstance(robust, RobustDPOLoss) and robust.label_smoothing == 0.2
    rpo = DPO().loss(DPOOptions(nll_weight=1.0))
    assert isinstance(rpo, WithChosenNLL) and rpo.needs_reference and isinstance(rpo.loss, DPOLoss)
    simpo = SimPO().loss(SimPOOptions(nll_weight=0.5, gamma=0.3))
    assert isinstance(simpo, WithChosenNLL) and not simpo.needs_reference and simpo.loss.gamma == 0.3
    assert ORPO().loss(ORPOOptions(odds_ratio_weight=0.2)).weight == 0.2
    with pytest.raises(ValueError, match="label_smoothing applies to loss=sigmoid or robust"):
        DPOOptions(loss="ipo", label_smoothing=0.1)


def test_kto_by_hand():
    """policy [-1, -3], reference [-2, -2]: rewards r = [1, -1]. Mismatched pairs: policy [-2, -2], reference
    [-2.5, -1.5], log-ratios [0.5, -0.5], mean 0, so z0 = 0. beta = 1: desirable value sigmoid(1 - 0) =
    0.731059, undesirable sigmoid(0 - (-1)) = 0.731059; loss = mean(1 - 0.731059, 1 - 0.731059) = 0.268941.
    d loss / d policy[0] = -(1/2) sigmoid'(1) = -(1/2)(0.196612) = -0.098306; policy[1]: +0.098306."""
    from lft.losses.kto import KTOLoss

    loss = KTOLoss(beta=1.0)
    z0 = loss.reference_point(torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -1.5]))
    assert z0.item() == 0.0
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    value, rewards = loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), z0)
    assert value.item() == pytest.approx(1 - 1 / (1 + math.exp(-1)), abs=1e-6)
    assert rewards.tolist() == [1.0, -1.0]
    value.backward()
    assert policy.grad.tolist() == pytest.approx([-0.098306, 0.098306], abs=1e-6)


def test_kto_reference_point_and_weights_by_hand():
    """Mismatched log-ratios [2, 4]: z0 = 3, with no gradient. r = [3, 3] (one desirable, one not), beta = 0.5,
    lambda_D = 2, lambda_U = 1: desirable value 2 sigmoid(0) = 1, undesirable sigmoid(0) = 0.5;
    loss = mean(2 - 1, 1 - 0.5) = 0.75. A negative KL estimate gives z0 = 0."""
    from lft.losses.kto import KTOLoss

    kl_policy = torch.tensor([2.0, 4.0], requires_grad=True)
    z0 = KTOLoss.reference_point(kl_policy, torch.tensor([0.0, 0.0]))
    assert z0.item() == 3.0 and not z0.requires_grad
    loss = KTOLoss(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    value, _ = loss(torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, False]), z0)
    assert value.item() == pytest.approx(0.75)
    assert KTOLoss.reference_point(torch.tensor([-5.0]), torch.tensor([0.0])).item() == 0.0
