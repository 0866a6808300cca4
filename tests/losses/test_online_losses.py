"""PPO and GRPO math against values worked out by hand (the arithmetic is in each docstring)."""

import math

import pytest
import torch

import lft
from lft.losses.grpo import group_advantages, grpo_loss
from lft.losses.logprobs import entropy_from_logits, linear_logprobs
from lft.losses.ppo import (
    AdaptiveKLController,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    ppo_policy_loss,
    whiten,
)


def naive_gae(rewards, values, gamma, lam):
    """The textbook recursion on one unpadded sequence, in plain Python."""
    n = len(rewards)
    advantages = [0.0] * n
    following = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        following = delta + gamma * lam * following
        advantages[t] = following
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_hand_worked():
    """rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lam 0.5: deltas (0.1, 0.1, 0.3),
    A = (0.225, 0.25, 0.3), returns (0.725, 0.85, 1.0)."""
    adv, ret = gae(
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([[0.5, 0.6, 0.7]]),
        torch.ones(1, 3, dtype=torch.bool),
        gamma=1.0,
        lam=0.5,
    )
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])


def test_gae_matches_a_naive_loop_on_padded_rows():
    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    padded_rewards = rewards.masked_fill(~mask, 123.0)  # garbage past the end must not leak in
    adv, ret = gae(padded_rewards, values.masked_fill(~mask, -55.0), mask, gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths):
        want_adv, want_ret = naive_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), 0.9, 0.8)
        assert adv[row, :n].tolist() == pytest.approx(want_adv, abs=1e-5)
        assert ret[row, :n].tolist() == pytest.approx(want_ret, abs=1e-5)
        assert adv[row, n:].abs().sum() == 0 and ret[row, n:].abs().sum() == 0


def test_policy_loss_hand_worked_and_gradient_sign():
    """old -1, A 1: logp -1 -> r 1, loss -1; logp -0.5 -> r 1.6487 clipped to 1.2, loss -1.2.
    Mean -1.1, clip fraction 1/2. Only the unclipped token gets a gradient: d(-A r)/dlogp = -r = -1."""
    logps = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    loss, metrics = ppo_policy_loss(
        logps, torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    )
    assert loss.item() == pytest.approx(-1.1)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    assert logps.grad[0].tolist() == pytest.approx([-0.5, 0.0])  # -1 / 2 tokens; the clipped one gets none


def test_policy_loss_negative_advantage_is_clipped_pessimistically():
    """A = -1, r = 0.5: max(-A r, -A clip(r)) = max(0.5, 0.8) = 0.8."""
    loss, metrics = ppo_policy_loss(
        torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    )
    assert loss.item() == pytest.approx(0.8)
    assert metrics["clip_fraction"].item() == 1.0


def test_value_loss_hand_worked():
    """V 2, V_old 1, R 3, clip 0.5: V_clip 1.5; max((2-3)^2, (1.5-3)^2) = 2.25; half is 1.125."""
    loss, clipped = clipped_value_loss(
        torch.tensor([[2.0]]),
        torch.tensor([[1.0]]),
        torch.tensor([[3.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        clip=0.5,
    )
    assert loss.item() == pytest.approx(1.125) and clipped.item() == 1.0


def test_kl_estimators_hand_worked():
    """logp -1, ref -2: k1 = 1; d = -1, k3 = e^-1 - 1 + 1 = 0.36788. Equal log-probs: both 0."""
    logp, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0])
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([1.0, 0.0])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1), 0.0])
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")


def test_kl_penalty_goes_on_every_token_and_the_score_on_the_last():
    """scores [1, 2], kl [[0.5, 0.2, 0.1], [0.3, 0.4, pad]], beta 0.1:
    row 0: [-0.05, -0.02, -0.01 + 1]; row 1: [-0.03, -0.04 + 2, 0]."""
    kl = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = kl_penalized_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.1)
    assert rewards.tolist() == [pytest.approx([-0.05, -0.02, 0.99]), pytest.approx([-0.03, 1.96, 0.0])]


def test_whiten_hand_worked():
    """[1, 2, 3] with a masked 100: mean 2, unbiased variance 1 -> [-1, 0, 1, 0]."""
    out = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([True, True, True, False]))
    assert out.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)


def test_explained_variance_hand_worked():
    """R [1, 2, 3], V [1, 2, 2]: 1 - (1/3) / 1 = 2/3; constant returns are reported as 0."""
    mask = torch.ones(3, dtype=torch.bool)
    assert explained_variance(
        torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), mask
    ).item() == pytest.approx(2 / 3)
    assert explained_variance(torch.zeros(3), torch.zeros(3), mask).item() == 0.0


def test_adaptive_kl_controller_hand_worked():
    """beta 0.1, target 6, horizon 10000, kl 12, n 100: error clipped to 0.2; 0.1 * 1.002 = 0.1002.
    kl 5.4: error -0.1; 0.1002 * (1 - 0.1 * 100 / 10000) = 0.1002 * 0.999. No target: fixed."""
    control = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert control.update(12.0, 100) == pytest.approx(0.1002)
    assert control.update(5.4, 100) == pytest.approx(0.1002 * 0.999)
    assert AdaptiveKLController(0.1).update(100.0, 100) == 0.1
    restored = AdaptiveKLController(0.5)
    restored.load_state_dict(control.state_dict())
    assert restored.beta == control.beta


def test_group_advantages_for_a_hand_made_group():
    """Group [1, 0, 0, 1]: mean 0.5, unbiased std 0.57735 -> +-0.5 / (0.57735 + 1e-4) = +-0.86588.
    Group [2, 2, 2, 2]: all equal, advantage 0. Without scaling: +-0.5 and 0."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    scaled = group_advantages(rewards, 4, "group")
    assert scaled.tolist() == pytest.approx([0.86588, -0.86588, -0.86588, 0.86588, 0, 0, 0, 0], abs=1e-5)
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_advantages_scaled_by_the_batch():
    """Rewards [1, 0, 0, 1, 2, 2, 2, 2] have batch mean 1.25 and unbiased variance
    (2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 7 = 5.5 / 7 (std 0.88641); the first group's centred
    rewards +-0.5 become +-0.5 / (0.88641 + 1e-4) = +-0.56401."""
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, "batch")
    assert out[:4].tolist() == pytest.approx([0.56401, -0.56401, -0.56401, 0.56401], abs=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(8), 3)


@pytest.mark.parametrize("variant, expected", [("grpo", 0.0), ("dapo", -1 / 3), ("dr_grpo", -0.25)])
def test_grpo_token_normalisations(variant, expected):
    """A: 2 tokens, advantage +1; B: 1 token, advantage -1; ratios 1, so token losses -1, -1, +1.
    grpo: mean(mean(-1, -1), +1) = 0; dapo: (-1 - 1 + 1) / 3; dr_grpo: -1 / (2 sequences * 2)."""
    logps = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = grpo_loss(logps, logps, torch.tensor([1.0, -1.0]), mask, variant, max_completion_length=2)
    assert loss.item() == pytest.approx(expected)
    assert metrics["clip_fraction"].item() == 0.0


def test_grpo_kl_term_and_clip_higher():
    """One token, A = 1, logp = old = 0, ref = -1, beta 0.5: surrogate -1, k3 with d = -1 is
    e^-1 = 0.36788, so the loss is -1 + 0.5 * 0.36788 = -0.81606.
    With r = 1.25 (logp = log 1.25): clip_eps 0.2 caps the gain at 1.2 (loss -1.2); clip_eps_high
    0.28 leaves it at 1.25 (loss -1.25)."""
    one = torch.ones(1, 1, dtype=torch.bool)
    loss, metrics = grpo_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), one, beta=0.5, ref_logps=-torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(-1 + 0.5 * math.exp(-1))
    assert metrics["kl_token"].item() == pytest.approx(math.exp(-1))
    up = torch.full((1, 1), math.log(1.25))
    assert grpo_loss(up, torch.zeros(1, 1), torch.ones(1), one)[0].item() == pytest.approx(-1.2)
    assert grpo_loss(up, torch.zeros(1, 1), torch.ones(1), one, clip_eps_high=0.28)[0].item() == pytest.approx(-1.25)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(up, up, torch.ones(1), one, beta=0.1)


def test_entropy_hand_worked_and_chunked():
    """Logits [0, 0]: entropy log 2. Chunked entropy equals the plain computation."""
    assert entropy_from_logits(torch.zeros(1, 2)).item() == pytest.approx(math.log(2))
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(7, 5), torch.randn(11, 5), torch.randn(11)
    expected = entropy_from_logits(hidden @ weight.t() + bias)
    _, entropy = linear_logprobs(hidden, weight, torch.zeros(7, dtype=torch.long), bias, chunk=3, entropy=True)
    assert entropy.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


# -- importance-sampling correction of an engine's samples (lft.losses.sampling) -----------------------------------


def sampler_case():
    """Two real tokens with policy/engine log-ratios ln 2 and ln 4, one padding position."""
    logps = torch.tensor([[math.log(2), math.log(4), 5.0]])
    return logps, torch.zeros(1, 3), torch.tensor([[True, True, False]])


@pytest.mark.parametrize(
    "mode, weights, clipped",
    [
        ("token_truncate", [2.0, 3.0, 0.0], 0.5),  # ratios 2, 4; 4 truncated at 3
        ("token_mask", [1.0, 0.0, 0.0], 0.5),  # 4 is outside [0, 3]: masked
        ("sequence_truncate", [3.0, 3.0, 0.0], 1.0),  # the sequence's ratio 2 x 4 = 8, truncated
        ("sequence_mask", [0.0, 0.0, 0.0], 1.0),
    ],
)
def test_sampling_correction_hand_worked(mode, weights, clipped):
    from lft.losses.sampling import SamplingCorrection, correction_weights

    logps, sampled, mask = sampler_case()
    got, metrics = correction_weights(logps, sampled, mask, SamplingCorrection(mode, clip_max=3.0))
    assert got[0].tolist() == pytest.approx(weights)
    assert float(metrics["is_clipped"]) == pytest.approx(clipped)
    assert float(metrics["sampler_logp_diff"]) == pytest.approx((math.log(2) + math.log(4)) / 2)
    expected_mean = 8.0 if mode.startswith("sequence") else 3.0
    assert float(metrics["is_ratio_mean"]) == pytest.approx(expected_mean)


def test_sampling_correction_lower_bound_and_no_gradient():
    from lft.losses.sampling import SamplingCorrection, correction_weights

    logps = torch.tensor([[math.log(0.25), 0.0]], requires_grad=True)
    got, _ = correction_weights(
        logps, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), SamplingCorrection("token_truncate", 3.0, 0.5)
    )
    assert got[0].tolist() == pytest.approx([0.5, 1.0]) and not got.requires_grad  # 0.25 raised to 0.5
    masked, _ = correction_weights(
        logps, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), SamplingCorrection("token_mask", 3.0, 0.5)
    )
    assert masked.tolist() == [[0.0, 1.0]]


def test_grpo_and_ppo_weight_each_tokens_loss():
    """Ratios 1, advantage 1: token losses -1, -1; weights [2, 0.5] give grpo mean(-2, -0.5) = -1.25
    over one sequence, and PPO's token mean the same -1.25."""
    logps = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    weights = torch.tensor([[2.0, 0.5]])
    loss, _ = grpo_loss(logps, logps, torch.tensor([1.0]), mask, "grpo", weights=weights)
    assert float(loss) == pytest.approx(-1.25)
    policy, _ = ppo_policy_loss(logps, logps, torch.ones(1, 2), mask, 0.2, weights)
    assert float(policy) == pytest.approx(-1.25)


def test_cispo_caps_the_ratio_as_a_constant_weight_hand_worked():
    """Two tokens of one sequence, A = 1, logp = -1 each; the first sampled at old = -1.5
    (ratio e^0.5 = 1.6487, capped at 1.5), the second at old = -1 (ratio 1). Token losses
    -w * A * logp = 1.5 and 1.0; token mean 1.25. The weight has no gradient, so
    d loss / d logp = -w / 2 = -0.75 and -0.5."""
    logps = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = grpo_loss(logps, old, torch.tensor([1.0]), mask, "cispo", cispo_max=1.5)
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert logps.grad.tolist() == [pytest.approx([-0.75, -0.5])]
    assert float(metrics["clip_fraction"]) == pytest.approx(0.5)  # the first token hit the cap


def test_sapo_soft_gate_hand_worked():
    """On policy (r = 1) the gate is sigmoid(0) = 0.5: the token loss is -(4 / tau) * 0.5 * A, so
    -2 for A = +1 (tau 1) and +4 / 1.05 * 0.5 = 1.90476 for A = -1 (tau 1.05); one token each,
    mean 0.5 * (-2 + 1.90476) = -0.04762. Its gradient there is the plain policy gradient:
    (4 / tau) * sigmoid'(0) * tau * r = 1 per unit of A, so d loss / d logp = -A / 2 per sequence."""
    logps = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, _ = grpo_loss(logps, logps.detach(), torch.tensor([1.0, -1.0]), mask, "sapo", sapo_temperatures=(1.0, 1.05))
    assert loss.item() == pytest.approx(0.5 * (-2 + 4 / 1.05 * 0.5), rel=1e-5)  # float32
    loss.backward()
    assert logps.grad[:, 0].tolist() == pytest.approx([-0.5, 0.5])


def test_bnpo_is_the_token_mean_over_the_batch():
    """The example of grpo_loss's docstring: (-1 - 1 + 1) / 3 = -1/3, as dapo."""
    logps = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = grpo_loss(logps, logps, torch.tensor([1.0, -1.0]), mask, "bnpo")
    assert float(loss) == pytest.approx(-1 / 3)


def test_grpo_epsilon_high_is_the_clip_higher_option():
    config = lft.load_config(overrides=["plugins=[grpo]", "grpo.epsilon_high=0.28"])
    assert config.section("grpo").clip_eps_high == 0.28


def test_leave_one_out_advantages_hand_worked():
    """Group [1, 0, 0, 0]: the first sample's baseline is the mean of (0, 0, 0) = 0, advantage 1; each
    other's is the mean of (1, 0, 0) = 1/3, advantage -1/3. Group [2, 4]: baselines 4 and 2, advantages
    -2 and +2. Each is k / (k - 1) times the plain centred reward (4/3 * 0.75 = 1)."""
    from lft.losses.rloo import leave_one_out_advantages

    advantages = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert advantages.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert leave_one_out_advantages(torch.tensor([2.0, 4.0]), 2).tolist() == [-2.0, 2.0]
    scaled = leave_one_out_advantages(torch.tensor([2.0, 4.0]), 2, scale=True)
    assert scaled.tolist() == pytest.approx([-2 / math.sqrt(8), 2 / math.sqrt(8)])  # std of (-2, 2) = sqrt(8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(torch.tensor([1.0]), 1)


def test_rloo_reductions_and_gradient_hand_worked():
    """Sequence A (2 tokens, advantage +1), B (1 token, advantage -1), ratios 1: token losses -1, -1, +1.
    token: -1/3; sequence (REINFORCE on each sequence's log-prob): (-2 + 1) / 2 = -0.5. With ratio 1 the
    gradient of -A * r on a token is -A: d/d logp = -1/2 on each of A's tokens, +1/2 on B's (sequence)."""
    from lft.losses.rloo import rloo_loss

    logps = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    advantages = torch.tensor([1.0, -1.0])
    token, _ = rloo_loss(logps, logps.detach(), advantages, mask, "token")
    assert token.item() == pytest.approx(-1 / 3)
    sequence, metrics = rloo_loss(logps, logps.detach(), advantages, mask, "sequence")
    assert sequence.item() == pytest.approx(-0.5) and metrics["clip_fraction"].item() == 0.0
    sequence.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 0.5, 0.0])


def test_online_dpo_ranks_best_against_worst_by_hand():
    """Rewards [0, 1, 1, 0 | 2, 2, 2, 2] in groups of 4: prompt 0's pair is row 1 (its first best) against
    row 0 (its first worst); prompt 1 has no pair, every sample scoring 2."""
    from lft.plugins.online_dpo import rank_pairs

    chosen, rejected, ranked = rank_pairs(torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4)
    assert ranked.tolist() == [True, False]
    assert (chosen[0].item(), rejected[0].item()) == (1, 0)


def test_gkd_divergences_hand_worked():
    """Two tokens, teacher P = (1, 0), student Q = (1/2, 1/2). Forward KL(P || Q) = log 2 = 0.693147. JSD(0.5):
    M = (3/4, 1/4), KL(P || M) = log(4/3) = 0.287682, KL(Q || M) = 1/2 log(2/3) + 1/2 log 2 = 0.143841, so
    0.5 * 0.287682 + 0.5 * 0.143841 = 0.215762. Teacher P = (1/2, 1/2) and student Q = (3/4, 1/4): reverse
    KL(Q || P) = 3/4 log(3/2) + 1/4 log(1/2) = 0.130812. The mean skips masked positions; the gradient
    pulls the student's logit of the teacher's token up."""
    from lft.losses.gkd import gkd_loss, token_divergence

    certain, even = torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, 0.0]])
    assert token_divergence(even, certain, 0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    assert token_divergence(even, certain, 0.5).item() == pytest.approx(0.215762, abs=1e-6)
    skewed = torch.tensor([[math.log(3.0), 0.0]])
    assert token_divergence(skewed, even, 1.0).item() == pytest.approx(0.130812, abs=1e-6)
    student = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]], requires_grad=True)
    loss = gkd_loss(student, torch.stack([certain, even], 1), torch.tensor([[True, False]]), beta=0.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert student.grad[0, 0, 0] < 0 and student.grad[0, 1].abs().sum() == 0
    with pytest.raises(ValueError, match="beta must be in"):
        token_divergence(even, even, 1.5)


def test_tied_groups_by_hand():
    """Rewards [0, 1 | 2, 2] in groups of 2: the second group's samples all scored the same."""
    from lft.losses.grpo import tied_groups

    assert tied_groups(torch.tensor([0.0, 1.0, 2.0, 2.0]), 2).tolist() == [False, True]
