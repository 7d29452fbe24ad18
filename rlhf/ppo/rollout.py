"""Phases 1-3 of a PPO step: sample responses, score them, turn scores into advantages.

Shapes: B rollouts, P prompt tokens (left-padded), R response tokens (right-padded after EOS). A row of
`ids` is [pad.. prompt | response ..pad]; the logits at position P - 1 + t predict response token t, and
the value at that position is V(state before token t).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlhf.generation import SamplingSpec, generate_ids
from rlhf.models import active_adapter
from rlhf.ppo import core
from rlhf.ppo.kl import kl_penalty
from rlhf.ppo.roles import POLICY, Roles, policy_logits, reference_logits, values


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled responses and what the model thought of them while sampling."""

    ids: torch.Tensor            # (B, P + R) prompt + response token ids
    mask: torch.Tensor           # (B, P + R) bool, True = real token
    prompt_width: int            # P
    logprobs: torch.Tensor       # (B, R) policy log-probs of the sampled tokens ("old" log-probs)
    ref_logprobs: torch.Tensor   # (B, R) reference (SFT) log-probs
    values: torch.Tensor         # (B, R) value estimates
    scores: torch.Tensor         # (B,) reward-model scores, raw
    ended: torch.Tensor          # (B,) bool: the response emitted EOS

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
    advantages: torch.Tensor  # (B, R) whitened if asked
    returns: torch.Tensor     # (B, R) advantages + values (before whitening)
    scores: torch.Tensor      # (B,) the scores that entered the rewards (penalised, normalised)


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


def response_width(ids: torch.Tensor, prompt_width: int) -> int:
    """R + 1: how many final positions' logits PPO needs (`logits_to_keep`). The logits at P - 1 .. P + R - 2
    predict the R response tokens: the last R + 1 positions but the final one (prompts are left-padded,
    responses right-padded, so these are the same positions in every row)."""
    return ids.shape[1] - prompt_width + 1


def response_logits(logits: torch.Tensor, ids: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, P + R, V) logits of the full sequences, or (B, R + 1, V) of the last R + 1 positions only ->
    (B, R, V) the logits that predict the response tokens."""
    keep = response_width(ids, prompt_width)
    if logits.shape[1] not in (ids.shape[1], keep):
        raise ValueError(f"logits of {logits.shape[1]} positions: expected {ids.shape[1]} (all) or {keep} (R + 1)")
    return logits[:, -keep:-1]


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor, prompt_width: int, temperature: float) -> torch.Tensor:
    """(B, P + R, V) or (B, R + 1, V) logits -> (B, R) log-probs of the response tokens at `temperature`."""
    return core.logprobs_from_logits(response_logits(logits, ids, prompt_width), ids[:, prompt_width:], temperature)


@torch.no_grad()
def sample(roles: Roles, tokenizer, prompts: list[list[int]], spec: SamplingSpec, batch_size: int):
    """Phase 1: responses from the policy. Returns generate_ids' (ids, mask, P)."""
    with active_adapter(roles.model, POLICY):
        return generate_ids(roles.model, tokenizer, prompts, spec, batch_size)


@torch.no_grad()
def score(roles: Roles, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, temperature: float,
          batch_size: int, stop_ids: int | list[int]) -> Rollout:
    """Phase 2: policy and reference log-probs, values and reward-model scores, in no-grad batches.
    `stop_ids`: the tokens sampling stopped at (`generation.model_stop_ids`): a row holding one has ended."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref": [], "values": [], "scores": []}
    for rows in torch.arange(ids.shape[0]).split(batch_size):
        i, m = ids[rows], mask[rows]
        keep = response_width(i, prompt_width)  # logits of the response positions only
        parts["logprobs"].append(response_logprobs(policy_logits(roles, i, m, keep), i, prompt_width, temperature))
        parts["ref"].append(response_logprobs(reference_logits(roles, i, m, keep), i, prompt_width, temperature))
        parts["values"].append(values(roles, i, m)[:, prompt_width - 1:-1])
        parts["scores"].append(roles.scorer.score_ids(i, m))
    _, ended = core.first_eos_mask(ids[:, prompt_width:], stop_ids)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Rollout(ids=ids, mask=mask, prompt_width=prompt_width, logprobs=cat["logprobs"],
                   ref_logprobs=cat["ref"], values=cat["values"], scores=cat["scores"], ended=ended)


def advantages(r: Rollout, kl_coef: float, kl_estimator: str, reward_shift: float, reward_scale: float,
               missing_eos_penalty: float | None, whiten_rewards: bool, whiten_advantages: bool,
               gamma: float, lam: float) -> Advantages:
    """Phase 3: scores -> per-token rewards with the KL penalty -> GAE advantages and returns."""
    mask = r.response_mask
    scores = (r.scores - reward_shift) / reward_scale
    if missing_eos_penalty is not None:
        scores = core.missing_eos_penalty(scores, r.ended, missing_eos_penalty)
    kl = core_kl = kl_penalty(r.logprobs, r.ref_logprobs, kl_estimator)
    rewards, non_score = core.per_token_rewards(scores, kl, mask, kl_coef)
    if whiten_rewards:
        rewards = core.masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = core.gae(rewards, r.values, mask, gamma, lam)
    if whiten_advantages:
        adv = core.masked_whiten(adv, mask)
    return Advantages(kl=core_kl, non_score=non_score, rewards=rewards, advantages=adv, returns=returns, scores=scores)
