"""The policy against the SFT model on held-out prompts: RM score, optional gold judge, KL, win rates."""

from __future__ import annotations

import torch

from rlhf.eval.degeneration import response_tokens
from rlhf.eval.stats import bootstrap_interval
from rlhf.generation import SamplingSpec, decode_responses, encode_prompt, generate_ids, model_stop_ids
from rlhf.models import sft_only
from rlhf.ppo import core
from rlhf.ppo.roles import Roles
from rlhf.ppo.rollout import sample, score


@torch.no_grad()
def sample_and_score(roles: Roles, tokenizer, prompt_ids, spec: SamplingSpec, batch_size: int, use_policy: bool,
                     seed: int, with_tokens: bool = False):
    """Sample with the policy (or the SFT model) and score the samples as a PPO rollout is scored.
    Returns (texts, RM scores (N,), sequence KL of policy vs SFT (N,), response lengths (N,)), and with
    `with_tokens` each response's token ids too (rlhf.eval.degeneration's input)."""
    torch.manual_seed(seed)
    if use_policy:
        ids, mask, width = sample(roles, tokenizer, prompt_ids, spec, batch_size)
    else:
        with sft_only(roles.model):
            ids, mask, width = generate_ids(roles.model, tokenizer, prompt_ids, spec, batch_size)
    r = score(roles, ids, mask, width, spec.temperature, batch_size, model_stop_ids(roles.model, tokenizer))
    kl = core.masked_sum(r.logprobs - r.ref_logprobs, r.response_mask, dim=1)
    out = decode_responses(tokenizer, ids, mask, width), r.scores, kl, r.response_mask.sum(1)
    return out + (response_tokens(ids, mask, width),) if with_tokens else out


def compare_with_sft(roles: Roles, tokenizer, prompts: list, spec: SamplingSpec, batch_size: int, judge=None,
                     seed: int = 1234, n_samples: int = 8) -> dict:
    """Sample once per prompt from the policy and from the SFT model (same seed), and compare them.

    KL is the sequence-level log-ratio log pi(y|x) - log pi_sft(y|x) on the policy's own samples (its mean
    estimates KL(pi || pi_sft))."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    pol_text, pol_score, pol_kl, pol_len = sample_and_score(roles, tokenizer, ids, spec, batch_size, True, seed)
    sft_text, sft_score, _, sft_len = sample_and_score(roles, tokenizer, ids, spec, batch_size, False, seed)
    out = {
        "eval/n_prompts": len(prompts),
        "eval/reward_policy": pol_score.mean().item(), "eval/reward_sft": sft_score.mean().item(),
        **win_rate_entries("reward", pol_score, sft_score),
        "eval/kl": pol_kl.mean().item(),
        "eval/length_policy": pol_len.float().mean().item(), "eval/length_sft": sft_len.float().mean().item(),
    }
    if judge is not None:
        gold_pol = torch.tensor([float(judge(p, t)) for p, t in zip(prompts, pol_text)])
        gold_sft = torch.tensor([float(judge(p, t)) for p, t in zip(prompts, sft_text)])
        out |= {"eval/gold_policy": gold_pol.mean().item(), "eval/gold_sft": gold_sft.mean().item(),
                **win_rate_entries("gold", gold_pol, gold_sft)}
    out["samples"] = [{"prompt": prompt_text(p), "policy": a, "sft": b}
                      for p, a, b in list(zip(prompts, pol_text, sft_text))[:n_samples]]
    return out


def win_rate_entries(name: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    """eval/<name>_win_rate (ties half) with its 95 % paired-bootstrap interval."""
    rate, low, high = bootstrap_interval(a, b)
    return {f"eval/{name}_win_rate": rate, f"eval/{name}_win_rate_low": low, f"eval/{name}_win_rate_high": high}


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " | ".join(m["content"] for m in prompt)
