"""The critic-free advantage estimators (rlhf/ppo/estimators.py) on hand-computed tensors, where each puts the KL
(rollout.advantages), GRPO's KL loss term, and the config checks. The real-model parts (no value role, resume,
two processes) are in test_ppo_loop.py, test_preempt.py and test_distributed.py."""

import math

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.ppo import estimators as est
from rlhf.ppo.rollout import AdvantageSpec, Rollout, advantages, repeat_prompts
from conftest import ppo_settings
from rlhf.checks import check_ppo
from rlhf.config import PipelineConfig
from rlhf.ppo.train import update_spec

NAN = float("nan")


def test_grpo_group_normalised_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, std (n - 1) 1; group 2: all alike -> exactly 0
    assert torch.allclose(est.group_normalised(r, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5)
    assert torch.equal(est.group_normalised(r, 3, std_norm=False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    pair = torch.tensor([0.0, 4.0])  # mean 2, std sqrt(8) = 2.828
    assert torch.allclose(est.group_normalised(pair, 2), torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.equal(est.group_normalised(pair, 2, std_norm=False), torch.tensor([-2.0, 2.0]))


def test_rloo_leave_one_out_by_hand():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 2.0, 4.0])
    # 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5; second group -3, 0, 3
    assert torch.equal(est.leave_one_out(r, 3), torch.tensor([-3.0, -1.5, 4.5, -3.0, 0.0, 3.0]))
    # = k / (k - 1) x (r - group mean)
    assert torch.allclose(est.leave_one_out(r, 3), 1.5 * est.group_normalised(r, 3, std_norm=False))


@pytest.mark.parametrize("fn", [est.leave_one_out, est.group_normalised])
def test_groups_must_divide_and_hold_two_answers(fn):
    with pytest.raises(ValueError, match="groups of k = 3"):
        fn(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="groups of k = 1"):
        fn(torch.zeros(4), 1)


def test_rloo_sequence_kl_reward_and_tokens():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.tensor([[0.1, 0.2, NAN], [0.3, 0.3, 0.3]])  # padding may hold anything
    seq = est.sequence_kl_rewards(torch.tensor([1.0, 2.0]), kl, mask, 0.5)
    assert torch.allclose(seq, torch.tensor([1.0 - 0.5 * 0.3, 2.0 - 0.5 * 0.9]))
    assert torch.equal(est.to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]]))


def test_reward_to_go_and_reinforce_pp_by_hand():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, NAN]])
    assert torch.equal(est.reward_to_go(rewards, mask), torch.tensor([[6.0, 5.0, 3.0], [2.0, 1.0, 0.0]]))
    # gamma 0.5: 3; 2 + 0.5 * 3 = 3.5; 1 + 0.5 * 3.5 = 2.75
    assert torch.allclose(est.reward_to_go(rewards, mask, 0.5)[0], torch.tensor([2.75, 3.5, 3.0]))
    adv, returns = est.reinforce_pp(rewards, mask)
    # valid returns 6 5 3 2 1: mean 3.4, unbiased variance 17.2 / 4 = 4.3
    hand = (torch.tensor([[6.0, 5.0, 3.0], [2.0, 1.0, 3.4]]) - 3.4) / math.sqrt(4.3)
    assert torch.allclose(adv, hand, atol=1e-5) and adv[1, 2] == 0
    assert torch.equal(returns, est.reward_to_go(rewards, mask))


def test_grpo_kl_loss_is_the_k3_mean_and_its_gradient_pulls_toward_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    loss = est.kl_loss(logp, ref, mask, kind="k3")
    # r = ref / p = 0.5 and 1: (0.5 - 1) - log 0.5 and 0, mean over 2 valid tokens
    assert loss.item() == pytest.approx((-0.5 + math.log(2)) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp [r - 1 - log r] with r = exp(ref - logp): 1 - r, over 2 tokens; padding gets none
    assert torch.allclose(logp.grad, torch.tensor([[0.25, 0.0, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("kind", ["k3+", "k2", "k3"])
def test_kl_loss_expected_gradient_by_enumeration(kind):
    """Over a 4-token distribution, the gradient of E_{x ~ policy}[term(x)] (the sampling weights held fixed, as
    in a loss on sampled tokens) is that of KL(policy || ref) for k3+ and k2; for k3 that of KL(ref || policy)."""
    from rlhf.ppo.kl import kl_loss_terms
    theta = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([1.0, 0.5, -0.7, 0.2], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    expected = (logp.exp().detach() * kl_loss_terms(logp[None], ref[None], kind)[0]).sum()
    (grad,) = torch.autograd.grad(expected, theta)
    logp = torch.log_softmax(theta, 0)
    forward = (logp.exp() * (logp - ref)).sum() if kind != "k3" else (ref.exp() * (ref - logp)).sum()
    (exact,) = torch.autograd.grad(forward, theta)
    assert torch.allclose(grad, exact, atol=1e-12)
    if kind == "k3+":  # the value is k3's: unbiased for KL(policy || ref)
        with torch.no_grad():
            assert (logp.exp() * kl_loss_terms(logp[None], ref[None], "k3+")[0]).sum().item() == pytest.approx(
                (logp.exp() * (logp - ref)).sum().item(), rel=1e-9)


def test_kl_loss_of_an_extreme_log_ratio_is_finite():
    logp = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0]])
    mask = torch.tensor([[True, True]])
    for kind in ("k3+", "k2", "k3"):
        loss = est.kl_loss(logp, ref, mask, kind=kind)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
        logp.grad = None


def toy_rollout(values=None):
    """4 answers (2 prompts x k = 2), 3 response tokens each; the policy is ahead of the reference by 0.1 a token."""
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])
    logprobs = torch.full((4, 3), -1.0)
    return Rollout(ids=torch.zeros(4, 4, dtype=torch.long), mask=torch.cat([torch.ones(4, 1, dtype=torch.bool), mask], 1),
                   prompt_width=1, logprobs=logprobs, ref_logprobs=logprobs - 0.1, values=values,
                   scores=torch.tensor([1.0, 3.0, 2.0, 2.0]), ended=torch.ones(4, dtype=torch.bool))


def run_estimator(r, estimator, **kw):
    return advantages(r, 0.5, AdvantageSpec(estimator=estimator, group_size=2, **kw))


def test_where_each_estimator_puts_the_kl():
    r = toy_rollout()
    mask = r.response_mask
    grpo = run_estimator(r, "grpo")
    assert torch.equal(grpo.non_score, torch.zeros(4, 3))  # GRPO: the KL is a loss term, not a reward
    assert torch.allclose(grpo.kl[mask], torch.full((9,), 0.1))  # still measured (logs, adaptive beta)
    g = 1 / math.sqrt(2)  # groups (1, 3) and (2, 2): -1/sqrt2, +1/sqrt2, 0, 0
    assert torch.allclose(grpo.advantages, est.to_tokens(torch.tensor([-g, g, 0.0, 0.0]), mask), atol=1e-5)
    assert torch.equal(run_estimator(r, "grpo", std_norm=False).advantages,
                       est.to_tokens(torch.tensor([-1.0, 1.0, 0.0, 0.0]), mask))

    rloo = run_estimator(r, "rloo")
    seq = torch.tensor([1.0, 3.0, 2.0, 2.0]) - 0.5 * 0.1 * torch.tensor([3.0, 2.0, 1.0, 3.0])  # summed KL
    assert torch.allclose(rloo.returns, est.to_tokens(seq, mask))
    assert torch.allclose(rloo.advantages, est.to_tokens(torch.tensor([-2.05, 2.05, 0.1, -0.1]), mask), atol=1e-6)

    # grpo_kl="reward": the summed KL leaves each score first (0.85, 2.9 | 1.95, 1.85), then the group
    # normalisation; without the std division that is RLOO's advantage x (k - 1) / k
    dr = run_estimator(r, "grpo", std_norm=False, grpo_kl="reward")
    assert torch.allclose(dr.returns, est.to_tokens(seq, mask))
    assert torch.allclose(dr.advantages, est.to_tokens(torch.tensor([-1.025, 1.025, 0.05, -0.05]), mask), atol=1e-6)
    assert torch.allclose(dr.non_score[mask], torch.full((9,), -0.05))
    # with the std division only the scores are divided: group (1, 3) -/+ g, plus -beta x the centred KL
    # (-/+ 0.025); the tied group (2, 2) keeps beta's weight: -0.5 x 0.1 x (1 - 2, 3 - 2) = +/- 0.05
    std = run_estimator(r, "grpo", grpo_kl="reward")
    hand = torch.tensor([-g - 0.025, g + 0.025, 0.05, -0.05])
    assert torch.allclose(std.advantages, est.to_tokens(hand, mask), atol=1e-5)

    rpp = run_estimator(r, "reinforce_pp")
    assert torch.allclose(rpp.non_score[mask], torch.full((9,), -0.05))  # per-token KL in the reward
    assert torch.allclose(rpp.returns[0], torch.tensor([1.0 - 0.15, 1.0 - 0.10, 1.0 - 0.05]))
    assert rpp.advantages[mask].mean().abs() < 1e-6 and rpp.advantages[mask].std().item() == pytest.approx(1.0)

    gae = advantages(r.__class__(**{**r.__dict__, "values": torch.zeros(4, 3)}), 0.5,
                     AdvantageSpec(whiten_advantages=False, lam=1.0))
    assert torch.allclose(gae.advantages, rpp.returns)  # V = 0, lambda = 1: GAE is the reward to go
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        run_estimator(r, "ppo")


def test_grpo_kl_in_reward_keeps_beta_weight_in_a_tied_group():
    """Binary rewards: a group whose answers all score 1 still differs in KL; its advantage is beta x the
    centred KL, so it shrinks with beta instead of being a full-unit update on the KL alone."""
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    seq_kl = torch.tensor([0.5, 1.5, 2.0, 4.0])
    for beta in (0.1, 0.01):
        adv = est.group_normalised_with_kl(scores, seq_kl, 4, beta)
        assert torch.allclose(adv, -beta * (seq_kl - seq_kl.mean()), atol=1e-6)
    assert torch.equal(est.group_normalised_with_kl(scores, seq_kl, 4, 0.0), torch.zeros(4))
    r = toy_rollout()
    r = Rollout(**{**r.__dict__, "scores": torch.ones(4)})  # every group tied
    for beta in (0.5, 0.05):
        a = advantages(r, beta, AdvantageSpec(estimator="grpo", group_size=2, grpo_kl="reward"))
        assert a.advantages.abs().max().item() == pytest.approx(beta * 0.1, rel=1e-4)  # KL gaps of 1 token x 0.1


def test_demo_grpo_config_header_names_the_normalisation_it_runs():
    """The header of configs/demo-grpo.yaml says whether the group std divides the scores, as the config runs
    it (Dr. GRPO is the variant without it)."""
    from pathlib import Path
    import yaml
    text = (Path(__file__).resolve().parent.parent / "configs" / "demo-grpo.yaml").read_text()
    header = text.split("\n")[0] + text.split("\n")[1]
    std_norm = yaml.safe_load(text)["ppo"].get("grpo_std_norm", True)
    assert ("divided by their group's std" in header) == std_norm
    assert ("(its Dr. GRPO variant)" in header) == (not std_norm)


def test_repeat_prompts_lays_groups_out_contiguously():
    assert repeat_prompts([[1], [2, 3]], 2) == [[1], [1], [2, 3], [2, 3]]
    assert repeat_prompts([[1]], 1) == [[1]]


@pytest.mark.parametrize("overrides, message", [
    (["estimator.name=ppo"], "ppo.estimator.name must be one of gae, grpo, rloo, reinforce_pp, not 'ppo'"),
    (["estimator.name=grpo", "sampling.group_size=1"],
     "ppo.sampling.group_size=1: ppo.estimator.name=grpo needs at least 2 answers"),
    (["estimator.name=rloo", "sampling.group_size=3"],
     "ppo.sampling.rollout_batch_size=128 must be a multiple of ppo.sampling.group_size=3"),
    (["estimator.name=rloo", "sampling.group_size=4", "reward.whiten=true"], "set ppo.reward.whiten=false"),
    (["estimator.name=grpo", "sampling.group_size=4", "estimator.grpo_kl=both"],
     "ppo.estimator.grpo_kl must be loss (a k3 loss term"),
    (["estimator.name=grpo", "sampling.group_size=4", "estimator.grpo_kl_estimator=k1"],
     "ppo.estimator.grpo_kl_estimator must be one of k3"),
    (["update.loss_agg=seq_mean"], "ppo.update.loss_agg must be one of token_mean, seq_mean_token_mean"),
    (["kl.adaptive=true", "kl.horizon=0"], "ppo.kl.adaptive needs ppo.kl.target > 0 and ppo.kl.horizon > 0"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_ppo(PipelineConfig(ppo=ppo_settings(*overrides)))
    check_ppo(PipelineConfig(ppo=ppo_settings("estimator.name=reinforce_pp", "sampling.group_size=2")))


def test_adaptive_kl_horizon_defaults_to_a_tenth_of_the_run():
    from rlhf.ppo.train import kl_controller
    assert kl_controller(ppo_settings("kl.adaptive=true", "steps=100", "sampling.rollout_batch_size=64")).horizon == 640
    assert kl_controller(ppo_settings("kl.adaptive=true", "kl.horizon=10000")).horizon == 10000


def test_kl_loss_coefficient_joins_the_update_for_grpo_only():
    grpo = ("estimator.name=grpo", "sampling.group_size=4")
    assert update_spec(ppo_settings(*grpo), 0.04).kl_loss_coef == 0.04
    assert update_spec(ppo_settings(*grpo), 0.04).kl_loss_estimator == "k3+"
    assert update_spec(ppo_settings(*grpo, "estimator.grpo_kl=reward"), 0.04).kl_loss_coef == 0.0
    for name in ("gae", "rloo", "reinforce_pp"):
        assert update_spec(ppo_settings(f"estimator.name={name}", "sampling.group_size=4"), 0.04).kl_loss_coef == 0.0
