"""PPO math on small hand-computed tensors: masked statistics, log-probs, KL, rewards, GAE, losses, controllers."""

import math

import pytest
import torch

from rlhf.ppo import (AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss,
                      entropy_from_logits, explained_variance, first_eos_mask, gae, kl_penalty, logprobs_from_logits,
                      masked_mean, masked_sum, masked_var, masked_whiten, missing_eos_penalty, per_token_rewards,
                      truncate_after_eos)

T_, F_ = True, False
NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def m(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ masked stats

MASK = m([T_, T_, T_], [T_, F_, F_])


def test_masked_stats_by_hand_and_padding_ignored():
    # valid tokens 1, 2, 3, 4: sum 10, mean 2.5, squared deviations 2.25 + .25 + .25 + 2.25 = 5
    for pad in (0.0, 1e9, NAN, float("inf")):
        x = t([1, 2, 3], [4, pad, pad])
        assert masked_sum(x, MASK).item() == 10
        assert masked_mean(x, MASK).item() == 2.5
        assert masked_mean(x, MASK, dim=1).tolist() == [2.0, 4.0]
        assert masked_var(x, MASK).item() == pytest.approx(5 / 3)
        assert masked_var(x, MASK, unbiased=False).item() == pytest.approx(5 / 4)


def test_masked_mean_of_empty_row_is_nan_and_var_needs_tokens():
    assert math.isnan(masked_mean(t([1, 2]), m([F_, F_])).item())
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t([1, 2]), m([T_, F_]))
    assert masked_var(t([1, 2]), m([T_, F_]), unbiased=False).item() == 0


def test_masked_whiten():
    x = t([1, 2, 3], [4, NAN, 1e9])
    w = masked_whiten(x, MASK)
    assert w[1, 1:].tolist() == [0.0, 0.0]  # padded outputs are exactly 0
    assert masked_mean(w, MASK).item() == pytest.approx(0, abs=1e-12)
    assert masked_var(w, MASK).item() == pytest.approx(1, abs=1e-6)
    # (1 - 2.5) / sqrt(5/3) = -1.1619
    assert w[0, 0].item() == pytest.approx(-1.5 / math.sqrt(5 / 3), rel=1e-6)
    kept = masked_whiten(x, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(2.5)
    assert kept[1, 1:].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------ log-probs, entropy

def test_masked_whiten_with_a_reduce_uses_every_process_tokens():
    """Two processes (threads exchanging their tensors, as an all-reduce would) whiten their own rows with the
    statistics of both: the result is the whitening of all rows at once, not of each half."""
    import threading
    x = t([1.0, 2.0, NAN], [8.0, 9.0, 10.0], [0.5, NAN, NAN], [4.0, 4.5, NAN])
    mask = m([T_, T_, F_], [T_, T_, T_], [T_, F_, F_], [T_, T_, F_])
    halves = [slice(0, 2), slice(2, 4)]
    slots, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def process(rank):
        def reduce(tensor):  # all-reduce (sum) between the two threads
            slots[rank] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        for shift_mean in (True, False):
            out[rank] = (out[rank] or []) + [masked_whiten(x[halves[rank]], mask[halves[rank]], shift_mean, reduce)]

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, shift_mean in enumerate((True, False)):
        whole = masked_whiten(x, mask, shift_mean)
        assert torch.allclose(torch.cat([out[0][i], out[1][i]]), whole, atol=1e-12)
    assert not torch.allclose(out[0][0], masked_whiten(x[:2], mask[:2]))  # each half alone would differ


def test_logprobs_match_log_softmax_with_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tokens, temperature=0.7), expected, atol=1e-6)
    assert not torch.allclose(logprobs_from_logits(logits, tokens), expected, atol=1e-3)  # T matters
    # bf16 logits take the row-by-row float32 path and give float32 results
    low = logits.bfloat16()
    out = logprobs_from_logits(low, tokens, temperature=0.7)
    assert out.dtype == torch.float32
    assert torch.allclose(out, logprobs_from_logits(low.float(), tokens, temperature=0.7), atol=1e-6)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens[:, :2])


def test_entropy():
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(logits / 1.5, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(entropy_from_logits(logits, temperature=1.5), expected, atol=1e-6)
    assert torch.allclose(entropy_from_logits(logits.bfloat16()), entropy_from_logits(logits.bfloat16().float()))


# ------------------------------------------------------------------------------------------- KL, rewards

def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))  # 0.6931
    # r = ref / p = 0.5: (0.5 - 1) - log 0.5 = -0.5 + 0.6931 = 0.1931
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.1931472, abs=1e-7)
    assert kl_penalty(ref, logp, "abs").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "mse").item() == pytest.approx(0.5 * math.log(2) ** 2)  # 0.2402
    with pytest.raises(ValueError, match="k1, k3, abs, mse"):
        kl_penalty(logp, ref, "k2")


def test_kl_is_exactly_zero_when_policy_is_reference():
    # at step 0 policy == reference, so every estimator gives exactly 0
    logp = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    for kind in ("k1", "k3", "abs", "mse"):
        assert torch.equal(kl_penalty(logp, logp.clone(), kind), torch.zeros(2, 4))


def test_per_token_rewards_score_at_last_valid_token():
    scores = t(1.0, 2.0)
    kl = t([0.1, 0.2, 0.3], [0.4, 99.0, NAN])
    rewards, non_score = per_token_rewards(scores, kl, MASK, kl_coef=0.5)
    # non-score = -0.5 * kl on valid tokens; the score lands at index 2 of row 0 and index 0 of row 1
    assert torch.allclose(non_score, t([-0.05, -0.1, -0.15], [-0.2, 0, 0]))
    assert torch.allclose(rewards, t([-0.05, -0.1, 0.85], [1.8, 0, 0]))
    assert rewards[1, 1:].tolist() == [0.0, 0.0]


def test_per_token_rewards_masked_k3_is_zero_and_empty_row_rejected():
    # padded log-probs far apart make k3 overflow to inf; the mask still gives exactly 0 there
    logp, ref = t([math.log(0.5), 0.0]), t([math.log(0.25), 1000.0])
    kl = kl_penalty(logp, ref, "k3")
    assert math.isinf(kl[0, 1].item())
    rewards, non_score = per_token_rewards(t(0.0), kl, m([T_, F_]), kl_coef=0.1)
    assert non_score[0].tolist() == pytest.approx([-0.01931472, 0.0])
    assert rewards[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="no valid token"):
        per_token_rewards(t(1.0, 2.0), torch.zeros(2, 2, dtype=torch.float64), m([T_, T_], [F_, F_]), 0.1)


def test_missing_eos_penalty_replaces_score():
    out = missing_eos_penalty(t(0.5, 3.0, -4.0), m(T_, F_, F_), penalty=-1.0)
    assert out.tolist() == [0.5, -1.0, -1.0]


def test_reward_normalisation_modes_by_hand():
    """Scores 1, 3, 5 (mean 3, std 2): shift_scale -> (3, 2); shift only, as InstructGPT and N+ -> (3, 1)."""
    from rlhf.ppo.core import reward_normalisation
    scores = torch.tensor([1.0, 3.0, 5.0])
    assert reward_normalisation(scores, "shift_scale") == (3.0, 2.0)
    assert reward_normalisation(scores, "shift") == (3.0, 1.0)
    assert reward_normalisation(scores, "none") == (0.0, 1.0)
    assert reward_normalisation(torch.full((3,), 2.0), "shift_scale") == (2.0, 1.0)  # all alike: no 0 division
    with pytest.raises(ValueError, match="shift_scale, shift, none"):
        reward_normalisation(scores, "std")


def test_reward_normalisation_of_an_all_zero_rule_reward_keeps_its_units():
    from rlhf.ppo.core import REWARD_STD_FLOOR, reward_normalisation
    shift, scale = reward_normalisation(torch.zeros(256), "shift_scale")  # a rule SFT never passes
    assert (shift, scale) == (0.0, 1.0)
    assert (1.0 - shift) / scale == 1.0  # the first success is worth 1, as the rule says, not 1e6
    nearly = torch.tensor([5.0, 5.0 + REWARD_STD_FLOOR / 10])  # a saturated RM: shift only
    assert reward_normalisation(nearly, "shift_scale")[1] == 1.0
    spread = torch.tensor([0.0, 1.0, 0.0, 1.0])  # a real spread is still divided by
    assert reward_normalisation(spread, "shift_scale") == pytest.approx((0.5, spread.std().item()))


def test_truncate_after_eos():
    eos, pad = 2, 0
    tokens = torch.tensor([[5, 2, 7, 8],    # EOS in the middle
                           [5, 6, 7, 2],    # EOS at the end
                           [5, 6, 7, 8],    # no EOS
                           [2, 2, 5, 2]])   # EOS first: only it is kept
    out, mask = truncate_after_eos(tokens, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[T_, T_, F_, F_], [T_] * 4, [T_] * 4, [T_, F_, F_, F_]]
    assert mask.dtype == torch.bool
    _, ended = first_eos_mask(tokens, eos)
    assert ended.tolist() == [T_, T_, F_, T_]
    with pytest.raises(ValueError, match="pad_id"):
        truncate_after_eos(tokens, eos, eos)


# -------------------------------------------------------------------------------------------------- GAE

def reference_gae(rewards, values, lengths, gamma, lam):
    """Per row, as the explicit sum A_t = sum_l (gamma lam)^l delta_{t+l} over the row's valid tokens."""
    advs = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        v = v[:n] + [0.0]  # the episode ends after the last valid token
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(n)]
        row = [sum((gamma * lam) ** j * deltas[i + j] for j in range(n - i)) for i in range(n)]
        advs.append(row + [0.0] * (rewards.shape[1] - n))
    return torch.tensor(advs, dtype=torch.float64)


def test_gae_matches_reference_loop():
    g = torch.Generator().manual_seed(3)
    lengths = [6, 1, 4, 3]
    mask = torch.arange(6).expand(4, 6) < torch.tensor(lengths)[:, None]
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    rewards[~mask], values[~mask] = 123.0, NAN  # padding must not leak
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = reference_gae(rewards, values, lengths, 0.9, 0.8)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.equal(ret, torch.where(mask, adv + values, 0.0))
    assert adv[~mask].eq(0).all() and ret[~mask].eq(0).all()


def test_gae_three_tokens_by_hand():
    # r = [0, 0, 1], v = [.5, .5, .5], gamma .9, lam .8 (gamma lam = .72); the padded value 7 is ignored
    # delta2 = 1 + 0 - .5 = .5;  delta1 = .9 * .5 - .5 = -.05;  delta0 = -.05
    # A2 = .5;  A1 = -.05 + .72 * .5 = .31;  A0 = -.05 + .72 * .31 = .1732
    rewards, values = t([0, 0, 1, 0]), t([0.5, 0.5, 0.5, 7.0])
    adv, ret = gae(rewards, values, m([T_, T_, T_, F_]), gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.1732, 0.31, 0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([0.6732, 0.81, 1.0, 0.0])


def test_gae_rejects_holes_in_mask():
    with pytest.raises(ValueError, match="prefix"):
        gae(t([1, 1, 1]), t([0, 0, 0]), m([T_, F_, T_]), 1.0, 1.0)


# ----------------------------------------------------------------------------------------------- losses

def test_policy_loss_clipped_side_has_zero_gradient():
    # log p - old = 1 so ratio = e; A > 0: -A*1.2 > -A*e, the clipped term is taken
    old = t([-1.0, -2.0, -3.0])
    logp = (old + 1).requires_grad_()
    adv = t([1.0, 2.0, 3.0])
    loss, stats = clipped_policy_loss(logp, old, adv, m([T_, T_, T_]), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2 * 2)  # -mean(A * 1.2)
    assert stats["clipfrac"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.5)  # 0.5 * 1^2
    assert stats["ratio_mean"].item() == pytest.approx(math.e)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 3, dtype=torch.float64))


def test_policy_loss_pessimistic_unclipped_side_has_gradient():
    # A < 0 with ratio e: -A*e > -A*1.2, the unclipped term is taken; d/dlogp mean(-A e^lr) = -A e / 3
    old = t([-1.0, -2.0, -3.0])
    logp = (old + 1).requires_grad_()
    loss, stats = clipped_policy_loss(logp, old, t([-1.0, -2.0, -3.0]), m([T_, T_, T_]), clip_range=0.2)
    assert loss.item() == pytest.approx(2 * math.e)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([math.e / 3, 2 * math.e / 3, math.e])


def test_policy_loss_ratio_exactly_one_on_first_minibatch():
    old = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logp = old.clone().requires_grad_()
    adv = t([1.0, -2.0, 0.5], [3.0, 1.0, -1.0])
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(2, 3, dtype=torch.bool), 0.2)
    assert stats["ratio_mean"].item() == 1.0 and stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-2.5 / 6)  # -mean(A)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 6)  # the plain policy gradient


def test_policy_loss_ignores_masked_tokens():
    old, adv, mask = t([-1.0, -1.0, -1.0]), t([1.0, 2.0, 1e6]), m([T_, T_, F_])
    base_loss, base_stats = clipped_policy_loss(t([-1.0, 0.0, -1.0]), old, adv, mask, 0.2)
    # token 0: ratio 1 -> -1;  token 1: ratio e, clipped -> -2.4;  mean -1.7, clipfrac .5
    assert base_loss.item() == pytest.approx(-1.7)
    assert base_stats["clipfrac"].item() == 0.5
    logp = t([-1.0, 0.0, NAN]).requires_grad_()
    loss, stats = clipped_policy_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-1.7) and stats["clipfrac"].item() == 0.5
    loss.backward()
    assert logp.grad[0, 2].item() == 0.0 and torch.isfinite(logp.grad).all()


def test_policy_loss_with_an_extreme_log_ratio_is_finite():
    logp = torch.zeros(2, requires_grad=True)  # float32: e^100 overflows
    old = torch.tensor([-100.0, 100.0])  # ratios e^100 and e^-100: inf and 0 without the clamp
    loss, stats = clipped_policy_loss(logp[None], old[None], torch.tensor([[-1.0, 1.0]]), m([T_, T_]), 0.2)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all() and math.isfinite(float(stats["ratio_mean"]))


def test_loss_aggregations_by_hand():
    from rlhf.ppo.core import aggregate_loss, loss_units
    x = t([1.0, 2.0, 3.0], [4.0, NAN, NAN])
    mask = m([T_, T_, T_], [T_, F_, F_])
    assert aggregate_loss(x, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(x, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(x, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(x, mask, "seq_mean_token_sum_norm", max_tokens=5).item() == pytest.approx(10 / (2 * 5))
    assert loss_units(mask, "token_mean") == 4 and loss_units(mask, "seq_mean_token_sum") == 2
    with pytest.raises(ValueError, match="loss aggregation must be one of"):
        aggregate_loss(x, mask, "mean")


def test_value_loss_by_hand():
    # token 0: old 1, v 1.1, R 2 -> inside the range, both errors .81
    # token 1: old 0, v 2, R 2 -> error 0, clipped v = .2, error 1.8^2 = 3.24 (taken)
    # token 2: padding
    old, returns, mask = t([1.0, 0.0, 5.0]), t([2.0, 2.0, NAN]), m([T_, T_, F_])
    values = t([1.1, 2.0, 100.0]).requires_grad_()
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.81 + 3.24) / 2)  # 1.0125
    assert stats["vf_clipfrac"].item() == 0.5
    loss.backward()
    # d/dv of .5 * mean: token 0 -> .5 * 2 * (1.1 - 2) / 2 = -.45; token 1 clipped -> 0; padding -> 0
    assert values.grad[0].tolist() == pytest.approx([-0.45, 0.0, 0.0])


def test_explained_variance():
    returns, mask = t([1.0, 2.0, 3.0, 99.0]), m([T_, T_, T_, F_])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(t([2.0, 2.0, 2.0, NAN]), returns, mask).item() == pytest.approx(0.0)
    # residuals [0, 0, 1]: var 2/9; var(returns) = 2/3; 1 - 1/3
    assert explained_variance(t([1.0, 2.0, 2.0, 0.0]), returns, mask).item() == pytest.approx(2 / 3)
    # constant returns: undefined -> nan, also when rounding leaves a few ulps of variance
    assert math.isnan(explained_variance(t([0.0, 1.0, 2.0]), t([2.0, 2.0, 2.0]), m([T_] * 3)).item())
    full = torch.ones(1, 7, dtype=torch.bool)
    assert math.isnan(explained_variance(torch.zeros(1, 7), torch.full((1, 7), 0.1), full).item())
    # a small but real spread is not rounding: returns .1 +- .001 against perfect values
    spread = torch.tensor([[0.099, 0.101] * 3 + [0.1]])
    assert explained_variance(spread, spread, full).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ controllers

def test_adaptive_kl_controller_by_hand():
    def after(kl):
        c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        c.update(kl, n_steps=64)
        return c.value

    assert after(9.0) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))   # error .5 clipped to .2 -> 0.100128
    assert after(7.5) == pytest.approx(0.100128)                         # error .25, clipped too
    assert after(6.6) == pytest.approx(0.1 * (1 + 0.1 * 64 / 10000))   # error .1 -> 0.100064
    assert after(3.0) == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))   # error -.5 clipped to -.2 -> 0.099872
    assert after(torch.tensor(6.0)) == 0.1                               # on target: unchanged


def test_adaptive_kl_reaches_the_target_within_the_run_with_the_default_horizon():
    """100 steps of 64 rollouts, a policy whose KL answers beta as 2 / beta (20 nats at the starting 0.1, the
    target of 6 at beta = 1/3): the run's horizon brings the KL into 6 +/- 20 %; 10,000 rollouts leaves beta
    near 0.114 and the KL near 17."""
    from rlhf.ppo.kl import default_kl_horizon

    def run(horizon):
        c = AdaptiveKLController(0.1, target=6.0, horizon=horizon)
        for _ in range(100):
            c.update(2.0 / c.value, n_steps=64)
        return 2.0 / c.value

    assert default_kl_horizon(100, 64) == 640
    assert 6.0 * 0.8 <= run(default_kl_horizon(100, 64)) <= 6.0 * 1.2
    assert run(10000) > 15.0


def test_kl_controller_state_round_trip_and_fixed():
    a = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in (9.0, 8.0, 1.0):
        a.update(kl, 256)
    b = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    a.update(7.0, 256), b.update(7.0, 256)
    assert b.value == a.value

    f = FixedKLController(0.05)
    for kl in (100.0, 0.0):
        f.update(kl, 1000)
    assert f.value == 0.05
    g = FixedKLController(1.0)
    g.load_state_dict(f.state_dict())
    assert g.value == 0.05


def test_truncate_after_any_stop_token():
    """Chat models end a turn with their own token (<|eot_id|>, <|im_end|>) and also stop at EOS: the
    first of any stop id ends the answer, and `ended` counts every one of them."""
    eos, eot, pad = 2, 9, 0
    tokens = torch.tensor([[5, 9, 7, 8],    # end of turn
                           [5, 2, 9, 8],    # EOS first
                           [5, 6, 7, 8]])   # neither
    out, mask = truncate_after_eos(tokens, [eot, eos], pad)
    assert out.tolist() == [[5, 9, 0, 0], [5, 2, 0, 0], [5, 6, 7, 8]]
    assert first_eos_mask(tokens, [eot, eos])[1].tolist() == [T_, T_, F_]
    assert first_eos_mask(tokens, eos)[1].tolist() == [F_, T_, F_]  # EOS alone misses the end of turn
    with pytest.raises(ValueError, match="pad_id"):
        truncate_after_eos(tokens, [eot, eos], eot)
