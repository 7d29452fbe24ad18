"""PPO math as pure functions on response tokens: masked statistics, rewards, GAE, losses.

Conventions, everywhere in this file:

* tensors are `(B, T)` over the RESPONSE tokens only (the prompt is never part of them);
* `mask` is a `torch.bool` tensor of the same shape, True = a real (valid) token;
* masked positions never reach a mean, and outputs documented as "0 on padding" are exactly 0 there.
  Padded inputs may hold anything (even nan/inf): they are replaced with `torch.where`, never multiplied
  by the mask, because `nan * 0` is still nan.

Sources: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019, Ouyang et al. 2022
(InstructGPT) and Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (N+ below).
"""

from __future__ import annotations

import math

import torch

# the sequence helpers the RL math builds on; their home is rlhf/sequences.py (re-exported: core.masked_sum ...)
from rlhf.sequences import (entropy_from_logits, first_eos_mask, logprobs_from_logits, masked_mean,  # noqa: F401
                            masked_sum, truncate_after_eos)
from rlhf.checks import LOSS_AGGS, REWARD_NORMS

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- masked stats

def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all valid tokens (scalar). `unbiased` applies Bessel's n/(n-1).

    Raises ValueError when there are too few valid tokens (0, or 1 when unbiased) rather than returning nan.
    """
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid token(s), got {n}")
    centred = x - masked_mean(x, mask)
    var = masked_sum(centred * centred, mask) / n
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce=None) -> Tensor:
    """(B, T) -> (B, T): (x - mean) / sqrt(var + 1e-8) over valid tokens; 0 on padding.

    shift_mean=False adds the mean back (scale only): N+ does this when whitening rewards, so that a
    reward's sign is kept.
    reduce: a function summing a tensor over processes (`distributed.sum_over_processes`): the mean and the
    (Bessel-corrected) variance are then those of every process's valid tokens, as if one process held them
    all; None: this batch's alone.
    """
    mean, var = (masked_mean(x, mask), masked_var(x, mask)) if reduce is None else _reduced_moments(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _reduced_moments(x: Tensor, mask: Tensor, reduce) -> tuple[Tensor, Tensor]:
    """masked_mean and masked_var over the valid tokens of every process (two passes: the mean first, then the
    squared deviations from it, which keeps the variance as exact as masked_var's)."""
    n_sum = reduce(torch.stack([mask.sum().to(x.dtype), masked_sum(x, mask)]))
    n = int(n_sum[0].item())
    if n < 2:
        raise ValueError(f"masked_var needs at least 2 valid token(s), got {n}")
    mean = n_sum[1] / n
    return mean, reduce(masked_sum((x - mean).square(), mask)) / (n - 1)


# ------------------------------------------------------------------------------------------------ rewards

def missing_eos_penalty(scores: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """(B,) scores, (B,) bool ended -> (B,) scores where rows that never emitted EOS get exactly `penalty`.

    "Replace" semantics, as N+ does (e.g. -1): a truncated answer was never read whole by the RM, so its
    score is not trusted at all rather than shifted. `ended` must be keyed on the stop token actually
    used for sampling.
    """
    return torch.where(ended, scores, torch.as_tensor(penalty, dtype=scores.dtype, device=scores.device))


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """(B,) scores, (B, T) per-token KL and bool mask -> (rewards (B, T), non_score (B, T)).

    non_score = -kl_coef * kl on valid tokens, 0 on padding (InstructGPT's per-token KL penalty).
    rewards = non_score plus each row's score at its LAST valid token: the RM reads the whole answer once,
    so its score is a reward for finishing there; GAE carries it back to earlier tokens.

    Every row needs at least one valid token (ValueError otherwise): after `truncate_after_eos` a row holds
    at least its first sampled token, so an empty row is a bug upstream, and its score would be lost.
    """
    if scores.shape != mask.shape[:1] or kl.shape != mask.shape:
        raise ValueError(f"shapes: scores {tuple(scores.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("per_token_rewards: a row has no valid token, its score would be dropped")
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    non_score = torch.where(mask, -kl_coef * kl, zero)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards = non_score.clone()
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, non_score


REWARD_STD_FLOOR = 1e-2
"""shift_scale divides by the SFT answers' score std only when it is at least this (in the reward's units)."""


def reward_normalisation(scores: Tensor, mode: str, std_floor: float = REWARD_STD_FLOOR) -> tuple[float, float]:
    """(N,) RM scores of the SFT policy's own answers -> (shift, scale); PPO's rewards are (score - shift) / scale.

    shift_scale  (mean, std): SFT's answers score mean 0 and std 1, whatever the RM's units;
    shift        (mean, 1): a bias only, so SFT's answers score mean 0 and the RM's spread is kept, as InstructGPT
                 and N+ do (N+ adds the bias to the RM's head; neither divides by a std);
    none         (0, 1): raw RM scores.
    shift_scale falls back to shift (scale 1, the reward's own units) when the std is below `std_floor`: a
    reward that is (nearly) constant on SFT's answers, e.g. a rule SFT never passes, would otherwise make the
    first success worth 1/std and the KL penalty negligible beside it.
    """
    if mode not in REWARD_NORMS:
        raise ValueError(f"reward normalisation must be one of {', '.join(REWARD_NORMS)}, not {mode!r}")
    if mode == "none":
        return 0.0, 1.0
    mean, std = scores.float().mean().item(), scores.float().std().item()
    return (mean, std) if mode == "shift_scale" and std >= std_floor else (mean, 1.0)


# -------------------------------------------------------------------------------------------------- GAE

def _check_prefix(mask: Tensor) -> None:
    # a False followed by a True would be a hole: GAE would stop the episode there and restart it
    if bool((~mask[:, :-1] & mask[:, 1:]).any()):
        raise ValueError("valid tokens must be a prefix of each row (right padding after EOS truncation)")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on (B, T) rewards, values and bool mask.

    -> (advantages (B, T), returns (B, T)), both 0 on padding; returns = advantages + values.
    Valid tokens must be a prefix of each row (responses are right-padded after EOS truncation; ValueError
    otherwise). The episode ends after the last valid token, so the value after it is 0: no bootstrapping.
    Pass detached tensors: advantages are targets, not something to differentiate.
    """
    _check_prefix(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # padding is zeroed first: a padded value then acts as the terminal 0, and padded deltas are 0
    rewards, values = torch.where(mask, rewards, zero), torch.where(mask, values, zero)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = values[:, t]
    advantages = torch.where(mask, advantages, zero)
    return advantages, torch.where(mask, advantages + values, zero)


# ----------------------------------------------------------------------------------------------- losses

LOG_RATIO_CLAMP = 20.0
"""|log-ratio| bound before any exp (verl's): a ratio of e^100 would overflow to inf and stop the run."""



def loss_units(mask: Tensor, mode: str) -> int:
    """(B, T) bool mask -> what `aggregate_loss` divides by before any constant: the valid tokens (token_mean)
    or the rows (the seq_mean modes). An optimiser step's loss is the sum over its micro-batches (and processes)
    of each one's aggregate times its units / the step's units, so neither grad_accum nor the number of
    processes changes the weight of a token."""
    if mode not in LOSS_AGGS:
        raise ValueError(f"loss aggregation must be one of {', '.join(LOSS_AGGS)}, not {mode!r}")
    return int(mask.sum()) if mode == "token_mean" else mask.shape[0]


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str = "token_mean", max_tokens: int | None = None) -> Tensor:
    """(B, T) per-token losses and bool mask -> scalar, over these rows:

    token_mean               sum over valid tokens / their number: every token weighs the same;
    seq_mean_token_mean      each row's token mean, averaged over rows: every answer weighs the same;
    seq_mean_token_sum       each row's token sum, averaged over rows;
    seq_mean_token_sum_norm  sum over valid tokens / (rows x max_tokens): Dr. GRPO's constant normaliser (Liu et
                             al. 2025); max_tokens is the sampling budget (default T).
    Padded entries may hold anything.
    """
    loss_units(mask, mode)  # ValueError on an unknown mode
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    per_token, rows = torch.where(mask, per_token, zero), mask.shape[0]
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "seq_mean_token_mean":
        return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / rows
    if mode == "seq_mean_token_sum":
        return per_token.sum() / rows
    return per_token.sum() / (rows * (max_tokens or mask.shape[1]))


def truncated_is_weights(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """(B, T) truncated importance weights min(pi_old / pi_engine, cap) per token (1 on padding), detached: the
    correction for rollouts sampled by an engine whose probabilities differ from the trainer's (vLLM's kernels,
    bf16). The ratio is the trainer's old policy over the engine's, both of the same sampled tokens."""
    log_w = torch.where(mask, old_logprobs.float() - engine_logprobs.float(), torch.zeros((), device=mask.device))
    return torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, math.log(cap))).detach().to(old_logprobs.dtype)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_range: float, loss_agg: str = "token_mean",
                        max_tokens: int | None = None, weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017) on (B, T) tensors -> (scalar loss, stats).

    loss = `aggregate_loss` (loss_agg, max_tokens) of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    each token's term times `weights` if given (`truncated_is_weights`: rollouts from another engine),
    ratio = exp(logp - old), the log-ratio clamped to +/- LOG_RATIO_CLAMP: the pessimistic of the two, so where
    the ratio has left the clip range in the direction the advantage pushes, the gradient is exactly 0.

    stats (detached scalars):
      clipfrac   share of valid tokens where the clipped term was strictly greater (the one taken);
      approx_kl  masked mean of 0.5 * (logp - old)^2, the estimator N+ and peers log, so curves compare;
                 it equals the KL between old and new to second order, is >= 0, and needs no exp (k3 would);
      ratio_mean masked mean of the ratio (exactly 1 before the first update of a rollout batch).
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # where before exp: padded log-probs may be anything, and exp(inf) would turn the gradient into nan
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    advantages = torch.where(mask, advantages, zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate_loss(per_token, mask, loss_agg, max_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss on (B, T) tensors -> (scalar loss, {"vf_clipfrac"}).

    loss = 0.5 * masked mean of max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2): the value may not
    move more than eps from the rollout's value and gain from it (the PPO2 baselines loss N+ keeps).
    vf_clipfrac = share of valid tokens where the clipped error was strictly greater (the one taken).
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values, old_values, returns = (torch.where(mask, x, zero) for x in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err = (values - returns).square()
    err_clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - var(returns - values) / var(returns) over valid tokens -> 0-dim float tensor.

    1: the critic predicts returns perfectly; 0: no better than their mean; < 0: worse. When var(returns)
    is 0 (up to rounding) the ratio is undefined and nan is returned, as CleanRL does: 0 or 1 would read
    as a real verdict. The biased variance is used: the n/(n-1) factors cancel, and one valid token is enough.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_resid = masked_var(returns - values, mask, unbiased=False)
    # constant returns leave a variance of rounding size (the mean is rounded): a spread within 8 ulps of
    # the mean counts as 0
    rounding = (8 * torch.finfo(var_returns.dtype).eps * masked_mean(returns, mask)).square()
    nan = torch.full((), float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return torch.where(var_returns > rounding, 1 - var_resid / var_returns, nan)
