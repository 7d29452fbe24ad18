"""Critic-free advantage estimators as pure functions: GRPO, RLOO, REINFORCE++ (GAE is `core.gae`).

Conventions are `core`'s: `(B, T)` tensors over response tokens, `mask` bool with True = a real token,
outputs exactly 0 on padding. The group estimators take `(B,)` per-answer rewards where the B rows come in
groups of `k` answers to one prompt, CONTIGUOUS: rows `g*k .. g*k + k - 1` share prompt g (the rollout
repeats each prompt k times in a row, `rollout.repeat_prompts`).

Where the KL to the reference goes differs by method, as each paper does it (the callers place it):

* GAE (PPO) and REINFORCE++: a per-token penalty -beta * KL_t in the reward (`core.per_token_rewards`);
* RLOO: the sequence's summed KL in its reward, r = score - beta * sum_t KL_t (Ahmadian et al. 2024);
* GRPO: no KL in the reward; a KL term beta * KL in the loss (Shao et al. 2024, DeepSeekMath, eq. 3-4; by default
  with k3's value and the gradient of KL(policy || ref), `kl_loss`).

Sources: Shao et al. 2024 (GRPO); Liu et al. 2025, "Understanding R1-Zero-like training" (Dr. GRPO: the same
without the division by the group's std); Kool et al. 2019 and Ahmadian et al. 2024, "Back to basics" (RLOO);
Hu 2025, "REINFORCE++" (token-level KL in the reward, returns normalised over the whole batch).
"""

from __future__ import annotations

import torch

from rlhf.ppo import core
from rlhf.ppo.kl import kl_loss_terms
from rlhf.checks import ESTIMATORS, GROUP_ESTIMATORS  # noqa: F401 (re-exported: the choices live with the checks)

Tensor = torch.Tensor


def _groups(rewards: Tensor, k: int) -> Tensor:
    """(B,) -> (B / k, k); ValueError when B is not a multiple of k or k < 2 (no group to compare with)."""
    if rewards.dim() != 1:
        raise ValueError(f"group rewards must be (B,), got {tuple(rewards.shape)}")
    if k < 2 or rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards do not form groups of k = {k} answers (k >= 2, B multiple of k)")
    return rewards.view(-1, k)


def group_normalised(rewards: Tensor, k: int, std_norm: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's outcome advantage: (B,) rewards in contiguous groups of k -> (B,) (r - mean_g) / (std_g + eps).

    mean_g and std_g are over the k answers to the same prompt; std is Bessel-corrected (n - 1), as
    torch.std. std_norm=False keeps r - mean_g (Dr. GRPO): the std division up-weights prompts whose answers
    all score nearly alike (too easy or too hard), and makes a tiny reward difference a full unit of advantage.
    A group whose answers score exactly alike gets advantage 0 either way.
    """
    g = _groups(rewards, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if std_norm:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_normalised_with_kl(scores: Tensor, seq_kl: Tensor, k: int, kl_coef: float, std_norm: bool = True,
                             eps: float = 1e-6) -> Tensor:
    """GRPO's advantage with the KL in the reward (grpo_kl: reward): (B,) scores and summed KLs in contiguous
    groups of k -> (B,) group_normalised(scores) - kl_coef * (KL_i - mean_g KL).

    Only the scores are divided by their group's std: dividing score - beta * KL by its own std would turn a
    group whose scores tie (binary rewards: all 0 or all 1) into a full-unit "reduce the KL" update whatever
    beta is. Here beta keeps its weight in every group; without the std division this is the group-centred
    score - beta * KL, as before."""
    return group_normalised(scores, k, std_norm, eps) - kl_coef * group_normalised(seq_kl, k, std_norm=False)


def leave_one_out(rewards: Tensor, k: int) -> Tensor:
    """RLOO's advantage: (B,) rewards in contiguous groups of k -> (B,) r_i - mean of the OTHER k - 1 answers.

    The baseline of answer i does not depend on answer i, so the estimator stays unbiased (Kool et al. 2019);
    it equals k / (k - 1) x (r_i - mean_g).
    """
    g = _groups(rewards, k)
    others = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - others).reshape(-1)


def sequence_kl_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """RLOO's reward: (B,) scores, (B, T) per-token KL, bool mask -> (B,) score - kl_coef * sum of valid KL."""
    if scores.shape != mask.shape[:1] or kl.shape != mask.shape:
        raise ValueError(f"shapes: scores {tuple(scores.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}")
    return scores - kl_coef * core.masked_sum(kl, mask, dim=1)


def to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) one advantage per answer -> (B, T): the same value on every valid token, 0 on padding (outcome
    supervision: every token of an answer shares its answer's advantage)."""
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not match mask {tuple(mask.shape)}")
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    return torch.where(mask, advantages[:, None].expand(mask.shape), zero)


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """(B, T) per-token rewards -> (B, T) returns G_t = sum_{s >= t} gamma^(s - t) r_s over valid tokens, 0 on
    padding (REINFORCE's return; with the per-token KL in the rewards, REINFORCE++'s "KL to go").

    This is GAE with every value 0 and lambda = 1 (the TD errors are then the rewards), so it is computed by
    `core.gae` rather than by a second backward loop. Valid tokens must be a prefix of each row."""
    returns, _ = core.gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


def reinforce_pp(rewards: Tensor, mask: Tensor, gamma: float = 1.0, reduce=None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): (B, T) per-token rewards (score at the last token, -beta * KL_t on every token)
    -> (advantages, returns), both (B, T), 0 on padding.

    returns = reward_to_go; advantages = returns whitened over every valid token of the batch (mean 0, std 1;
    `reduce`: over every process's, `core.masked_whiten`): the batch mean is the baseline that PPO's critic
    would otherwise give, over all prompts at once."""
    returns = reward_to_go(rewards, mask, gamma)
    return core.masked_whiten(returns, mask, reduce=reduce), returns


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: str = "k3+", loss_agg: str = "token_mean",
            max_tokens: int | None = None) -> Tensor:
    """GRPO's KL term: (B, T) policy and reference log-probs of the sampled tokens -> scalar, the `kl.kl_loss_terms`
    of `kind` aggregated as the policy loss is (`core.aggregate_loss`). Differentiable in `logprobs`: it is added
    to the policy loss (times beta) instead of entering the reward. GRPO's paper (Shao et al. 2024, eq. 4) uses
    k3, whose expected gradient is that of KL(ref || policy); the default k3+ has k3's value and the gradient
    of KL(policy || ref)."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - ref_logprobs, zero)  # padded log-probs may be anything
    terms = kl_loss_terms(log_ratio, torch.zeros_like(log_ratio), kind)
    return core.aggregate_loss(terms, mask, loss_agg, max_tokens)
