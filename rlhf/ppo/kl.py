"""The KL penalty against the reference (SFT) model: per-token estimators and the coefficient controllers.

Shapes are `(B, T)` over response tokens; the estimators do not mask (padding may hold anything), the
callers do: `per_token_rewards` zeroes padded tokens, statistics use `masked_mean`.
"""

from __future__ import annotations

import torch

from rlhf.ppo.core import LOG_RATIO_CLAMP
from rlhf.checks import KL_KINDS, KL_LOSS_KINDS  # noqa: F401 (re-exported: the choices live with the checks)

Tensor = torch.Tensor

"""Estimators for a KL loss term (`kl_loss_terms`)."""


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """(B, T) log-probs of the sampled tokens under the policy and the reference -> (B, T) KL estimate.

    Tokens are sampled from the policy, so these are single-sample estimators of KL(policy || ref)
    (Schulman, "Approximating KL divergence", 2020):
      k1   log p - log ref: unbiased, but negative on some tokens;
      k3   (r - 1) - log r with r = ref / p: unbiased and >= 0 on every token, lower variance;
      abs  |log p - log ref| and mse 0.5 * (log p - log ref)^2: biased, >= 0, as peers offer them.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        # (r - 1) - log r with log r = -log_ratio; expm1 keeps precision when r is close to 1
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_KINDS)}")


def kl_loss_terms(logprobs: Tensor, ref_logprobs: Tensor, kind: str, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """(B, T) log-probs of the sampled tokens under the policy (differentiable) and the reference -> (B, T) terms
    of a KL LOSS: what matters is the gradient, whose expectation over tokens sampled from the policy should be
    that of KL(policy || ref):
      k2   0.5 * (log p - log ref)^2: its expected gradient is exactly that of KL(policy || ref);
      k3+  k3's value (unbiased, >= 0) with k2's gradient (verl's "k3+"): logged as k3, optimised as k2;
      k3   (r - 1) - log r as a loss: its expected gradient is that of KL(ref || policy), the reverse
           direction (GRPO's paper uses it so); kept to compare with.
    The log-ratio is clamped to +/- clamp first (verl: 20): exp(100) would make the loss inf; beyond it the
    gradient is 0.
    """
    if kind not in KL_LOSS_KINDS:
        raise ValueError(f"unknown KL loss estimator {kind!r}; choose one of {', '.join(KL_LOSS_KINDS)}")
    log_ratio = (logprobs - ref_logprobs).clamp(-clamp, clamp)
    k2 = 0.5 * log_ratio.square()
    if kind == "k2":
        return k2
    k3 = kl_penalty(log_ratio, torch.zeros_like(log_ratio), "k3")
    return k3 if kind == "k3" else k2 - k2.detach() + k3.detach()


class FixedKLController:
    """A constant KL coefficient beta (InstructGPT used 0.02, N+ 0.05). `update` does nothing."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def default_kl_horizon(steps: int, rollout_batch_size: int, fraction: float = 0.1) -> int:
    """The adaptive controller's horizon scaled to the run: `fraction` of all its rollouts. With the error clipped
    at 0.2, beta can then change by up to e^(0.2 / fraction) (e^2 ~ 7x) over the run; a fixed 10,000 lets a
    run of 100 x 64 rollouts move it by 14 % at most."""
    return max(1, round(fraction * steps * rollout_batch_size))


class AdaptiveKLController:
    """A KL coefficient steered toward a target KL (Ziegler et al. 2019, section 2.2).

    After each batch: error = clip(current_kl / target - 1, -0.2, 0.2), value *= 1 + error * n_steps / horizon.
    The clip bounds how fast beta moves on one noisy KL estimate; `horizon` (in samples) sets the time scale.
    Only `value` is state: target and horizon come from the run's config, which is saved beside it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the batch's mean KL per response (a float or 0-dim tensor); n_steps: samples in it."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
