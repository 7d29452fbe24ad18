"""PPO math for the RLHF stage: pure functions on (B, T) response tensors with bool masks (True = real token)."""

from rlhf.ppo.core import (clipped_policy_loss, clipped_value_loss, entropy_from_logits, explained_variance,
                           first_eos_mask, gae, logprobs_from_logits, masked_mean, masked_sum, masked_var,
                           masked_whiten, missing_eos_penalty, per_token_rewards, truncate_after_eos)
from rlhf.ppo.kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty

__all__ = [
    "AdaptiveKLController", "FixedKLController", "KL_KINDS", "clipped_policy_loss", "clipped_value_loss",
    "entropy_from_logits", "explained_variance", "first_eos_mask", "gae", "kl_penalty", "logprobs_from_logits",
    "masked_mean", "masked_sum", "masked_var", "masked_whiten", "missing_eos_penalty", "per_token_rewards",
    "truncate_after_eos",
]
