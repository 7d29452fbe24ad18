"""Phases 1-3 of a PPO step: sample responses, score them, turn scores into advantages (GAE with the value
adapter, or a critic-free estimator: rlhf/ppo/estimators.py).

Shapes: B rollouts, P prompt tokens (left-padded), R response tokens (right-padded after EOS). A row of
`ids` is [pad.. prompt | response ..pad]; the logits at position P - 1 + t predict response token t, and
the value at that position is V(state before token t).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlhf import distributed
from rlhf.generation import SamplingSpec, generate_ids
from rlhf.models import active_adapter
from rlhf.ppo import core, estimators
from rlhf.ppo.kl import kl_penalty
from rlhf.ppo.roles import POLICY, Roles, policy_logits, reference_logits, values
from rlhf.sequences import batches, first_eos_mask, response_logprobs, response_width


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled responses and what the model thought of them while sampling."""

    ids: torch.Tensor            # (B, P + R) prompt + response token ids
    mask: torch.Tensor           # (B, P + R) bool, True = real token
    prompt_width: int            # P
    logprobs: torch.Tensor       # (B, R) policy log-probs of the sampled tokens ("old" log-probs)
    ref_logprobs: torch.Tensor   # (B, R) reference (SFT) log-probs
    values: torch.Tensor | None  # (B, R) value estimates; None without a critic (estimator other than gae)
    scores: torch.Tensor         # (B,) reward-model scores, raw
    ended: torch.Tensor          # (B,) bool: the response emitted EOS
    engine_logprobs: torch.Tensor | None = None  # (B, R) the sampling engine's log-probs (vllm; None: hf)

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask[:, self.prompt_width:]

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[idx], self.mask[idx]


@dataclass(frozen=True)
class Advantages:
    kl: torch.Tensor          # (B, R) per-token KL estimate, policy vs reference
    non_score: torch.Tensor   # (B, R) -kl_coef * kl on valid tokens
    rewards: torch.Tensor     # (B, R) non_score, plus the (normalised) score at the last valid token
    advantages: torch.Tensor  # (B, R) whitened if asked (GAE)
    returns: torch.Tensor     # (B, R) the estimator's target: GAE advantages + values (before whitening), the
                              # reward to go (REINFORCE++), the answer's reward on each token (GRPO, RLOO)
    scores: torch.Tensor      # (B,) the scores that entered the rewards (penalised, normalised)


def repeat_prompts(prompts: list, k: int) -> list:
    """Each prompt k times in a row: [a, b] -> [a, a, b, b] for k = 2 (the group layout of `estimators`)."""
    return [x for x in prompts for _ in range(k)]


class PromptSampler:
    """Endless shuffled passes over the prompt pool; its position is part of a checkpoint."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order()
            take = order[self.pos:self.pos + k - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


@torch.no_grad()
def sample(roles: Roles, tokenizer, prompts: list[list[int]], spec: SamplingSpec, batch_size: int):
    """Phase 1: responses from the policy. Returns generate_ids' (ids, mask, P)."""
    with active_adapter(roles.model, POLICY):
        return generate_ids(roles.model, tokenizer, prompts, spec, batch_size)


@torch.no_grad()
def score(roles: Roles, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, temperature: float,
          batch_size: int, stop_ids: int | list[int], engine_logprobs: torch.Tensor | None = None) -> Rollout:
    """Phase 2: policy and reference log-probs, values and reward-model scores, in no-grad batches.
    `stop_ids`: the tokens sampling stopped at (`generation.model_stop_ids`): a row holding one has ended.
    `engine_logprobs`: the sampling engine's own log-probs of the tokens (vllm), kept beside the trainer's."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref": [], "values": [], "scores": []}
    for rows in batches(ids.shape[0], batch_size):
        i, m = ids[rows], mask[rows]
        keep = response_width(i, prompt_width)  # logits of the response positions only
        parts["logprobs"].append(response_logprobs(policy_logits(roles, i, m, keep), i, prompt_width, temperature))
        parts["ref"].append(response_logprobs(reference_logits(roles, i, m, keep), i, prompt_width, temperature))
        if roles.value_head is not None:  # critic-free estimators hold no value adapter
            parts["values"].append(values(roles, i, m)[:, prompt_width - 1:-1])
        parts["scores"].append(roles.scorer.score_ids(i, m, prompt_width=prompt_width))
    _, ended = first_eos_mask(ids[:, prompt_width:], stop_ids)
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    return Rollout(ids=ids, mask=mask, prompt_width=prompt_width, logprobs=cat["logprobs"],
                   ref_logprobs=cat["ref"], values=cat.get("values"), scores=cat["scores"], ended=ended,
                   engine_logprobs=engine_logprobs)


@dataclass(frozen=True)
class AdvantageSpec:
    """How a rollout's scores become advantages (the ppo config's fields of the same names; rlhf/config.py)."""

    reward_shift: float = 0.0         # scores -> (score - shift) / scale, measured on the SFT policy
    reward_scale: float = 1.0
    kl_estimator: str = "k1"
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    estimator: str = "gae"
    group_size: int = 1
    std_norm: bool = True             # grpo: divide by the group's std (false: Dr. GRPO)
    grpo_kl: str = "loss"             # grpo: the KL as a loss term (update.py) or in the answer's reward


def advantages(r: Rollout, kl_coef: float, spec: AdvantageSpec) -> Advantages:
    """Phase 3: scores -> rewards with the KL penalty (beta = kl_coef, this step's) where the estimator puts it
    -> advantages and returns.

    gae           per-token KL in the reward, GAE(gamma, lam) on the value adapter's values (PPO);
    reinforce_pp  per-token KL in the reward, reward to go (gamma), whitened over the batch (REINFORCE++);
    rloo          summed KL in the answer's reward, leave-one-out baseline over each group of group_size;
    grpo          group-normalised score (std_norm=False: not divided by the group's std, Dr. GRPO); no KL in
                  the reward (GRPO's KL is a loss term, `estimators.kl_loss`), or with grpo_kl="reward" minus
                  beta x the answer's group-centred summed KL, never divided by the std
                  (`estimators.group_normalised_with_kl`).
    whiten_rewards applies to the per-token rewards of gae and reinforce_pp, whiten_advantages to gae only:
    the other estimators bring their own normalisation. Every whitening uses the statistics of all processes'
    tokens (each process must call this, at the same step)."""
    mask = r.response_mask
    scores = (r.scores - spec.reward_shift) / spec.reward_scale
    if spec.missing_eos_penalty is not None:
        scores = core.missing_eos_penalty(scores, r.ended, spec.missing_eos_penalty)
    kl = kl_penalty(r.logprobs, r.ref_logprobs, spec.kl_estimator)
    estimator, group_size = spec.estimator, spec.group_size
    in_reward = 0.0 if estimator == "grpo" and spec.grpo_kl == "loss" else kl_coef
    rewards, non_score = core.per_token_rewards(scores, kl, mask, in_reward)
    reduce = distributed.sum_over_processes  # whitening statistics over every process's tokens
    if spec.whiten_rewards and estimator in ("gae", "reinforce_pp"):
        rewards = core.masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    if estimator == "gae":
        adv, returns = core.gae(rewards, r.values, mask, spec.gamma, spec.lam)
        if spec.whiten_advantages:
            adv = core.masked_whiten(adv, mask, reduce=reduce)
    elif estimator == "reinforce_pp":
        adv, returns = estimators.reinforce_pp(rewards, mask, spec.gamma, reduce)
    elif estimator == "rloo":
        seq = estimators.sequence_kl_rewards(scores, kl, mask, kl_coef)
        adv, returns = (estimators.to_tokens(x, mask) for x in (estimators.leave_one_out(seq, group_size), seq))
    elif estimator == "grpo":
        seq = estimators.sequence_kl_rewards(scores, kl, mask, in_reward)  # in_reward 0: the scores themselves
        adv = estimators.group_normalised_with_kl(scores, core.masked_sum(kl, mask, dim=1), group_size, in_reward,
                                                  spec.std_norm)
        adv, returns = estimators.to_tokens(adv, mask), estimators.to_tokens(seq, mask)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(estimators.ESTIMATORS)}")
    return Advantages(kl=kl, non_score=non_score, rewards=rewards, advantages=adv, returns=returns, scores=scores)
